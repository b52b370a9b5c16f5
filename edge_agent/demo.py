"""``edge-agent demo``: the whole line on this machine, a live view, and a ledger at the end.

Owns the demo's orchestration (broker, stand-in WMS and ERP, the agent, the simulated carton
line, a recorder on the MQTT bus), its terminal view and its summary. It drives the same real
processes as the end-to-end tests (``simulators.procs``) and never reaches into the agent: it
reads only the agent's status file, its outbox (read-only), the receivers' control API and
the bus. Every child process is stopped on every path out of ``run_demo``.

Stopping: SIGINT or SIGTERM (or ``seconds`` elapsed) stops the line, waits for the agent to
settle (windows close, backlogs drain), SIGTERMs the agent (it drains), then stops the rest
and reconciles each destination against the line's ground truth. A second signal skips the
settling; a third kills what is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from simulators.broker import EmbeddedBroker, Mosquitto, find_amqtt, find_mosquitto, local_broker
from simulators.bus_recorder import BusRecorder
from simulators.ledger import Ledger, reconcile
from simulators.procs import AgentProc, LineProc, ReceiverProc, write_site

from .config import HttpSinkConfig, MqttSinkConfig, load_site
from .errors import ConfigError

__all__ = ["run_demo"]

# A realistic line: what goes wrong on a real closing station, and how often.
FRACTIONS = {
    "noread_frac": 0.02,
    "missing_weight_frac": 0.02,
    "missing_scan_frac": 0.01,
    "dup_frac": 0.05,
    "reorder_frac": 0.05,
}
SEED = 1
# The destinations the example site delivers to; the HTTP ones are stand-in receivers.
RECEIVERS = ("wms", "erp")
BUS = "bus"
DESTINATIONS = (*RECEIVERS, BUS)
# Written into a work directory the demo made, so it only ever wipes its own.
MARKER = ".edge-agent-demo"

REFRESH_SECS = 0.25
PROGRESS_EVERY_SECS = 2.0
RATE_WINDOW_SECS = 5.0
BACKLOG_EVERY_SECS = 1.0  # the outbox is queried at most this often
AGENT_READY_SECS = 30.0
LINE_STOP_SECS = 15.0
# Windows close ~6 s after the last message; then the sinks deliver what is left.
SETTLE_MAX_SECS = 20.0
SETTLE_QUIET_SECS = 1.5
AGENT_STOP_SECS = 20.0
LATEST_EVENTS = 10  # at least; more when the terminal is taller
LATEST_EVENTS_MAX = 20  # the agent's status keeps the latest 20
CHART_SAMPLES = 200  # status samples (two a second) kept for the throughput chart
BARS = " ▁▂▃▄▅▆▇█"
TYPE_STYLES = {
    "carton_closed": "green",
    "carton_exception": "yellow",
    "scan_no_read": "magenta",
}
STATE_STYLES = {
    "online": "green",
    "idle": "green",
    "sending": "bold green",
    "degraded": "yellow",
    "backoff": "bold red",
    "offline": "bold red",
}


class _CannotRun(Exception):
    """The demo cannot run as asked (bad arguments, a work directory it must not wipe)."""


# --- signals ---------------------------------------------------------------------------------


class _Signals:
    """Counts SIGINT/SIGTERM: 1 stops gracefully, 2 hurries (no settling), 3 kills."""

    def __init__(self) -> None:
        self.count = 0

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.count += 1

    @property
    def stop(self) -> bool:
        return self.count >= 1

    @property
    def hurry(self) -> bool:
        return self.count >= 2

    @property
    def force(self) -> bool:
        return self.count >= 3

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _children_deaf_to_ctrl_c() -> Iterator[None]:
    """Spawn children with SIGINT blocked: a blocked signal stays blocked across fork and exec.

    Ctrl-C goes to the terminal's whole foreground process group, so without this every
    child (broker, receivers, agent, line) would stop at once and out of order. The demo
    stops them itself, in order, with SIGTERM. A signal arriving meanwhile is delivered to
    the demo when the block is lifted. (Cleaner: ``simulators.procs`` starting children in
    their own process group.)
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- reading what the processes report -------------------------------------------------------


class _GroundTruth:
    """The line's ground truth (``--forever``: one JSON line per finished carton)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._offset = 0

    def poll(self) -> int:
        """Cartons published so far, reading only what was appended since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.count
        complete = chunk.rfind(b"\n") + 1
        self.count += chunk.count(b"\n", 0, complete)
        self._offset += complete
        return self.count

    def load(self) -> list[dict[str, Any]]:
        cartons = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            with contextlib.suppress(ValueError):  # a line killed mid-write is not a carton
                cartons.append(json.loads(line))
        return cartons


class _Outbox:
    """Read-only queries of the agent's outbox; a new connection each time, never a write."""

    def __init__(self, path: Path):
        self.path = path

    def _query(self, sql: str) -> list[tuple[Any, ...]] | None:
        if not self.path.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return None
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.Error:
            return None
        finally:
            conn.close()

    def pending(self) -> dict[str, int] | None:
        rows = self._query("SELECT sink, count(*) FROM deliveries WHERE state = 0 GROUP BY sink")
        return None if rows is None else {sink: n for sink, n in rows}

    def events_by_type(self) -> dict[str, int] | None:
        rows = self._query("SELECT type, count(*) FROM events GROUP BY type")
        return None if rows is None else {t: n for t, n in rows}

    def deliveries(self) -> dict[str, Counter[int]] | None:
        rows = self._query("SELECT sink, state, count(*) FROM deliveries GROUP BY sink, state")
        if rows is None:
            return None
        out: dict[str, Counter[int]] = {}
        for sink, state, n in rows:
            out.setdefault(sink, Counter())[state] = n
        return out


@dataclass
class _Sample:
    """What one poll saw."""

    status: dict[str, Any] | None = None
    backlog: dict[str, int] | None = None
    cartons: int = 0
    events_per_s: float | None = None
    messages_per_s: float | None = None
    cartons_per_s: float | None = None
    spark: list[float] = field(default_factory=list)


class _Rates:
    """Per-second rates of counters over the last few seconds, from timestamped samples."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int, int]] = deque()
        self.spark: deque[float] = deque(maxlen=CHART_SAMPLES)

    def add(self, t: float, events: int, messages: int, cartons: int) -> None:
        if self._samples and t <= self._samples[-1][0]:
            return  # the same status file again
        self._samples.append((t, events, messages, cartons))
        while len(self._samples) > 2 and t - self._samples[1][0] >= RATE_WINDOW_SECS:
            self._samples.popleft()
        rate = self.rate(1)
        if rate is not None:
            self.spark.append(rate)

    def rate(self, i: int) -> float | None:
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        dt = last[0] - first[0]
        return (last[i] - first[i]) / dt if dt > 0 else None


# --- the live view ---------------------------------------------------------------------------


def _styled(state: str | None) -> Text:
    state = state or "-"
    return Text(state, style=STATE_STYLES.get(state, "dim"))


def _num(n: float | None, fmt: str = ",") -> str:
    return "-" if n is None else format(n, fmt)


def _clock(secs: float) -> str:
    s = int(secs)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _chart(values: list[float], width: int, height: int) -> Text:
    """A bar chart, newest on the right, scaled to its largest value, eighths of a row."""
    values = values[-width:]
    top = max(values, default=0.0) or 1.0
    rows = []
    for row in range(height - 1, -1, -1):
        cells = []
        for v in values:
            fill = v / top * height - row  # how much of this row the bar covers
            cells.append(BARS[max(0, min(len(BARS) - 1, round(fill * (len(BARS) - 1))))])
        rows.append("".join(cells))
    return Text("\n".join(rows), style="cyan", no_wrap=True)


@dataclass
class _ViewInfo:
    site: str
    broker: str
    workdir: Path
    rate: float
    devices: dict[str, list[str]]  # connector -> its devices


def _header(info: _ViewInfo, uptime: float, phase: Text) -> Panel:
    line = Text.assemble(
        ("site ", "dim"), (info.site, "bold"),
        ("  up ", "dim"), _clock(uptime),
        ("  broker ", "dim"), info.broker,
        ("  workdir ", "dim"), str(info.workdir),
    )
    line.truncate(200, overflow="ellipsis")
    return Panel(
        Group(line, phase), title="[bold]edge-agent demo[/]", title_align="left",
        box=box.ROUNDED, padding=(0, 1),
    )


def _devices(info: _ViewInfo, st: dict[str, Any] | None) -> Panel:
    t = Table(
        box=None, expand=True, padding=(0, 1), pad_edge=False, header_style="bold dim"
    )
    t.add_column("connector", no_wrap=True)
    t.add_column("devices", no_wrap=True, overflow="ellipsis")
    t.add_column("state", no_wrap=True)
    t.add_column("received", justify="right", no_wrap=True)
    conns = (st or {}).get("connectors", {})
    for name in sorted(set(info.devices) | set(conns)):
        c = conns.get(name, {})
        t.add_row(
            name, ", ".join(info.devices.get(name, [])), _styled(c.get("state")),
            _num(c.get("received")),
        )
    eng = (st or {}).get("engine", {})
    bad = sum(eng.get("bad_payloads", {}).values())
    foot = Text.assemble(
        ("redeliveries dropped ", "dim"), _num(eng.get("duplicates")),
        ("   bad payloads ", "dim"), (_num(bad), "bold red" if bad else ""),
    )
    return Panel(Group(t, foot), title="Devices", title_align="left", box=box.ROUNDED)


def _throughput(info: _ViewInfo, s: _Sample, width: int, height: int) -> Panel:
    """``width`` and ``height``: the panel's, borders included."""
    eng = (s.status or {}).get("engine", {})
    t = Table.grid(padding=(0, 1), expand=True)
    t.add_column(style="dim", no_wrap=True, min_width=18)
    t.add_column(justify="right", no_wrap=True, min_width=9)
    t.add_column(style="dim", no_wrap=True, overflow="ellipsis", ratio=1)
    t.add_row(
        "business events/s", Text(_num(s.events_per_s, ",.1f"), style="bold"),
        f"last {RATE_WINDOW_SECS:.0f} s",
    )
    t.add_row("business events", _num(eng.get("business_events")), "in total")
    t.add_row("device messages/s", _num(s.messages_per_s, ",.1f"), "from the devices")
    t.add_row("cartons simulated", _num(s.cartons), f"line at {info.rate:g}/s")
    open_keys = sum((eng.get("open_keys") or {}).values()) if eng else None
    t.add_row("open windows", _num(open_keys), "by tracking id")
    parts: list[RenderableType] = [t]
    chart_rows = height - 2 - 5 - 1
    if chart_rows >= 1:
        top = max(s.spark[-(width - 4):], default=0.0)
        parts.append(Text(f"business events/s, peak {top:,.0f}", style="dim"))
        parts.append(_chart(s.spark, width - 4, chart_rows))
    return Panel(Group(*parts), title="Throughput", title_align="left", box=box.ROUNDED)


def _sinks(s: _Sample) -> Panel:
    t = Table(
        box=None, expand=True, padding=(0, 1), pad_edge=False, header_style="bold dim"
    )
    t.add_column("sink", no_wrap=True)
    t.add_column("state", no_wrap=True)
    t.add_column("delivered", justify="right", no_wrap=True)
    t.add_column("dead", justify="right", no_wrap=True)
    t.add_column("backlog", justify="right", no_wrap=True)
    t.add_column("last error", ratio=1, no_wrap=True, overflow="ellipsis")
    sinks = (s.status or {}).get("sinks", {})
    for name in sorted(set(DESTINATIONS) | set(sinks), key=_dest_order):
        d = sinks.get(name, {})
        state = _styled(d.get("state"))
        if "link" in d:
            state.append(" / link ", style="dim").append_text(_styled(d["link"].get("state")))
        dead = d.get("dead")
        backlog = None if s.backlog is None else s.backlog.get(name, 0)
        err = d.get("last_error") or (d.get("link") or {}).get("last_error")
        t.add_row(
            Text(name, style="bold"), state, _num(d.get("delivered")),
            Text(_num(dead), style="bold red" if dead else ""),
            Text(_num(backlog), style="yellow" if backlog else ""),
            Text(err or "-", style="red" if err else "dim"),
        )
    return Panel(t, title="Sinks", title_align="left", box=box.ROUNDED)


def _latest(st: dict[str, Any] | None, rows: int) -> Panel:
    t = Table(
        box=None, expand=True, padding=(0, 1), pad_edge=False, header_style="bold dim"
    )
    t.add_column("time", no_wrap=True)
    t.add_column("type", no_wrap=True)
    t.add_column("subject", no_wrap=True, overflow="ellipsis")
    recent = ((st or {}).get("engine", {}).get("recent") or [])[-rows:]
    for ts, typ, subject in reversed(recent):
        stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
        t.add_row(stamp, Text(typ, style=TYPE_STYLES.get(typ, "")), str(subject))
    return Panel(t, title="Latest business events", title_align="left", box=box.ROUNDED)


def _dest_order(name: str) -> tuple[int, str]:
    return (DESTINATIONS.index(name) if name in DESTINATIONS else len(DESTINATIONS), name)


def render(
    info: _ViewInfo, s: _Sample, uptime: float, phase: Text, size: tuple[int, int]
) -> Layout:
    """The whole screen; laid out for 100x30 and up."""
    width, height = size
    header_h, sinks_h, footer_h = 4, 2 + 1 + len(DESTINATIONS), 1
    devices_h = 2 + 1 + len(info.devices) + 1
    middle_h = max(13, height - header_h - sinks_h - footer_h)
    left_w = max(40, width // 2)
    layout = Layout()
    layout.split_column(
        Layout(name="header", size=header_h),
        Layout(name="middle", size=middle_h),
        Layout(name="sinks", size=sinks_h),
        Layout(name="footer", size=footer_h),
    )
    layout["middle"].split_row(Layout(name="left", size=left_w), Layout(name="right", ratio=1))
    layout["left"].split_column(Layout(name="devices", size=devices_h), Layout(name="throughput"))
    layout["header"].update(_header(info, uptime, phase))
    layout["devices"].update(_devices(info, s.status))
    layout["throughput"].update(_throughput(info, s, left_w, middle_h - devices_h))
    rows = min(LATEST_EVENTS_MAX, max(LATEST_EVENTS, middle_h - 3))
    layout["right"].update(_latest(s.status, rows))
    layout["sinks"].update(_sinks(s))
    layout["footer"].update(
        Text(
            f" Ctrl-C stops (press again to hurry) · logs: {info.workdir}/*.log",
            style="dim", no_wrap=True, overflow="ellipsis",
        )
    )
    return layout


def progress_line(s: _Sample, uptime: float, phase: str) -> str:
    """One plain line for logs and pipes."""
    st = s.status or {}
    eng = st.get("engine", {})
    sinks = st.get("sinks", {})
    parts = [
        f"[{uptime:7.1f}s] {phase}",
        f"cartons {s.cartons}",
        f"events {eng.get('business_events', 0)} ({_num(s.events_per_s, '.1f')}/s)",
    ]
    for name in DESTINATIONS:
        d = sinks.get(name, {})
        backlog = "?" if s.backlog is None else s.backlog.get(name, 0)
        parts.append(
            f"{name} {d.get('state', '-')} {d.get('delivered', 0)} "
            f"(backlog {backlog}, dead {d.get('dead', 0)})"
        )
    parts.append(f"bad {sum(eng.get('bad_payloads', {}).values())}")
    return "  ".join(parts)


# --- the demo --------------------------------------------------------------------------------


def _fresh_workdir(workdir: Path) -> Path:
    """Wipe a previous demo's work directory; refuse to wipe anything else."""
    workdir = workdir.resolve()
    if workdir.exists():
        if not workdir.is_dir():
            raise _CannotRun(f"--workdir {workdir} is not a directory")
        if any(workdir.iterdir()):
            if not (workdir / MARKER).exists():
                raise _CannotRun(
                    f"refusing to wipe {workdir}: it is not empty and not a demo work directory "
                    f"(no {MARKER} in it); pass --workdir a new or empty directory"
                )
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("scratch directory of `edge-agent demo`: wiped on each run\n")
    return workdir


@dataclass
class _Outcome:
    cartons: list[dict[str, Any]]
    received: dict[str, list[dict[str, Any]]]
    ledgers: dict[str, Ledger]
    events_by_type: dict[str, int]
    delivered: dict[str, int]
    dead: dict[str, int]
    bad_payloads: int
    ran_secs: float
    problems: list[str]  # the run went wrong: it fails whatever the ledger says
    notes: list[str]  # what explains a ledger that does not balance

    @property
    def ok(self) -> bool:
        return not self.problems and all(led.ok for led in self.ledgers.values())


class Demo:
    """One run: start everything, show it, stop it in order, account for every carton."""

    def __init__(self, *, rate: float, seconds: float, workdir: Path, signals: _Signals,
                 console: Console, interactive: bool):
        self.rate = rate
        self.seconds = seconds
        self.workdir = workdir
        self.signals = signals
        self.console = console
        self.interactive = interactive
        self.started = time.monotonic()
        self.line_started: float | None = None
        self.line_stopped: float | None = None
        self.broker: Mosquitto | EmbeddedBroker | None = None
        self.receivers: dict[str, ReceiverProc] = {}
        self.agent: AgentProc | None = None
        self.line: LineProc | None = None
        self.bus: BusRecorder | None = None
        self.outbox: _Outbox | None = None
        self.truth = _GroundTruth(workdir / "ground_truth.json")
        self.rates = _Rates()
        self.types: dict[str, set[str] | None] = {}
        self.info: _ViewInfo | None = None
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._backlog: dict[str, int] | None = None
        self._backlog_at = 0.0
        self._sample = _Sample()
        self._phase = "starting"
        self._last_progress = 0.0
        self._refresh: Callable[[], None] = lambda: None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
        except (RuntimeError, TimeoutError, OSError, ConfigError, ValueError) as exc:
            self._say(f"edge-agent demo could not start: {exc}")
            return 1
        with self._view():
            if not self.signals.stop:
                self._show_until_stopped()
            self._shutdown()
        outcome = self._account()
        self.close()
        self._print_summary(outcome)
        return 0 if outcome.ok else 1

    def _start(self) -> None:
        wd = self.workdir
        with _children_deaf_to_ctrl_c():
            self._say(f"starting: broker, stand-in WMS and ERP, agent (workdir {wd})")
            self.broker = local_broker(wd / "broker")
            if isinstance(self.broker, EmbeddedBroker):
                self._say("mosquitto is not installed: using the embedded amqtt broker (MQTT 3.1.1)")
            for name in RECEIVERS:
                self.receivers[name] = ReceiverProc(name, wd)
            config = write_site(
                wd, broker_port=self.broker.port,
                wms_url=self.receivers["wms"].url, erp_url=self.receivers["erp"].url,
                protocol=self.broker.protocol,
            )
            site, _profiles = load_site(config)
            self._learn(site)
            self.outbox = _Outbox(
                site.outbox.path if site.outbox.path.is_absolute() else wd / site.outbox.path
            )
            bus_cfg = site.sinks[BUS]
            assert isinstance(bus_cfg, MqttSinkConfig)
            prefix = bus_cfg.prefix.replace("{site}", site.site)
            # Subscribed before the agent starts, so it sees every event the bus carries.
            self.bus = BusRecorder(
                self.broker.host, self.broker.port, f"{prefix}/events/#", self.broker.protocol
            )
            self.agent = AgentProc(config, wd).start()
        if not self._wait_ready():
            return
        with _children_deaf_to_ctrl_c():
            self.line = LineProc(
                wd, port=self.broker.port, count=None, rate=self.rate, seed=SEED,
                fractions=FRACTIONS, ground_truth=self.truth.path,
                protocol=self.broker.protocol,
            )
        self.line_started = time.monotonic()
        self._phase = "running"
        how_long = f"for {self.seconds:g} s" if self.seconds > 0 else "until Ctrl-C"
        self._say(
            f"running {how_long}: line at {self.rate:g} cartons/s, "
            f"broker 127.0.0.1:{self.broker.port}"
        )
        self._say(
            f"stand-in WMS {self.receivers['wms'].url}, ERP {self.receivers['erp'].url}"
        )

    def _learn(self, site: Any) -> None:
        for name in DESTINATIONS:
            cfg = site.sinks.get(name)
            if cfg is None:
                raise ValueError(f"the example site has no sink {name!r}")
            if name in RECEIVERS and not isinstance(cfg, HttpSinkConfig):
                raise ValueError(f"the example site's sink {name!r} is not an http sink")
            self.types[name] = set(cfg.event_types) if cfg.event_types is not None else None
        devices: dict[str, list[str]] = {}
        for dev_id, dev in site.devices.items():
            broker = getattr(dev.connection, "broker", None)
            devices.setdefault(f"mqtt:{broker}" if broker else dev_id, []).append(dev_id)
        assert self.broker is not None
        self.info = _ViewInfo(
            site=site.site, broker=f"127.0.0.1:{self.broker.port}", workdir=self.workdir,
            rate=self.rate, devices=devices,
        )

    def _wait_ready(self) -> bool:
        assert self.agent is not None
        deadline = time.monotonic() + AGENT_READY_SECS
        while not self.signals.stop:
            try:
                self.agent.wait_ready(timeout_secs=0.5)
                return True
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        return False

    def close(self) -> None:
        """Stop every child still running; safe to call at any point, and more than once."""
        if self._closed:
            return
        self._closed = True
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.line is not None:
            steps.append(("line", self.line.stop))
        if self.agent is not None and (agent_proc := self.agent.proc) is not None:
            steps.append(("agent", lambda: _terminate(agent_proc, AGENT_STOP_SECS)))
        if self.bus is not None:
            steps.append(("bus recorder", self.bus.close))
        steps += [(f"receiver {n}", r.stop) for n, r in self.receivers.items()]
        if self.broker is not None:
            steps.append(("broker", self.broker.stop))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                self._say(f"stopping the {what} failed: {exc!r}")

    # --- showing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _view(self) -> Iterator[None]:
        if not self.interactive:
            self._refresh = self._progress
            yield
            return
        with Live(
            console=self.console, screen=True, auto_refresh=False,
            redirect_stdout=False, redirect_stderr=False,
        ) as live:
            def refresh() -> None:
                live.update(self._render(), refresh=True)

            self._refresh = refresh
            try:
                yield
            finally:
                self._refresh = lambda: None

    def _render(self) -> RenderableType:
        assert self.info is not None
        return render(
            self.info, self._sample, time.monotonic() - self.started, self._phase_text(),
            self.console.size,
        )

    def _phase_text(self) -> Text:
        if self._phase == "running":
            left = ""
            if self.seconds > 0 and self.line_started is not None:
                ran = time.monotonic() - self.line_started
                left = f", {max(0.0, self.seconds - ran):.0f} s left"
            return Text.assemble(
                ("● running", "bold green"),
                (f": line at {self.rate:g} cartons/s{left}", "dim"),
            )
        hint = ""
        if self.signals.count == 1:
            hint = "  (Ctrl-C again to hurry)"
        elif self.signals.count == 2:
            hint = "  (hurrying; Ctrl-C again to kill)"
        return Text.assemble((f"■ {self._phase}", "bold yellow"), (hint, "dim"))

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_SECS:
            self._last_progress = now
            print(progress_line(self._sample, now - self.started, self._phase), flush=True)

    def _say(self, msg: str) -> None:
        if self.interactive:
            self.console.print(msg, highlight=False, soft_wrap=True)
        else:
            print(msg, flush=True)

    def _poll(self) -> _Sample:
        assert self.agent is not None and self.outbox is not None
        now = time.monotonic()
        st = self.agent.status()
        if st is not None and st.get("pid") != self.agent.pid:
            st = None  # not this run's agent
        if now - self._backlog_at >= BACKLOG_EVERY_SECS:
            self._backlog_at = now
            self._backlog = self.outbox.pending()
        cartons = self.truth.poll()
        if st is not None:
            received = sum(c.get("received", 0) for c in st["connectors"].values())
            self.rates.add(st["time"], st["engine"]["business_events"], received, cartons)
        self._sample = _Sample(
            status=st, backlog=self._backlog, cartons=cartons,
            events_per_s=self.rates.rate(1), messages_per_s=self.rates.rate(2),
            cartons_per_s=self.rates.rate(3), spark=list(self.rates.spark),
        )
        return self._sample

    def _tick(self) -> _Sample:
        s = self._poll()
        self._refresh()
        time.sleep(REFRESH_SECS)
        return s

    def _show_until_stopped(self) -> None:
        assert self.agent is not None and self.line is not None and self.agent.proc is not None
        while not self.signals.stop:
            ran = time.monotonic() - (self.line_started or time.monotonic())
            if 0 < self.seconds <= ran:
                break
            if (rc := self.agent.proc.poll()) is not None:
                self.problems.append(
                    f"the agent exited unexpectedly ({rc}); see {self.agent.log_path}"
                )
                break
            if (rc := self.line.proc.poll()) is not None:
                self.problems.append(
                    f"the carton line exited unexpectedly ({rc}); see {self.line.log_path}"
                )
                break
            self._tick()

    # --- stopping ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        if self.line is not None:
            self._phase = "stopping the line (it finishes the cartons it started)"
            self._wait_exit("carton line", self.line.proc, LINE_STOP_SECS)
            self.line_stopped = time.monotonic()
            if self.line.proc.returncode not in (0, -signal.SIGKILL):
                self.notes.append(
                    f"the carton line exited with {self.line.proc.returncode} (publishes the "
                    f"broker did not acknowledge?); see {self.line.log_path}"
                )
        if self.agent is not None and self.agent.proc is not None:
            if self.agent.proc.poll() is None and self.line is not None:
                self._settle()
            if self.signals.hurry:
                self.notes.append(
                    "the shutdown was hurried (second Ctrl-C): the agent stopped before every "
                    "window closed, so events still due are missing"
                )
            self._phase = "stopping the agent (it drains)"
            self._wait_exit("agent", self.agent.proc, AGENT_STOP_SECS)
            self._poll()
            self._refresh()

    def _settle(self) -> None:
        """Until windows closed, every backlog is empty and the counts stand still."""
        assert self.agent is not None and self.agent.proc is not None
        deadline = time.monotonic() + SETTLE_MAX_SECS
        last: tuple[Any, ...] | None = None
        quiet_since = time.monotonic()
        self._backlog_at = 0.0
        while not self.signals.hurry and self.agent.proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                self.notes.append(
                    f"the agent did not settle within {SETTLE_MAX_SECS:.0f} s of the line stopping"
                )
                return
            s = self._poll()
            st = s.status
            counts = (
                *(_unique(r) for r in self.receivers.values()),
                self.bus.unique() if self.bus else 0,
                None if st is None else st["engine"]["business_events"],
                None if st is None else sum(c["received"] for c in st["connectors"].values()),
            )
            if counts != last:
                last, quiet_since = counts, now
            open_keys = None if st is None else sum(st["engine"]["open_keys"].values())
            drained = (
                open_keys == 0 and s.backlog is not None and not any(s.backlog.values())
            )
            backlog = sum(s.backlog.values()) if s.backlog is not None else None
            self._phase = (
                f"settling: {_num(open_keys)} windows open, {_num(backlog)} deliveries pending "
                f"({deadline - now:.0f} s at most)"
            )
            if drained and now - quiet_since >= SETTLE_QUIET_SECS:
                return
            self._refresh()
            time.sleep(REFRESH_SECS)

    def _wait_exit(self, what: str, proc: subprocess.Popen[bytes], timeout_secs: float) -> None:
        """SIGTERM and wait, refreshing the view; SIGKILL on timeout or a third signal."""
        if proc.poll() is None:
            proc.terminate()
        deadline = time.monotonic() + timeout_secs
        while proc.poll() is None:
            if self.signals.force or time.monotonic() > deadline:
                why = "on a third Ctrl-C" if self.signals.force else f"after {timeout_secs:.0f} s"
                self.notes.append(f"the {what} was killed {why}")
                proc.kill()
                proc.wait()
                return
            self._refresh()
            time.sleep(REFRESH_SECS / 2)

    # --- accounting --------------------------------------------------------------------------

    def _account(self) -> _Outcome:
        cartons = self.truth.load()
        received: dict[str, list[dict[str, Any]]] = {}
        for name, r in self.receivers.items():
            try:
                received[name] = r.received()["events"]
            except Exception as exc:
                self.problems.append(f"could not read what the {name} received: {exc!r}")
                received[name] = []
        if self.bus is not None:
            with self.bus.lock:
                received[BUS] = list(self.bus.events)
        else:
            received[BUS] = []
        ledgers = {
            name: reconcile(cartons, received[name], types=self.types.get(name))
            for name in DESTINATIONS
        }
        by_type = (self.outbox.events_by_type() if self.outbox else None) or {}
        deliveries = (self.outbox.deliveries() if self.outbox else None) or {}
        st = self.agent.status() if self.agent else None
        eng = (st or {}).get("engine", {})
        started = self.line_started or time.monotonic()
        return _Outcome(
            cartons=cartons,
            received=received,
            ledgers=ledgers,
            events_by_type=by_type,
            delivered={n: deliveries.get(n, Counter())[1] for n in DESTINATIONS},
            dead={n: deliveries.get(n, Counter())[2] for n in DESTINATIONS},
            bad_payloads=sum(eng.get("bad_payloads", {}).values()),
            ran_secs=(self.line_stopped or time.monotonic()) - started,
            problems=self.problems,
            notes=self.notes,
        )

    def _print_summary(self, o: _Outcome) -> None:
        for line in summary_lines(o, rate=self.rate, workdir=self.workdir):
            if self.interactive:
                self.console.print(line, highlight=False, soft_wrap=True)
            else:
                print(line.plain, flush=True)


def _unique(receiver: ReceiverProc) -> int | None:
    try:
        return int(receiver.stats()["unique"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None  # a receiver that does not answer is not settled; the deadline decides


def _terminate(proc: subprocess.Popen[bytes], timeout_secs: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_secs)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary_lines(o: _Outcome, *, rate: float, workdir: Path) -> list[Text]:
    """The end-of-run report: what was simulated, emitted, delivered, and the ledger."""
    outcomes = Counter(c.get("outcome", "?") for c in o.cartons)
    total_events = sum(o.events_by_type.values())
    lines = [
        Text(f"edge-agent demo summary: the line ran {o.ran_secs:.1f} s at {rate:g} cartons/s "
             f"(workdir {workdir})", style="bold"),
        Text(f"  cartons simulated   {len(o.cartons):,}  ("
             + ", ".join(f"{k} {n:,}" for k, n in sorted(outcomes.items())) + ")"),
        Text(f"  business events     {total_events:,}  ("
             + ", ".join(f"{k} {n:,}" for k, n in sorted(o.events_by_type.items())) + ")"),
        Text("  delivered           "
             + ", ".join(f"{n} {o.delivered.get(n, 0):,}" for n in DESTINATIONS)),
        Text("  received (unique)   "
             + ", ".join(f"{n} {len({e['id'] for e in o.received.get(n, [])}):,}"
                         for n in DESTINATIONS)),
        Text("  dead letters        "
             + ", ".join(f"{n} {o.dead.get(n, 0):,}" for n in DESTINATIONS),
             style="red" if any(o.dead.values()) else ""),
        Text(f"  bad payloads        {o.bad_payloads:,}"),
        Text("  accounted for       each carton's expected events arrived once, with the right"
             " values:"),
    ]
    for name in DESTINATIONS:
        led = o.ledgers[name]
        mark = Text(" ok ", style="bold green") if led.ok else Text("FAIL", style="bold red")
        line = Text(f"    {name:<4} ").append_text(mark).append(
            f"  {led.accounted:,}/{led.cartons:,} cartons; missing "
            f"{len(led.missing)}, unexpected {len(led.unexpected)}, duplicates "
            f"{len(led.duplicates)}, wrong values {len(led.wrong_values)}"
        )
        lines.append(line)
        if not led.ok:
            for label, items in (("missing", led.missing), ("unexpected", led.unexpected),
                                 ("duplicates", led.duplicates), ("wrong", led.wrong_values)):
                if items:
                    lines.append(Text(f"           {label}: {', '.join(items[:3])}"
                                      + (" ..." if len(items) > 3 else ""), style="red"))
    lines += [Text(f"  note: {n}", style="yellow") for n in o.notes]
    lines += [Text(f"  problem: {p}", style="bold red") for p in o.problems]
    dests = ", ".join(DESTINATIONS[:-1]) + f" and {DESTINATIONS[-1]}"
    if o.ok:
        lines.append(Text(
            f"result: every simulated carton is accounted for exactly once at {dests}",
            style="bold green",
        ))
    elif bad := [n for n in DESTINATIONS if not o.ledgers[n].ok]:
        lines.append(Text(
            f"result: NOT every simulated carton is accounted for at {', '.join(bad)}; "
            f"logs in {workdir}",
            style="bold red",
        ))
    else:
        lines.append(Text(
            f"result: the ledger balances, but the run had problems (above); logs in {workdir}",
            style="bold red",
        ))
    return lines


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """This process's own log records go to a file: on the terminal they would tear the view."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_demo(*, rate: float, seconds: float, workdir: Path) -> int:
    """Run the demo; 0 when every carton is accounted for everywhere, 1 when not, 2 when it
    cannot run here (no mosquitto, bad arguments, a work directory it must not wipe)."""
    if rate <= 0:
        print(f"edge-agent demo: --rate must be > 0, got {rate:g}", file=sys.stderr)
        return 2
    if find_mosquitto() is None and find_amqtt() is None:
        print(
            "edge-agent demo needs an MQTT broker: install mosquitto with "
            "`sudo apt-get install mosquitto` (`make demo` does this for you, or installs "
            "the embedded amqtt broker where apt-get cannot)",
            file=sys.stderr,
        )
        return 2
    try:
        workdir = _fresh_workdir(workdir)
    except (_CannotRun, OSError) as exc:
        print(f"edge-agent demo: {exc}", file=sys.stderr)
        return 2
    interactive = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    signals = _Signals()
    with signals.installed(), _log_to(workdir / "demo.log"):
        demo = Demo(
            rate=rate, seconds=seconds, workdir=workdir, signals=signals,
            console=Console(highlight=False), interactive=interactive,
        )
        try:
            return demo.run()
        finally:
            demo.close()
