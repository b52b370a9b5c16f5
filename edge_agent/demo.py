"""``edge-agent demo``: the whole line on this machine, a live view, and a ledger at the end.

Owns the demo's orchestration (broker, stand-in WMS and ERP, the agent, the simulated carton
line, a recorder on the MQTT bus), its terminal view and its summary. It drives the same real
processes as the end-to-end tests (``simulators.procs``) and never reaches into the agent: it
reads only the agent's status file, its outbox (read-only), the receivers' control API and
the bus. Every child process is stopped on every path out of ``run_demo``.

The packing station CLOSE1's checkweigher is CW1 on MQTT, or with ``checkweigher="modbus"``
(``--checkweigher modbus``) a Modbus CW2 weighing the same seeded cartons
(``simulators.modbus_line``); the line then runs at most at a few cartons a second.
Otherwise a second station CLOSE2 (`STATION2`, ``--no-modbus-station`` leaves it out) weighs
its own cartons on the Modbus CW2 at `STATION2_RATE`, with its own rule (a copy of CLOSE1's)
and ground truth, next to CLOSE1 at full rate.

Downstream, an OPC UA sorter SORTER1 (``simulators.sorter_operator``, the
``simulators.opcua_sorter`` simulator with its induct gate held until the agent is
subscribed) sorts its own seeded cartons at ``--sorter-rate`` (`SORTER_RATE` by default).

The simulators behave like real devices (millisecond timestamps that collide, device clocks
a little off and drifting, handshake flags cleared late, the sorter's clock 2 s ahead).
``--clock DEVICE=SECS`` sets the offset of CLOSE1's scanner or checkweigher clock
(``checkweigher=-10800``: 3 h behind). Faults, each ``--fault SPEC`` (`Fault`),
AT seconds after the line started, for SECS:

- ``broker-outage@AT:SECS``: the broker (mosquitto, always run with persistence here) stops
  cleanly and starts again on the same port; the agent's and the bus recorder's persistent
  sessions and the queued QoS 1 messages survive, the carton lines' clients keep what they
  publish meanwhile and send it on reconnect;
- ``restart:PTL1@AT:SECS`` / ``restart:CONV1@...``: a Modbus device restarts (registers
  kept); ``power-cycle:DEV@...``: registers back to power-up values, a key press not yet
  acknowledged is lost (marked in the device's truth; neither expected nor held against the
  agent). Nobody presses a key or jams a belt while the device is down. The device process
  takes the command on its stdin (`_modbus_station_main`);
- ``restart:SORTER1@AT:SECS``: the sorter's OPC UA server restarts. A server restart drops
  the notifications it had queued but not yet published (the agent reports a counter gap:
  true events that became unobservable), so the demo stops the induct first, waits until
  the belt is empty and every sorter event is on the bus, restarts the server, and opens the
  induct again once the agent has subscribed again (`Demo._step_sorter_restart`).

The line starts once the agent has watched every device for a whole window
(`Demo._wait_ready`): what it could not see before is a gap, never an exception.

The summary's ledger (``simulators.ledger``) checks every delivery at every destination,
repeats of an id included, against every simulator's ground truth: the closing line's
cartons, the sorter's finished cartons, the pick-to-light presses and the conveyor's stops.
It is a table per destination and event type (expected, delivered, wrong, missing,
invented, duplicate deliveries, duplicate facts, precision, recall); the demo says "exactly
once" only when nothing is missing, wrong, invented or delivered under a second id. The same
outcome, with the faults as they happened, is written to ``<workdir>/ledger.json``
(`ledger_document`). The live view needs a terminal; otherwise (or with ``--no-live``) the
demo prints a plain progress line every few seconds.

Stopping: SIGINT or SIGTERM (or ``seconds`` elapsed) stops the line, waits for the agent to
settle (windows close, backlogs drain), SIGTERMs the agent (it drains), then stops the rest
and accounts for every destination in the ledger. A second signal skips the
settling; a third kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
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

from simulators.broker import (
    EmbeddedBroker,
    Mosquitto,
    find_amqtt,
    find_mosquitto,
    kill_process,
    local_broker,
    spawn,
    stop_all,
    stop_process,
)
from simulators.bus_recorder import BusRecorder
from simulators.ledger import (
    Ledger,
    account,
    carton_facts,
    fault_facts,
    press_facts,
    sorter_expected,
    sorter_facts,
    sorter_received,
    sorter_unfinished,
)
from simulators.procs import ROOT, AgentProc, LineProc, ReceiverProc, site_text
from simulators.receiver import merge_deliveries

from .config import HttpSinkConfig, MqttSinkConfig, load_site
from .errors import ConfigError

__all__ = ["run_demo"]

log = logging.getLogger(__name__)

# A realistic line: what goes wrong on a real closing station, and how often.
FRACTIONS = {
    "noread_frac": 0.02,
    "missing_weight_frac": 0.02,
    "missing_scan_frac": 0.01,
    "dup_frac": 0.05,
    "reorder_frac": 0.05,
}
SEED = 1
# The demo's site: the example station plus a Modbus conveyor section and pick-to-light zone.
SITE_FILE = Path(__file__).resolve().parent / "examples" / "site-modbus.yaml"
# The Modbus ports in SITE_FILE, replaced by those the simulators listen on.
MODBUS_PORTS = {"CONV1": 5021, "PTL1": 5022}
MODBUS_KINDS = {"CONV1": "conveyor", "PTL1": "pick_to_light"}
CONVEYOR = "CONV1"
# Where the packing station's weights come from: the MQTT checkweigher CW1 of SITE_FILE, or
# (``--checkweigher modbus``) a Modbus checkweigher CW2 in its place, weighing the same plan.
CHECKWEIGHERS = ("mqtt", "modbus")
MODBUS_CW = "CW2"
MODBUS_CW_PROFILE = "acme_checkweigher_mb"
MODBUS_CW_READY_POLLS = 3  # the agent has learnt the weighing counter before the first carton
MODBUS_CW_READY_SECS = 10.0
# The OPC UA sorter: its endpoint in SITE_FILE, replaced by its simulator's.
SORTER = "SORTER1"
SORTER_ENDPOINT = "opc.tcp://127.0.0.1:4840/"
SORTER_RATE = 3.0  # cartons/s, whatever the closing line's rate
SORTER_READY_SECS = 15.0
SORTER_STOP_SECS = 20.0  # induct closed: the cartons on the belt finish within this
SORTER_TYPES = ("carton_sorted", "sort_exception")
PICK_PRESSES_PER_SEC = 2.0  # the picker at PTL1, on average
JAM_EVERY_SECS = (8.0, 20.0)  # the conveyor stops now and then ...
JAM_LASTS_SECS = (2.0, 4.0)  # ... until an operator clears it
JAM_CODES = {1: 6, 2: 2, 7: 2}  # fault code -> weight (1 jam at photo-eye, 2 overload, 7 blocked)
FAULT_NAMES = {1: "jam_at_photo_eye", 2: "motor_overload", 7: "downstream_blocked"}
PICK_TYPES = ("pick_confirmed", "pick_short", "equipment_fault")
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
    "pick_confirmed": "cyan",
    "pick_short": "bold yellow",
    "equipment_fault": "bold red",
    "carton_sorted": "blue",
    "sort_exception": "bold magenta",
}
STATE_STYLES = {
    "online": "green",
    "idle": "green",
    "sending": "bold green",
    "degraded": "yellow",
    "backoff": "bold red",
    "offline": "bold red",
}


@dataclass(frozen=True)
class Station:
    """A packing station of the simulated line: its name (the events' ``station``), MQTT
    topic base, scanner id and the index of its first carton (tracking ids ``T<index>``)."""

    name: str = "CLOSE1"
    base: str = "site/close1"
    scanner: str = "SCN1"
    start_index: int = 0


# The second packing station (``--modbus-station``): its scanner on MQTT, its checkweigher
# MODBUS_CW on Modbus, its own rule and cartons (tracking ids far from CLOSE1's).
STATION2 = Station("CLOSE2", "site/close2", "SCN2", 5_000_000)
STATION2_RULE = "close-station-2"
STATION2_RATE = 4.0  # cartons/s: a Modbus checkweigher weighs a few a second at most


# --- faults ----------------------------------------------------------------------------------

FAULT_SPEC = re.compile(
    r"^(?P<kind>broker-outage|restart:(?P<dev>[A-Za-z0-9_-]+)|power-cycle:(?P<pdev>[A-Za-z0-9_-]+))"
    r"@(?P<at>\d+(?:\.\d*)?):(?P<down>\d+(?:\.\d*)?)$"
)
SORTER_CATCH_UP_SECS = 90.0  # before its restart, the agent gets what the sorter published (a
# machine running two test suites at once was seen 30 s behind; it waits only as long as needed)
SORTER_BACK_SECS = 60.0  # after it, the agent subscribes again


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` (broker-outage, restart or power-cycle) of ``device``
    (None for the broker), at ``at_secs`` after the line started, lasting ``down_secs``."""

    kind: str
    device: str | None
    at_secs: float
    down_secs: float

    @classmethod
    def parse(cls, spec: str) -> Fault:
        m = FAULT_SPEC.match(spec.strip())
        if m is None:
            raise ValueError(
                f"--fault {spec!r}: expected broker-outage@AT:SECS, restart:DEVICE@AT:SECS or "
                f"power-cycle:DEVICE@AT:SECS (e.g. broker-outage@15:5, restart:PTL1@25:2)"
            )
        kind = m["kind"].split(":", 1)[0]
        device = m["dev"] or m["pdev"]
        restartable = (*MODBUS_KINDS, SORTER) if kind == "restart" else tuple(MODBUS_KINDS)
        if device is not None and device not in restartable:
            raise ValueError(f"--fault {spec!r}: {kind} of {device}: the demo can {kind} "
                             f"{', '.join(restartable)}")
        return cls(kind, device, float(m["at"]), float(m["down"]))

    def __str__(self) -> str:
        what = self.kind if self.device is None else f"{self.kind}:{self.device}"
        return f"{what}@{self.at_secs:g}:{self.down_secs:g}"


@dataclass
class _FaultRun:
    """A fault as it happens: its steps, when it began and ended (seconds since the line
    started), and what went differently from the plan."""

    fault: Fault
    step: str = "pending"  # ... "done"
    began: float | None = None
    ended: float | None = None
    until: float = 0.0  # monotonic deadline of the current step
    mark: int = 0  # the step's reference count (the agent's restarts, ...)
    answered: int = 0  # the simulator's answers before the step
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"fault": str(self.fault), "kind": self.fault.kind, "device": self.fault.device,
                "at_secs": self.fault.at_secs, "down_secs": self.fault.down_secs,
                "began_secs": self.began, "ended_secs": self.ended, "step": self.step,
                "notes": self.notes}


def parse_clocks(specs: list[str]) -> dict[str, float]:
    """``--clock DEVICE=SECS`` (the carton line's scanner or checkweigher) as a dict."""
    from simulators.carton_line import Device

    clocks = {}
    for spec in specs:
        name, sep, secs = spec.partition("=")
        if not sep or name not in {d.value for d in Device} or _secs(secs.lstrip("-")) is None:
            raise ValueError(f"--clock {spec!r}: expected DEVICE=SECS with DEVICE one of "
                             f"{', '.join(d.value for d in Device)} (e.g. checkweigher=-10800)")
        clocks[name] = float(secs)
    return clocks


class _CannotRun(Exception):
    """The demo cannot run as asked (bad arguments, a work directory it must not wipe)."""


# --- signals ---------------------------------------------------------------------------------


class _Signals:
    """Counts SIGINT/SIGTERM/SIGHUP: 1 stops gracefully, 2 hurries (no settling), 3 kills."""

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
        # SIGHUP too: the children run in sessions of their own, so a closed terminal
        # does not stop them; the demo must, in order.
        old = {s: signal.signal(s, self._handle)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
    the demo when the block is lifted. (The children also run in sessions of their own,
    ``simulators.broker.spawn``; this stays as a second line.)
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


def _broker(workdir: Path) -> Mosquitto | EmbeddedBroker:
    """mosquitto with persistence (sessions and queued messages survive a clean stop: a
    broker outage loses nothing), else `local_broker`'s fallback."""
    if find_mosquitto() is not None and os.environ.get("EDGE_AGENT_DEMO_BROKER") != "amqtt":
        return Mosquitto(workdir=workdir, persistent=True).start()
    return local_broker(workdir)


# --- the Modbus devices ------------------------------------------------------------------


def _truth_path(stats_path: Path) -> Path:
    """Where a Modbus device of the demo writes what it did, fact by fact (JSON list)."""
    return stats_path.with_name(stats_path.stem + ".truth.json")


def _secs(text: str) -> float | None:
    """A duration of at least 0 s, or None."""
    try:
        secs = float(text)
    except ValueError:
        return None
    return secs if secs >= 0 and math.isfinite(secs) else None


def _modbus_station_main(argv: list[str]) -> None:
    """A simulated Modbus device of the demo, in its own process (``simulators.modbus_devices``
    with a scripted operator): ``KIND STATS_PATH [RATE]``.

    ``pick_to_light``: a picker presses CONFIRM (or, one time in ten, SHORT) every 1/RATE s
    on average. ``conveyor``: cartons pass at RATE/s and the belt stops now and then (a jam or
    another fault) until an operator clears it. Prints ``READY <kind> port=N``; counts what it
    did into STATS_PATH (JSON) and each press or stop, the ledger's ground truth, next to it
    (`_truth_path`). Commands on stdin, one a line: ``quiet`` (or SIGUSR1): stop pressing
    and jamming (the demo is stopping); ``restart SECS [reset]``: the device restarts
    (`ModbusDeviceSim.restart`), down SECS, with ``reset`` a power cycle (registers back to
    power-up values: a press not yet acknowledged is lost, marked ``lost`` in the truth).
    Nobody presses a key or jams a belt of a device that is down. SIGTERM or the end of
    stdin: exit.
    """
    from simulators.modbus_devices import ConveyorSim, PickToLightSim

    kind, stats_path, rate = argv[0], Path(argv[1]), float(argv[2]) if len(argv) > 2 else 1.0
    counts: Counter[str] = Counter()

    def save() -> None:
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, stats_path)

    truth_path = _truth_path(stats_path)
    truth: list[dict[str, Any]] = []  # presses or stops, in order: the ledger's facts

    def write_truth() -> None:
        tmp = truth_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(truth))
        os.replace(tmp, truth_path)

    def record(fact: dict[str, Any]) -> None:
        truth.append(fact)
        write_truth()

    async def running(sim: ConveyorSim | PickToLightSim) -> None:
        """Until the device is up (a device that is down takes no key press, no jam)."""
        while not sim.running:
            await asyncio.sleep(0.05)

    async def picker(sim: PickToLightSim) -> None:
        rng = random.Random(SEED)
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            await running(sim)
            n, qty = rng.randint(1, 4), rng.randint(1, 6)
            # The display shows the quantity when the key is pressed; a press the module
            # ignores (the last one not yet acknowledged) leaves the display as it was.
            shown = sim.get(f"display_qty_{n}")
            sim.set(f"display_qty_{n}", qty)
            pressed = len(sim.presses)
            if rng.random() < 0.1:
                what, accepted, picked = "short", sim.short(n, qty - 1), qty - 1
            else:
                what, accepted, picked = "confirm", sim.confirm(n, qty), qty
            counts[what if accepted else "ignored"] += 1
            if accepted:
                record({"kind": what, "position": n, "location": sim.get(f"location_{n}"),
                        "qty": picked, "display_qty": qty, "seq": sim.presses[pressed].seq})
            else:
                sim.set(f"display_qty_{n}", shown)
            save()

    async def operator(sim: ConveyorSim) -> None:
        rng = random.Random(SEED)
        while True:
            await asyncio.sleep(rng.uniform(*JAM_EVERY_SECS))
            await running(sim)
            code = rng.choices(list(JAM_CODES), weights=list(JAM_CODES.values()))[0]
            sim.jam(code)
            counts[FAULT_NAMES[code]] += 1
            record({"equipment": CONVEYOR, "reason": FAULT_NAMES[code]})
            save()
            await asyncio.sleep(rng.uniform(*JAM_LASTS_SECS))
            await running(sim)
            sim.clear()

    async def restart(sim: ConveyorSim | PickToLightSim, down_secs: float, reset: bool) -> None:
        await sim.restart(down_secs, reset=reset)
        if isinstance(sim, PickToLightSim):
            # The presses a power cycle wiped before they were acknowledged: no host may
            # have read them (the ledger does not expect them, nor hold them against it).
            for fact, press in zip(truth, sim.presses, strict=False):
                if press.lost and not fact.get("lost"):
                    fact["lost"] = True
                    counts["lost"] += 1
            write_truth()
        counts["restarts"] += 1
        save()
        print(f"restarted after {down_secs:g} s (reset={reset})", file=sys.stderr, flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sim: ConveyorSim | PickToLightSim
        if kind == "conveyor":
            sim = ConveyorSim(rate=rate)
            script = operator(sim)
        else:
            sim = PickToLightSim()
            script = picker(sim)
        save()
        tasks: set[asyncio.Task[None]] = set()
        async with sim:
            task = asyncio.create_task(script)

            def command(line: str) -> None:
                words = line.split()
                if not line:  # stdin closed: whoever started us is gone
                    stop.set()
                elif words == ["quiet"]:
                    task.cancel()
                elif (words[:1] == ["restart"] and len(words) in (2, 3)
                      and words[2:] in ([], ["reset"]) and _secs(words[1]) is not None):
                    t = asyncio.create_task(
                        restart(sim, _secs(words[1]) or 0.0, words[2:] == ["reset"]))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif words:
                    print(f"unknown command {line.strip()!r}", file=sys.stderr, flush=True)

            def read_stdin() -> None:  # a daemon thread: a blocked readline never holds up exit
                while True:
                    line = sys.stdin.readline()
                    loop.call_soon_threadsafe(command, line)
                    if not line:
                        return

            loop.add_signal_handler(signal.SIGUSR1, task.cancel)
            threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
            print(f"READY {kind} port={sim.port}", flush=True)
            await stop.wait()
            for t in (task, *tasks):
                t.cancel()
            await asyncio.gather(task, *tasks, return_exceptions=True)

    asyncio.run(serve())


class _ModbusSimProc:
    """One of the demo's simulated Modbus devices (`_modbus_station_main`) in its own process."""

    def __init__(self, device: str, kind: str, workdir: Path, rate: float):
        self.device = device
        self.kind = kind
        self.log_path = workdir / f"sim-{device}.log"
        self.stats_path = workdir / f"sim-{device}.json"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = spawn(
            [sys.executable, "-c",
             "import sys; from edge_agent.demo import _modbus_station_main as m; m(sys.argv[1:])",
             kind, str(self.stats_path), f"{rate:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"the {kind} simulator did not start: {line!r}; see {self.log_path}")
        self.port = int(line.rsplit("port=", 1)[1])

    def _send(self, cmd: str) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(cmd.encode() + b"\n")
                self.proc.stdin.flush()

    def quiet(self) -> None:
        """No more presses or jams: the line is stopping."""
        self._send("quiet")

    def restart(self, down_secs: float, *, reset: bool) -> None:
        """The device restarts now, down for `down_secs` (with `reset`: a power cycle)."""
        self._send(f"restart {down_secs:g}" + (" reset" if reset else ""))

    def stats(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.stats_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def truth(self) -> list[dict[str, Any]] | None:
        """Each press or stop it made, in order; None if it cannot be read."""
        try:
            facts = json.loads(_truth_path(self.stats_path).read_text())
        except FileNotFoundError:
            return []  # it did nothing yet
        except (OSError, ValueError):
            return None
        return facts if isinstance(facts, list) else None

    def stop(self) -> None:
        stop_process(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


class _ModbusLineProc:
    """A packing station with its checkweigher on Modbus (``simulators.modbus_line``).

    Started before the agent (the agent's site needs the checkweigher's port); the cartons
    start only on `go`, once the agent polls the checkweigher. SIGTERM stops the line; the
    checkweigher keeps answering after the last carton (``DONE``, see `done`) until `stop`.
    ``station``: its name, topic base, scanner and first carton index (`Station`).
    """

    def __init__(self, workdir: Path, *, port: int, rate: float, seed: int,
                 fractions: dict[str, float], ground_truth: Path, protocol: str,
                 station: Station | None = None):
        self.ground_truth = ground_truth
        st = station or Station()
        self.log_path = workdir / ("line-modbus.log" if station is None
                                   else f"line-{st.name.lower()}.log")
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "simulators.modbus_line", "--port", str(port),
                "--modbus-port", "0", "--forever", "--wait-go", "--hold", "--rate", f"{rate:g}",
                "--seed", str(seed), "--protocol", protocol, "--ground-truth", str(ground_truth),
                "--station", st.name, "--base", st.base, "--scanner-id", st.scanner,
                "--start-index", str(st.start_index)]
        for k, v in fractions.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = spawn(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(
                f"the Modbus checkweigher line did not start: {line!r}; see {self.log_path}"
            )
        self.modbus_port = int(line.rsplit("port=", 1)[1])

    def go(self) -> None:
        """Start the cartons."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def done(self, timeout_secs: float) -> bool:
        """Whether the line finished its last carton (or exited), waiting up to the timeout."""
        assert self.proc.stdout is not None
        if self.proc.poll() is not None:
            return True
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_secs)
        if not readable:
            return False
        line = self.proc.stdout.readline()
        return not line or line.startswith(b"DONE")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


class _SorterProc:
    """The OPC UA sorter SORTER1 (``simulators.sorter_operator``) in its own process.

    Its induct gate stays closed until `go` (the agent is subscribed by then, so it sees
    every carton from its induct on); `pause` closes it and `done` tells when the belt is
    empty; `write_truth` and `restart` are the operator's ``truth`` and ``restart``
    commands, answered by `answered`; SIGTERM (`stop`) writes its ground truth, read by
    `truth`. A thread reads what it prints.
    """

    def __init__(self, workdir: Path, *, rate: float, seed: int):
        self.ground_truth = workdir / "sorter_truth.json"
        self.log_path = workdir / "sim-SORTER1.log"
        self._log = open(self.log_path, "wb")
        self._changed = threading.Condition()
        self._answers: Counter[str] = Counter()  # first word of each line printed
        self._awaiting_done = False
        self._eof = False
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = spawn(
            [sys.executable, "-m", "simulators.sorter_operator", "--port", "0",
             "--rate", f"{rate:g}", "--seed", str(seed), "--ground-truth",
             str(self.ground_truth), "--wait-go"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"the OPC UA sorter did not start: {line!r}; see {self.log_path}")
        self.endpoint = line.split("endpoint=", 1)[1].split()[0]
        self._reader = threading.Thread(target=self._read, name="sorter-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            word = raw.decode(errors="replace").split(maxsplit=1)[:1]
            with self._changed:
                if word:
                    self._answers[word[0]] += 1
                if word == ["DONE"]:
                    self._awaiting_done = False
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _send(self, cmd: str) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(cmd.encode() + b"\n")
                self.proc.stdin.flush()

    def go(self) -> None:
        self._send("go")

    def pause(self) -> None:
        """Close the induct gate; `done` tells when the cartons on the belt are."""
        with self._changed:
            if self._awaiting_done:
                return  # the last pause's DONE is still to come, and answers this one too
            self._awaiting_done = True
        self._send("pause")

    def done(self, timeout_secs: float) -> bool:
        """Whether every inducted carton is done (after `pause`), waiting up to the timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._awaiting_done or self._eof, timeout_secs)

    def answers(self, word: str) -> int:
        """How many lines starting with `word` (TRUTH, RESTARTED) it printed so far."""
        with self._changed:
            return self._answers[word]

    def write_truth(self) -> None:
        """Its ground truth so far into `ground_truth` (answered by a TRUTH line)."""
        self._send("truth")

    def restart(self, down_secs: float) -> None:
        """Its OPC UA server restarts, down `down_secs` (answered by a RESTARTED line)."""
        self._send(f"restart {down_secs:g}")

    def truth(self) -> list[dict[str, Any]] | None:
        """Its ground truth, written when it stopped; None if it was not."""
        try:
            cartons = json.loads(self.ground_truth.read_text())
        except (OSError, ValueError):
            return None
        return cartons if isinstance(cartons, list) else None

    def stop(self) -> None:
        stop_process(self.proc, 10)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._reader.join(5)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()


@dataclass
class _SorterOutcome:
    inducted: int
    done: int
    at_wms: Counter[str]  # sorter event type -> unique events at the WMS
    truth_read: bool
    state_at_stop: str | None = None

    @property
    def ok(self) -> bool:
        return self.truth_read


def sorter_outcome(truth: list[dict[str, Any]] | None, wms_events: list[dict[str, Any]],
                   state_at_stop: str | None) -> _SorterOutcome:
    """What the sorter did; its events are checked in the ledger (cartons done at stop)."""
    at_wms = Counter(t for t, _, _ in sorter_received(wms_events, types=SORTER_TYPES))
    if truth is None:
        return _SorterOutcome(0, 0, at_wms, False, state_at_stop)
    done = sum(1 for c in truth if c.get("done"))
    return _SorterOutcome(len(truth), done, at_wms, True, state_at_stop)


def _modbus_checkweigher(text: str, port: int) -> str:
    """SITE_FILE's text with the MQTT checkweigher CW1 replaced by the Modbus checkweigher."""
    device = re.compile(r"^  CW1:\n(?:    .*\n)+", re.MULTILINE)
    rule = "weight: {device: CW1, event: weight}"
    if len(device.findall(text)) != 1 or text.count(rule) != 1:
        raise ValueError(f"{SITE_FILE.name} has no single CW1 device and rule input to replace")
    text = device.sub(
        f"  {MODBUS_CW}:\n"
        f"    profile: {MODBUS_CW_PROFILE}\n"
        f"    description: Checkweigher at closing station 1 (Modbus TCP)\n"
        f"    connection: {{kind: modbus, host: 127.0.0.1, port: {port}, timeout_ms: 500}}\n",
        text,
    )
    return text.replace(rule, f"weight: {{device: {MODBUS_CW}, event: weight}}")


def _add_modbus_station(text: str, port: int) -> str:
    """SITE_FILE's text plus the second packing station STATION2: its scanner on MQTT, the
    Modbus checkweigher MODBUS_CW listening on `port`, and its rule, a copy of CLOSE1's."""
    lines = text.splitlines(keepends=True)
    first = [i for i, ln in enumerate(lines) if ln == "  - name: close-station-1\n"]
    devices = [i for i, ln in enumerate(lines) if ln == "devices:\n"]
    if len(first) != 1 or len(devices) != 1:
        raise ValueError(f"{SITE_FILE.name} has no single close-station-1 rule and devices map")
    end = first[0] + 1
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    rule = "".join(lines[first[0]:end]).rstrip("\n") + "\n\n"
    for old, new in (("close-station-1", STATION2_RULE), ("{device: SCN1,", "{device: SCN2,"),
                     ("{device: CW1,", f"{{device: {MODBUS_CW},"), ("CLOSE1", STATION2.name)):
        if old not in rule:
            raise ValueError(f"{SITE_FILE.name}'s close-station-1 rule has no {old!r}")
        rule = rule.replace(old, new)
    added = (
        f"  {STATION2.scanner}:\n"
        f"    profile: generic_json_scanner\n"
        f"    description: Label scanner at closing station 2\n"
        f"    connection: {{kind: mqtt, broker: local, "
        f"topic_base: {STATION2.base}/scanner/{STATION2.scanner}}}\n"
        f"  {MODBUS_CW}:\n"
        f"    profile: {MODBUS_CW_PROFILE}\n"
        f"    description: Checkweigher at closing station 2 (Modbus TCP)\n"
        f"    connection: {{kind: modbus, host: 127.0.0.1, port: {port}, timeout_ms: 500}}\n"
    )
    lines[end:end] = [rule]
    lines[devices[0] + 1:devices[0] + 1] = [added]
    return "".join(lines)


def write_demo_site(
    workdir: Path, *, broker_port: int, wms_url: str, erp_url: str, protocol: str,
    modbus_ports: dict[str, int], checkweigher_port: int | None = None,
    sorter_endpoint: str | None = None, station2_port: int | None = None,
) -> Path:
    """The demo's site file, pointed at this run's broker, receivers and simulators.

    With `checkweigher_port`, the station's checkweigher is the Modbus CW2 listening there;
    with `station2_port`, a second station STATION2 weighs on the Modbus CW2 listening there.
    """
    replace = {f"port: {MODBUS_PORTS[d]}": f"port: {p}" for d, p in modbus_ports.items()}
    if sorter_endpoint is not None:
        replace[SORTER_ENDPOINT] = sorter_endpoint
    text = site_text(SITE_FILE, broker_port=broker_port, wms_url=wms_url, erp_url=erp_url,
                     protocol=protocol, replace=replace)
    if checkweigher_port is not None:
        text = _modbus_checkweigher(text, checkweigher_port)
    if station2_port is not None:
        text = _add_modbus_station(text, station2_port)
    path = workdir / "site.yaml"
    path.write_text(text)
    return path


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
    picks: dict[str, int] = field(default_factory=dict)  # pick/fault type -> events on the bus
    last_fault: tuple[float, str] | None = None  # (time, reason) of the latest equipment_fault


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


def _devices(info: _ViewInfo, s: _Sample) -> Panel:
    st = s.status
    t = Table(
        box=None, expand=True, padding=(0, 1), pad_edge=False, header_style="bold dim"
    )
    t.add_column("connector", no_wrap=True)
    t.add_column("devices", no_wrap=True, overflow="ellipsis")
    t.add_column("state", no_wrap=True)
    t.add_column("received", justify="right", no_wrap=True)
    t.add_column("polls", justify="right", no_wrap=True)
    conns = (st or {}).get("connectors", {})
    for name in sorted(set(info.devices) | set(conns)):
        c = conns.get(name, {})
        state = _styled(c.get("state"))
        if c.get("restarts"):
            state.append(f" ↻{c['restarts']}", style="dim")
        received = c.get("received", c.get("notifications"))  # OPC UA: notifications
        t.add_row(
            name, ", ".join(info.devices.get(name, [])), state,
            _num(received), _num(c.get("polls")),
        )
    eng = (st or {}).get("engine", {})
    bad = sum(eng.get("bad_payloads", {}).values())
    foot = Text.assemble(
        ("redeliveries dropped ", "dim"), _num(eng.get("duplicates")),
        ("   bad payloads ", "dim"), (_num(bad), "bold red" if bad else ""),
    )
    fault = Text("-", style="dim")
    if s.last_fault is not None:
        at, reason = s.last_fault
        fault = Text(f"{reason} {time.strftime('%H:%M:%S', time.localtime(at))}", style="red")
    picks = Text.assemble(
        ("picks ", "dim"), (_num(s.picks.get("pick_confirmed", 0)), "cyan"),
        ("  short ", "dim"), (_num(s.picks.get("pick_short", 0)), "yellow"),
        ("  faults ", "dim"), (_num(s.picks.get("equipment_fault", 0)), "red"),
        ("  last ", "dim"), fault,
    )
    picks.no_wrap, picks.overflow = True, "ellipsis"
    sorter = conns.get(f"opcua:{SORTER}", {})
    gaps = sum((sorter.get("counter_gaps") or {}).values())
    sorted_line = Text.assemble(
        (f"{SORTER} sorted ", "dim"), (_num(s.picks.get("carton_sorted", 0)), "blue"),
        ("  exceptions ", "dim"), (_num(s.picks.get("sort_exception", 0)), "magenta"),
        ("  counter gaps ", "dim"), (_num(gaps), "bold red" if gaps else ""),
    )
    sorted_line.no_wrap, sorted_line.overflow = True, "ellipsis"
    return Panel(Group(t, foot, picks, sorted_line), title="Devices", title_align="left",
                 box=box.ROUNDED)


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
    devices_h = 2 + 1 + len(info.devices) + 3
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
    layout["devices"].update(_devices(info, s))
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
    for name, c in sorted(st.get("connectors", {}).items()):
        if name.startswith("modbus:"):
            parts.append(f"{name.split(':', 1)[1]} {c.get('state', '-')} polls {c.get('polls', 0)}")
        elif name.startswith("opcua:"):
            parts.append(f"{name.split(':', 1)[1]} {c.get('state', '-')} "
                         f"notifications {c.get('notifications', 0)}")
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
    received: dict[str, list[dict[str, Any]]]  # every delivery, repeats of an id included
    ledger: Ledger  # every sink, every event type, against every simulator's ground truth
    events_by_type: dict[str, int]
    delivered: dict[str, int]
    dead: dict[str, int]
    bad_payloads: int
    picks: dict[str, Counter[str]]  # destination -> pick/fault event type -> unique events
    sims: dict[str, dict[str, int]]  # Modbus device -> what its simulator did
    modbus: dict[str, dict[str, Any]]  # Modbus connector -> its last status
    ran_secs: float
    checkweigher: str = "mqtt"
    sorter: _SorterOutcome | None = None
    problems: list[str] = field(default_factory=list)  # the run went wrong: it fails whatever the ledger says
    notes: list[str] = field(default_factory=list)  # what explains a ledger not balancing
    faults: list[dict[str, Any]] = field(default_factory=list)  # `_FaultRun.to_json`
    clocks: dict[str, float] = field(default_factory=dict)  # device -> clock offset (s)

    @property
    def ok(self) -> bool:
        return (not self.problems and self.ledger.exactly_once
                and (self.sorter is None or self.sorter.ok))


class Demo:
    """One run: start everything, show it, stop it in order, account for every carton."""

    def __init__(self, *, rate: float, seconds: float, workdir: Path, signals: _Signals,
                 console: Console, interactive: bool, checkweigher: str = "mqtt",
                 faults: list[Fault] | None = None, clocks: dict[str, float] | None = None,
                 modbus_station: bool = False, sorter_rate: float = SORTER_RATE):
        self.rate = rate
        self.checkweigher = checkweigher
        self.clocks = dict(clocks or {})
        self.sorter_rate = sorter_rate
        self.fault_runs = [_FaultRun(f) for f in sorted(faults or [], key=lambda f: f.at_secs)]
        # The second packing station, CLOSE2 with its checkweigher on Modbus.
        self.line2: _ModbusLineProc | None = None
        self.truth2 = _GroundTruth(workdir / "ground_truth_close2.json") if modbus_station else None
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
        self.line: LineProc | _ModbusLineProc | None = None
        self.sims: dict[str, _ModbusSimProc] = {}
        self.sorter: _SorterProc | None = None
        self.sorter_at_stop: str | None = None  # SORTER1's connector state when stopping
        self.modbus: dict[str, dict[str, Any]] = {}  # connector -> its latest status
        self.modbus_at_stop: dict[str, str | None] = {}  # connector -> state when stopping
        self.bus: BusRecorder | None = None
        self.outbox: _Outbox | None = None
        self.truth = _GroundTruth(workdir / "ground_truth.json")
        self.rates = _Rates()
        self.types: dict[str, set[str] | None] = {}
        # Rules whose open keys are counting windows (no event due when they close): the
        # settling does not wait for them (the sorter's recirculation count keeps 600 s).
        self.counting_rules: set[str] = set()
        self.info: _ViewInfo | None = None
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._backlog: dict[str, int] | None = None
        self._backlog_at = 0.0
        self._bus_seen = 0  # bus events looked at for pick/fault events
        self._sorter_seen: set[tuple[str, str, str]] = set()  # sorter events on the bus
        self._pick_ids: dict[str, set[str]] = {t: set() for t in (*PICK_TYPES, *SORTER_TYPES)}
        self._last_fault: tuple[float, str] | None = None
        self._sample = _Sample()
        self._sorter_want: set[tuple[str, str, str]] = set()  # before a restart of the sorter
        self._fault_line = ""  # the latest step of a fault, for the live view
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
        path = self.workdir / LEDGER_FILE
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(ledger_document(outcome, rate=self.rate), indent=1) + "\n")
            os.replace(tmp, path)
            self._say(f"ledger written to {path}")
        except OSError as exc:
            self._say(f"could not write {path}: {exc}")
            return 1
        return 0 if outcome.ok else 1

    def _start(self) -> None:
        wd = self.workdir
        with _children_deaf_to_ctrl_c():
            cw = " and checkweigher" if self.checkweigher == "modbus" else ""
            self._say(
                f"starting: broker, stand-in WMS and ERP, Modbus conveyor, pick-to-light{cw}, "
                f"OPC UA sorter, agent (workdir {wd})"
            )
            self.broker = _broker(wd / "broker")
            if isinstance(self.broker, EmbeddedBroker):
                self._say("mosquitto is not installed: using the embedded amqtt broker (MQTT 3.1.1)")
            for name in RECEIVERS:
                self.receivers[name] = ReceiverProc(name, wd)
            for dev, kind in MODBUS_KINDS.items():
                rate = PICK_PRESSES_PER_SEC if kind == "pick_to_light" else self.rate
                self.sims[dev] = _ModbusSimProc(dev, kind, wd, rate)
            self.sorter = _SorterProc(wd, rate=self.sorter_rate, seed=SEED)
            cw_port = station2_port = None
            if self.checkweigher == "modbus":
                # Its checkweigher listens now; its cartons start once the agent polls it.
                modbus_line = _ModbusLineProc(
                    wd, port=self.broker.port, rate=self.rate, seed=SEED, fractions=FRACTIONS,
                    ground_truth=self.truth.path, protocol=self.broker.protocol,
                )
                self.line = modbus_line
                cw_port = modbus_line.modbus_port
            elif self.truth2 is not None:
                self.line2 = _ModbusLineProc(
                    wd, port=self.broker.port, rate=STATION2_RATE, seed=SEED, fractions=FRACTIONS,
                    ground_truth=self.truth2.path, protocol=self.broker.protocol,
                    station=STATION2,
                )
                station2_port = self.line2.modbus_port
            config = write_demo_site(
                wd, broker_port=self.broker.port,
                wms_url=self.receivers["wms"].url, erp_url=self.receivers["erp"].url,
                protocol=self.broker.protocol,
                modbus_ports={d: sim.port for d, sim in self.sims.items()},
                checkweigher_port=cw_port, sorter_endpoint=self.sorter.endpoint,
                station2_port=station2_port,
            )
            site, _profiles = load_site(config)
            self._learn(site)
            self.outbox = _Outbox(
                site.outbox.path if site.outbox.path.is_absolute() else wd / site.outbox.path
            )
            bus_cfg = site.sinks[BUS]
            assert isinstance(bus_cfg, MqttSinkConfig)
            prefix = bus_cfg.prefix.replace("{site}", site.site)
            # Subscribed before the agent starts, so it sees every event the bus carries; with
            # a persistent session (mosquitto), also what is published while it reconnects
            # after a broker outage.
            self.bus = BusRecorder(
                self.broker.host, self.broker.port, f"{prefix}/events/#", self.broker.protocol,
                client_id=(f"edge-agent-demo-bus-{os.getpid()}"
                           if isinstance(self.broker, Mosquitto) else None),
            )
            self.agent = AgentProc(config, wd).start()
        if not self._wait_ready():
            return
        # The sorter's cartons start once the agent is subscribed: it sees each from its induct.
        if not self._wait_online(f"opcua:{SORTER}", SORTER_READY_SECS):
            return
        if isinstance(self.line, _ModbusLineProc) or self.line2 is not None:
            if not self._wait_polled(f"modbus:{MODBUS_CW}"):
                return
        self.sorter.go()
        if self.line2 is not None:
            self.line2.go()
        if isinstance(self.line, _ModbusLineProc):
            self.line.go()
        else:
            with _children_deaf_to_ctrl_c():
                self.line = LineProc(
                    wd, port=self.broker.port, count=None, rate=self.rate, seed=SEED,
                    fractions=FRACTIONS, ground_truth=self.truth.path,
                    protocol=self.broker.protocol, clocks=self.clocks,
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
        modbus = [f"{d} ({s.kind}) 127.0.0.1:{s.port}" for d, s in self.sims.items()]
        if isinstance(self.line, _ModbusLineProc):
            modbus.append(f"{MODBUS_CW} (checkweigher) 127.0.0.1:{self.line.modbus_port}")
        if self.line2 is not None:
            modbus.append(f"{MODBUS_CW} (checkweigher of {STATION2.name} at {STATION2_RATE:g} "
                          f"cartons/s) 127.0.0.1:{self.line2.modbus_port}")
        self._say("Modbus " + ", ".join(modbus))
        self._say(f"OPC UA sorter {SORTER} {self.sorter.endpoint} at {self.sorter_rate:g} "
                  f"cartons/s")
        if self.clocks:
            self._say("device clocks: " + ", ".join(
                f"{d} {o:+g} s" for d, o in sorted(self.clocks.items())))
        for run in self.fault_runs:
            self._say(f"fault planned: {run.fault}")

    def _learn(self, site: Any) -> None:
        for name in DESTINATIONS:
            cfg = site.sinks.get(name)
            if cfg is None:
                raise ValueError(f"the demo site has no sink {name!r}")
            if name in RECEIVERS and not isinstance(cfg, HttpSinkConfig):
                raise ValueError(f"the demo site's sink {name!r} is not an http sink")
            self.types[name] = set(cfg.event_types) if cfg.event_types is not None else None
        self.counting_rules = {r.name for r in site.rules if getattr(r, "kind", None) == "count"}
        devices: dict[str, list[str]] = {}
        for dev_id, dev in site.devices.items():
            broker = getattr(dev.connection, "broker", None)
            kind = getattr(dev.connection, "kind", "?")
            devices.setdefault(f"mqtt:{broker}" if broker else f"{kind}:{dev_id}", []).append(dev_id)
        assert self.broker is not None
        self.info = _ViewInfo(
            site=site.site, broker=f"127.0.0.1:{self.broker.port}", workdir=self.workdir,
            rate=self.rate, devices=devices,
        )

    def _wait_ready(self) -> bool:
        """Until every connector is online and the agent has watched every device for a
        whole window (`AgentProc.wait_ready`): a line started then is judged in full (an
        exception about a time before a device was watched would be a gap)."""
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

    def _wait_online(self, connector: str, timeout_secs: float) -> bool:
        """Until the agent reports `connector` online."""
        assert self.agent is not None
        deadline = time.monotonic() + timeout_secs
        while not self.signals.stop:
            st = self.agent.status() or {}
            if st.get("pid") == self.agent.pid:
                if st.get("connectors", {}).get(connector, {}).get("state") == "online":
                    return True
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the agent's {connector} was not online within {timeout_secs:.0f} s; "
                    f"see {self.agent.log_path}"
                )
            time.sleep(0.05)
        return False

    def _wait_polled(self, connector: str) -> bool:
        """Until the agent polled `connector` a few times (it knows the counters by then)."""
        assert self.agent is not None
        deadline = time.monotonic() + MODBUS_CW_READY_SECS
        while not self.signals.stop:
            st = self.agent.status() or {}
            if st.get("pid") == self.agent.pid:
                c = st.get("connectors", {}).get(connector, {})
                if c.get("state") == "online" and c.get("polls", 0) >= MODBUS_CW_READY_POLLS:
                    return True
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the agent did not poll {connector} within {MODBUS_CW_READY_SECS:.0f} s; "
                    f"see {self.agent.log_path}"
                )
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Stop every child still running; safe to call at any point, and more than once."""
        if self._closed:
            return
        self._closed = True
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.line is not None:
            steps.append(("line", self.line.stop))
        if self.line2 is not None:
            steps.append((f"line of {STATION2.name}", self.line2.stop))
        if self.agent is not None and (agent_proc := self.agent.proc) is not None:
            steps.append(("agent", lambda: stop_process(agent_proc, AGENT_STOP_SECS)))
        steps += [(f"{s.kind} simulator", s.stop) for s in self.sims.values()]
        if self.sorter is not None:
            steps.append(("sorter", self.sorter.stop))
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
                (f"   {self._fault_line}" if self._fault_line else "", "yellow"),
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
        cartons = self.truth.poll() + (self.truth2.poll() if self.truth2 is not None else 0)
        self._watch_bus()
        if st is not None:
            for name, c in st["connectors"].items():
                if name.startswith("modbus:"):
                    self.modbus[name] = c
            received = sum(c.get("received", 0) for c in st["connectors"].values())
            self.rates.add(st["time"], st["engine"]["business_events"], received, cartons)
        self._sample = _Sample(
            status=st, backlog=self._backlog, cartons=cartons,
            events_per_s=self.rates.rate(1), messages_per_s=self.rates.rate(2),
            cartons_per_s=self.rates.rate(3), spark=list(self.rates.spark),
            picks={t: len(ids) for t, ids in self._pick_ids.items()}, last_fault=self._last_fault,
        )
        return self._sample

    def _watch_bus(self) -> None:
        """The pick and fault events the bus carried since the last call (they are rare)."""
        if self.bus is None:
            return
        with self.bus.lock:
            new = self.bus.events[self._bus_seen:]
            self._bus_seen += len(new)
        self._sorter_seen.update(sorter_received(new, types=SORTER_TYPES))
        for ev in new:
            ids = self._pick_ids.get(ev.get("type", ""))
            if ids is None or ev["id"] in ids:
                continue
            ids.add(ev["id"])
            if ev["type"] == "equipment_fault":
                self._last_fault = (time.time(), str((ev.get("data") or {}).get("reason")))

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
            if dead := [s for s in self.sims.values() if s.proc.poll() is not None]:
                self.problems.append(
                    f"the {dead[0].kind} simulator exited unexpectedly ({dead[0].proc.returncode}); "
                    f"see {dead[0].log_path}"
                )
                break
            if (rc := self.line.proc.poll()) is not None:
                self.problems.append(
                    f"the carton line exited unexpectedly ({rc}); see {self.line.log_path}"
                )
                break
            if self.line2 is not None and (rc := self.line2.proc.poll()) is not None:
                self.problems.append(
                    f"the line of {STATION2.name} exited unexpectedly ({rc}); "
                    f"see {self.line2.log_path}"
                )
                break
            if self.sorter is not None and (rc := self.sorter.proc.poll()) is not None:
                self.problems.append(
                    f"the OPC UA sorter exited unexpectedly ({rc}); see {self.sorter.log_path}"
                )
                break
            self._step_faults()
            self._tick()

    # --- faults ------------------------------------------------------------------------------

    def _fault_say(self, run: _FaultRun, msg: str) -> None:
        ran = time.monotonic() - (self.line_started or self.started)
        line = f"[{ran:7.1f}s] fault {run.fault}: {msg}"
        log.warning("%s", line)  # injected on purpose, but a disturbance all the same
        if self.interactive:
            self._fault_line = line  # shown in the header: a print would tear the live view
        else:
            self._say(line)

    def _step_faults(self) -> None:
        """Begin the faults that are due and move the ones under way on (never blocks for
        long: the view keeps refreshing)."""
        if self.line_started is None:
            return
        now = time.monotonic()
        for run in self.fault_runs:
            if run.step == "done":
                continue
            if run.step == "pending":
                if now - self.line_started < run.fault.at_secs:
                    continue
                run.began = now - self.line_started
            try:
                self._step_fault(run, now)
            except (RuntimeError, OSError) as exc:
                self.problems.append(f"fault {run.fault} failed: {exc}")
                run.notes.append(f"failed: {exc}")
                run.step = "done"
            if run.step == "done" and run.ended is None:
                run.ended = time.monotonic() - self.line_started

    def _step_fault(self, run: _FaultRun, now: float) -> None:
        f = run.fault
        if f.kind == "broker-outage":
            assert isinstance(self.broker, Mosquitto)
            if run.step == "pending":
                self._fault_say(run, f"stopping the broker for {f.down_secs:g} s")
                self.broker.stop()  # a clean stop: mosquitto saves sessions and queues
                run.step, run.until = "down", time.monotonic() + f.down_secs
            elif now >= run.until:
                self.broker.start()
                self._fault_say(run, f"broker back on port {self.broker.port}")
                run.step = "done"
        elif f.device in self.sims:
            if run.step == "pending":
                reset = f.kind == "power-cycle"
                self._fault_say(run, f"{f.device} {'loses power' if reset else 'restarts'}, "
                                     f"down {f.down_secs:g} s")
                self.sims[f.device].restart(f.down_secs, reset=reset)
                run.step, run.until = "down", now + f.down_secs
            elif now >= run.until:
                self._fault_say(run, f"{f.device} is back")
                run.step = "done"
        else:
            self._step_sorter_restart(run, now)

    def _step_sorter_restart(self, run: _FaultRun, now: float) -> None:
        """Restart the OPC UA sorter losing nothing: induct stopped, belt empty, the agent has
        every event of it, restart, induct again once the agent is subscribed again.

        A server restart drops the notifications it had queued but not yet published (the
        agent reports a counter gap and the events in it are unseen), so this waits for what
        a restart would lose to be delivered first."""
        sorter = self.sorter
        assert sorter is not None and self.agent is not None
        f = run.fault

        def late(what: str) -> None:
            run.notes.append(what)
            self.notes.append(f"fault {f}: {what}")

        if run.step == "pending":
            self._fault_say(run, "induct stopped until the belt is empty")
            sorter.pause()
            run.step, run.until = "emptying", now + SORTER_STOP_SECS
        elif run.step == "emptying":
            if not sorter.done(0) and now < run.until:
                return
            if now >= run.until:
                late(f"the belt was not empty after {SORTER_STOP_SECS:g} s")
            run.mark = sorter.answers("TRUTH")
            sorter.write_truth()
            run.step, run.until = "truth", now + SORTER_STOP_SECS
        elif run.step == "truth":
            if sorter.answers("TRUTH") > run.mark:
                truth = sorter.truth() or []
                self._sorter_want = set(sorter_expected(truth))
                run.step, run.until = "catching-up", now + SORTER_CATCH_UP_SECS
            elif now >= run.until:
                late("the sorter did not write its ground truth; restarting anyway")
                self._sorter_want = set()
                run.step = "catching-up"
        elif run.step == "catching-up":
            missing = self._sorter_want - self._sorter_seen
            if missing and now < run.until:
                return
            if missing:
                late(f"{len(missing)} sorter events were not on the bus "
                     f"{SORTER_CATCH_UP_SECS:g} s after the belt was empty; restarting anyway")
            st = self.agent.status() or {}
            run.mark = int(st.get("connectors", {}).get(f"opcua:{SORTER}", {}).get("restarts", 0))
            run.answered = sorter.answers("RESTARTED")
            self._fault_say(run, f"belt empty, the agent has its {len(self._sorter_want):,} "
                                 f"events: restarting the server, down {f.down_secs:g} s")
            sorter.restart(f.down_secs)
            run.step, run.until = "restarting", now + f.down_secs + SORTER_BACK_SECS
        elif run.step == "restarting":
            st = self.agent.status() or {}
            c = st.get("connectors", {}).get(f"opcua:{SORTER}", {})
            back = (sorter.answers("RESTARTED") > run.answered and c.get("restarts", 0) > run.mark
                    and c.get("state") == "online")
            if not back and now < run.until:
                return
            if not back:
                late(f"the agent was not subscribed again {SORTER_BACK_SECS:g} s after the "
                     f"restart; induct opened anyway")
            self._fault_say(run, "the agent is subscribed again: induct open")
            sorter.go()
            run.step = "done"

    def _end_faults(self) -> None:
        """The run ends: a broker still down comes back (the agent must drain)."""
        for run in self.fault_runs:
            if run.step == "pending":
                run.notes.append("not begun: the run ended first")
                run.step = "done"
            elif run.step != "done":
                if run.fault.kind == "broker-outage" and isinstance(self.broker, Mosquitto):
                    try:
                        self.broker.start()
                        self._fault_say(run, "broker back (the run ends)")
                    except RuntimeError as exc:
                        self.problems.append(f"the broker did not start again: {exc}")
                run.notes.append(f"cut short in step {run.step!r} by the end of the run")
                run.step = "done"
                if self.line_started is not None:
                    run.ended = time.monotonic() - self.line_started

    # --- stopping ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._end_faults()
        self.modbus_at_stop = {n: c.get("state") for n, c in self.modbus.items()}
        st = self._sample.status or {}
        self.sorter_at_stop = st.get("connectors", {}).get(f"opcua:{SORTER}", {}).get("state")
        for sim in self.sims.values():
            sim.quiet()  # no more presses or jams: what was pressed is still acknowledged
        if self.sorter is not None:
            self.sorter.pause()  # no more inducts: the cartons on the belt finish
        if self.line2 is not None and self.line2.proc.poll() is None:
            self.line2.proc.terminate()  # it finishes the cartons it started
        if self.line is not None:
            self._phase = "stopping the line (it finishes the cartons it started)"
            if isinstance(self.line, _ModbusLineProc):
                self._wait_done(self.line)
            else:
                self._wait_exit("carton line", self.line.proc, LINE_STOP_SECS)
            self.line_stopped = time.monotonic()
            if self.line.proc.returncode not in (None, 0, -signal.SIGKILL):
                self.notes.append(
                    f"the carton line exited with {self.line.proc.returncode} (publishes the "
                    f"broker did not acknowledge?); see {self.line.log_path}"
                )
        if self.line2 is not None:
            self._phase = f"stopping the line of {STATION2.name}"
            self._wait_done(self.line2, terminate=False)
        if self.sorter is not None:
            self._wait_sorter(self.sorter)
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
        if self.sorter is not None:
            # Stopped after the agent settled: it writes its ground truth on SIGTERM.
            self._phase = "stopping the sorter"
            self._wait_exit("sorter", self.sorter.proc, SORTER_STOP_SECS)

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
                None if st is None else sum(
                    c.get("received", 0) + c.get("notifications", 0)
                    for c in st["connectors"].values()
                ),
            )
            if counts != last:
                last, quiet_since = counts, now
            open_keys = None if st is None else sum(
                n for rule, n in st["engine"]["open_keys"].items()
                if rule not in self.counting_rules
            )
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

    def _wait_sorter(self, sorter: _SorterProc) -> None:
        """Until every carton on the sorter's belt reached its final disposition."""
        self._phase = "stopping the sorter's induct (the cartons on the belt finish)"
        deadline = time.monotonic() + SORTER_STOP_SECS
        while not sorter.done(REFRESH_SECS / 2):
            if self.signals.hurry or time.monotonic() > deadline:
                why = "the shutdown was hurried" if self.signals.hurry else (
                    f"after {SORTER_STOP_SECS:.0f} s")
                self.notes.append(f"the sorter's belt was not empty at stop ({why})")
                return
            self._poll()
            self._refresh()

    def _wait_done(self, line: _ModbusLineProc, *, terminate: bool = True) -> None:
        """SIGTERM (unless sent already) and wait until its last carton is weighed; its
        checkweigher stays up."""
        if terminate and line.proc.poll() is None:
            line.proc.terminate()
        deadline = time.monotonic() + LINE_STOP_SECS
        while not line.done(REFRESH_SECS / 2):
            if self.signals.force or time.monotonic() > deadline:
                why = "on a third Ctrl-C" if self.signals.force else f"after {LINE_STOP_SECS:.0f} s"
                self.notes.append(f"the carton line was killed {why}")
                kill_process(line.proc)
                return
            self._refresh()

    def _wait_exit(self, what: str, proc: subprocess.Popen[bytes], timeout_secs: float) -> None:
        """SIGTERM and wait, refreshing the view; SIGKILL on timeout or a third signal."""
        if proc.poll() is None:
            proc.terminate()
        deadline = time.monotonic() + timeout_secs
        while proc.poll() is None:
            if self.signals.force or time.monotonic() > deadline:
                why = "on a third Ctrl-C" if self.signals.force else f"after {timeout_secs:.0f} s"
                self.notes.append(f"the {what} was killed {why}")
                kill_process(proc)
                return
            self._refresh()
            time.sleep(REFRESH_SECS / 2)

    # --- accounting --------------------------------------------------------------------------

    def _account(self) -> _Outcome:
        cartons = self.truth.load() + (self.truth2.load() if self.truth2 is not None else [])
        received: dict[str, list[dict[str, Any]]] = {}
        for name, r in self.receivers.items():
            try:
                doc = r.received()
                received[name] = merge_deliveries(doc["events"], doc.get("redelivered", []))
            except Exception as exc:
                self.problems.append(f"could not read what the {name} received: {exc!r}")
                received[name] = []
        if self.bus is not None:
            with self.bus.lock:
                received[BUS] = list(self.bus.events)
        else:
            received[BUS] = []
        ledger = self._ledger(cartons, received)
        picks: dict[str, Counter[str]] = {}
        for name in DESTINATIONS:
            unique = {e["id"]: e["type"] for e in received[name] if e.get("type") in PICK_TYPES}
            picks[name] = Counter(unique.values())
        by_type = (self.outbox.events_by_type() if self.outbox else None) or {}
        deliveries = (self.outbox.deliveries() if self.outbox else None) or {}
        st = self.agent.status() if self.agent else None
        eng = (st or {}).get("engine", {})
        started = self.line_started or time.monotonic()
        return _Outcome(
            cartons=cartons,
            received=received,
            ledger=ledger,
            events_by_type=by_type,
            delivered={n: deliveries.get(n, Counter())[1] for n in DESTINATIONS},
            dead={n: deliveries.get(n, Counter())[2] for n in DESTINATIONS},
            bad_payloads=sum(eng.get("bad_payloads", {}).values()),
            picks=picks,
            sims={d: sim.stats() for d, sim in self.sims.items()},
            modbus={
                n: {**c, "state_at_stop": self.modbus_at_stop.get(n)}
                for n, c in sorted(self.modbus.items())
            },
            ran_secs=(self.line_stopped or time.monotonic()) - started,
            checkweigher=self.checkweigher,
            sorter=None if self.sorter is None else sorter_outcome(
                self.sorter.truth(), received["wms"], self.sorter_at_stop),
            problems=self.problems,
            notes=self.notes,
            faults=[run.to_json() for run in self.fault_runs],
            clocks=self.clocks,
        )

    def _ledger(self, cartons: list[dict[str, Any]],
                received: dict[str, list[dict[str, Any]]]) -> Ledger:
        """One ledger of every sink: the closing line's cartons, the sorter's finished
        cartons, the pick-to-light presses and the conveyor's stops are the facts."""
        facts = carton_facts(cartons)
        out_of_scope: list[Callable[[dict[str, Any]], bool]] = []
        if self.sorter is not None:
            truth = self.sorter.truth()
            if truth is None:
                self.problems.append("the sorter's ground truth could not be read")
                out_of_scope.append(lambda e: e.get("type") in SORTER_TYPES)
            else:
                facts += sorter_facts(truth)
                out_of_scope.append(sorter_unfinished(truth))
        for device, sim in self.sims.items():
            done = sim.truth()
            if done is None:
                self.problems.append(f"the {device} simulator's ground truth could not be read")
            elif sim.kind == "pick_to_light":
                # A press a power cycle wiped before its acknowledge: no fact (the agent may
                # or may not have read it before the power went), so out of scope.
                lost = {(str(p["location"]), p.get("seq")) for p in done if p.get("lost")}
                facts += press_facts([p for p in done if not p.get("lost")])
                if lost:
                    out_of_scope.append(lambda e, lost=lost: (
                        e.get("type") in ("pick_confirmed", "pick_short")
                        and (str((e.get("data") or {}).get("location")),
                             (e.get("data") or {}).get("press_seq")) in lost))
            else:
                facts += fault_facts(done)
        return account(
            facts, received, types={n: self.types.get(n) for n in DESTINATIONS},
            ignore=lambda e: any(f(e) for f in out_of_scope),
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


def _modbus_lines(o: _Outcome) -> list[Text]:
    """The Modbus devices, and the pick and fault events they made, per destination."""
    lines = []
    if o.modbus:
        parts = []
        for name, c in o.modbus.items():
            state = c.get("state_at_stop") or c.get("state") or "-"
            parts.append(
                f"{name.split(':', 1)[-1]} {state} (polls {c.get('polls', 0):,}, "
                f"restarts {c.get('restarts', 0)})"
            )
        style = "" if all((c.get("state_at_stop") or c.get("state")) == "online"
                          for c in o.modbus.values()) else "yellow"
        lines.append(Text("  modbus devices      " + ", ".join(parts), style=style))
    lines.append(Text("  pick/fault events   " + "; ".join(
        f"{n} " + (", ".join(f"{t} {o.picks.get(n, Counter())[t]:,}" for t in PICK_TYPES)
                   if o.picks.get(n) else "none")
        for n in DESTINATIONS
    )))
    ptl = o.sims.get("PTL1")
    if ptl is not None:
        presses = ptl.get("confirm", 0) + ptl.get("short", 0)
        got = o.picks.get("wms", Counter())
        delivered = got["pick_confirmed"] + got["pick_short"]
        line = Text(
            f"  pick-to-light PTL1  {presses:,} presses (confirm {ptl.get('confirm', 0):,}, "
            f"short {ptl.get('short', 0):,}"
            + (f", {ptl['ignored']:,} ignored while unacknowledged" if ptl.get("ignored") else "")
            + (f", {ptl['lost']:,} lost in a power cycle before their acknowledge"
               if ptl.get("lost") else "")
            + "): "
        )
        presses -= ptl.get("lost", 0)
        # The presses are facts of the ledger: each one must be a pick event everywhere.
        rows = [o.ledger.rows.get(("wms", t)) for t in ("pick_confirmed", "pick_short")]
        if all(r is None or r.exact for r in rows):
            line.append(f"{delivered:,} pick events at wms, as many as presses (see the ledger)",
                        style="green" if delivered == presses else "yellow")
        else:
            line.append(f"{delivered:,} pick events at wms: see the ledger", style="yellow")
        lines.append(line)
    cw = o.modbus.get(f"modbus:{MODBUS_CW}")
    if cw is not None:
        # A weighing the agent's polls missed shows as a counter gap (and a wrong ledger).
        station = "CLOSE1" if o.checkweigher == "modbus" else STATION2.name
        weighed = sum(1 for c in o.cartons
                      if c.get("station") == station and c.get("outcome") != "missing_weight")
        gaps = sum((cw.get("counter_gaps") or {}).values())
        lines.append(Text(
            f"  checkweigher {MODBUS_CW}    {weighed:,} weighings on Modbus, "
            f"{gaps:,} missed by the agent (counter gaps)",
            style="" if gaps == 0 else "yellow",
        ))
    conv = o.sims.get("CONV1")
    if conv is not None:
        conv = {k: n for k, n in conv.items() if k in FAULT_NAMES.values()}
        stops = sum(conv.values())
        faults = o.picks.get("wms", Counter())["equipment_fault"]
        lines.append(Text(
            f"  conveyor CONV1      {stops:,} stop{'s' if stops != 1 else ''}"
            + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(conv.items())) + ")" if stops else "")
            + f": {faults:,} equipment_fault at wms",
            style="" if faults == stops else "yellow",
        ))
    return lines


def _sorter_lines(o: _Outcome) -> list[Text]:
    """The OPC UA sorter: what it did (its events against its plan are in the ledger)."""
    so = o.sorter
    if so is None:
        return []
    state = so.state_at_stop or "-"
    lines = [Text(
        f"  sorter {SORTER}      {so.inducted:,} cartons inducted ({so.done:,} finished at "
        f"stop), {so.at_wms['carton_sorted']:,} carton_sorted, "
        f"{so.at_wms['sort_exception']:,} sort_exception at wms ({state} at stop)",
        style="" if state == "online" else "yellow",
    )]
    if not so.truth_read:
        lines.append(Text("  sorter vs its plan  the sorter's ground truth could not be read",
                          style="bold red"))
    return lines


def ledger_lines(ledger: Ledger) -> list[Text]:
    """The ledger as a table: a row per sink and event type, then the sink's total."""
    lines = [Text("  ledger              per sink and event type, every delivery against the "
                  "simulators' ground truth (the cartons, the sorter's finished cartons, the "
                  "presses and the conveyor's stops):")]
    text = ledger.lines()
    lines.append(Text("    " + text[0], style="bold"))
    for row, line in zip(ledger.table(), text[1:], strict=True):
        bad = any(row[i] != "0" for i in (4, 5, 6, 8))  # wrong, missing, invented, dup facts
        style = "red" if bad else ("bold" if row[1] == "total" else "")
        lines.append(Text("    " + line, style=style))
    for example in ledger.examples(limit=8, categories=("wrong", "missing", "invented",
                                                         "dup_facts")):
        lines.append(Text(f"    {example}", style="red"))
    return lines


def summary_lines(o: _Outcome, *, rate: float, workdir: Path) -> list[Text]:
    """The end-of-run report: what was simulated, emitted, delivered, and the ledger."""
    outcomes = Counter(c.get("outcome", "?") for c in o.cartons)
    stations = Counter(str(c.get("station", "?")) for c in o.cartons)
    total_events = sum(o.events_by_type.values())
    lines = [
        Text(f"edge-agent demo summary: the line ran {o.ran_secs:.1f} s at {rate:g} cartons/s "
             f"(workdir {workdir})", style="bold"),
        Text(f"  cartons simulated   {len(o.cartons):,}  ("
             + ", ".join(f"{k} {n:,}" for k, n in sorted(outcomes.items())) + ")"),
        *([Text("  stations            " + ", ".join(
            f"{name} {n:,}" for name, n in sorted(stations.items())))] if len(stations) > 1 else []),
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
        *_modbus_lines(o),
        *_sorter_lines(o),
        *ledger_lines(o.ledger),
    ]
    for f in o.faults:
        began, ended = f.get("began_secs"), f.get("ended_secs")
        when = ("not begun" if began is None else
                f"from {began:.1f} s to {ended:.1f} s of the run" if ended is not None else
                f"from {began:.1f} s of the run")
        lines.append(Text(f"  fault               {f['fault']}: {when}"
                          + "".join(f"; {n}" for n in f.get("notes", [])),
                          style="yellow" if f.get("notes") else ""))
    if o.clocks:
        lines.append(Text("  device clocks       " + ", ".join(
            f"{d} {off:+g} s" for d, off in sorted(o.clocks.items()))))
    lines += [Text(f"  note: {n}", style="yellow") for n in o.notes]
    lines += [Text(f"  problem: {p}", style="bold red") for p in o.problems]
    dests = ", ".join(DESTINATIONS[:-1]) + f" and {DESTINATIONS[-1]}"
    t = o.ledger.total()
    if o.ok:
        lines.append(Text(
            f"result: exactly once at {dests}: {t.delivered:,} facts delivered, none missing, "
            f"wrong, invented or duplicated ({t.dup_deliveries:,} redeliveries of the same id)",
            style="bold green",
        ))
    elif not o.ledger.exactly_once:
        bad = [n for n in DESTINATIONS if not o.ledger.sink_ok(n)]
        lines.append(Text(
            f"result: NOT exactly once at {', '.join(bad)}: missing {t.missing:,}, wrong "
            f"{t.wrong:,}, invented {t.invented:,}, duplicate facts {t.dup_facts:,}; "
            f"logs in {workdir}",
            style="bold red",
        ))
    else:
        lines.append(Text(
            f"result: the ledger balances, but the run had problems (above); logs in {workdir}",
            style="bold red",
        ))
    return lines


LEDGER_FILE = "ledger.json"


def ledger_document(o: _Outcome, *, rate: float) -> dict[str, Any]:
    """The run's outcome, machine-readable (``<workdir>/ledger.json``): the ledger's rows
    per sink and event type (and each sink's total), the verdict, what was simulated and
    the faults injected."""
    rows = []
    for (sink, type_), r in sorted(o.ledger.rows.items()):
        rows.append(_row_json(r, sink, type_))
    rows += [_row_json(o.ledger.total(sink), sink, "total") for sink in o.ledger.sinks]
    ptl = o.sims.get("PTL1", {})
    return {
        "ok": o.ok,
        "exactly_once": o.ledger.exactly_once,
        "verdict": o.ledger.verdict(),
        "rate": rate,
        "ran_secs": round(o.ran_secs, 3),
        "cartons": len(o.cartons),
        "stations": dict(Counter(str(c.get("station", "?")) for c in o.cartons)),
        "carton_outcomes": dict(Counter(c.get("outcome", "?") for c in o.cartons)),
        "events_by_type": o.events_by_type,
        "delivered": o.delivered,
        "dead": o.dead,
        "bad_payloads": o.bad_payloads,
        "presses": {"confirm": ptl.get("confirm", 0), "short": ptl.get("short", 0),
                    "lost": ptl.get("lost", 0), "ignored": ptl.get("ignored", 0)},
        "pick_events": {n: dict(c) for n, c in o.picks.items()},
        "sims": o.sims,
        "modbus": {n: {k: c.get(k) for k in ("state", "state_at_stop", "polls", "restarts",
                                             "counter_gaps")} for n, c in o.modbus.items()},
        "sorter": None if o.sorter is None else {
            "inducted": o.sorter.inducted, "done": o.sorter.done,
            "truth_read": o.sorter.truth_read, "state_at_stop": o.sorter.state_at_stop},
        "faults": o.faults,
        "clocks": o.clocks,
        "rows": rows,
        "examples": o.ledger.examples(limit=50, categories=("wrong", "missing", "invented",
                                                            "dup_facts")),
        "ignored": o.ledger.ignored,
        "notes": o.notes,
        "problems": o.problems,
    }


def _row_json(r: Any, sink: str, type_: str) -> dict[str, Any]:
    return {"sink": sink, "type": type_, "expected": r.expected, "received": r.received,
            "delivered": r.delivered, "wrong": r.wrong, "missing": r.missing,
            "invented": r.invented, "dup_deliveries": r.dup_deliveries,
            "dup_facts": r.dup_facts, "precision": r.precision, "recall": r.recall}


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


def run_demo(*, rate: float, seconds: float, workdir: Path, checkweigher: str = "mqtt",
             faults: list[str] | None = None, clocks: list[str] | None = None,
             modbus_station: bool = True, sorter_rate: float = SORTER_RATE,
             live: bool | None = None) -> int:
    """Run the demo; 0 when every carton is accounted for everywhere, 1 when not, 2 when it
    cannot run here (no mosquitto, bad arguments, a work directory it must not wipe).

    ``checkweigher="modbus"``: the packing station's weights come from a Modbus checkweigher
    (CW2) instead of MQTT (CW1), and the line runs at most at its rate (a few cartons/s);
    else ``modbus_station`` adds a second station CLOSE2 weighing on the Modbus CW2.
    ``faults``: `Fault` specs (``edge-agent demo --help``); ``clocks``: ``DEVICE=SECS`` offsets of the
    carton line's device clocks; ``live``: the live view (None: when stdout is a terminal),
    else plain progress lines. The outcome is also written to ``<workdir>/ledger.json``.
    """
    if rate <= 0 or sorter_rate <= 0:
        print(f"edge-agent demo: --rate and --sorter-rate must be > 0, got {rate:g} and "
              f"{sorter_rate:g}", file=sys.stderr)
        return 2
    try:
        fault_list = [Fault.parse(f) for f in faults or []]
        clock_offsets = parse_clocks(list(clocks or []))
    except ValueError as exc:
        print(f"edge-agent demo: {exc}", file=sys.stderr)
        return 2
    embedded = find_mosquitto() is None or os.environ.get("EDGE_AGENT_DEMO_BROKER") == "amqtt"
    if embedded and any(f.kind == "broker-outage" for f in fault_list):
        print("edge-agent demo: a broker outage needs mosquitto (the embedded broker keeps no "
              "sessions across a restart)", file=sys.stderr)
        return 2
    if checkweigher not in CHECKWEIGHERS:
        print(f"edge-agent demo: --checkweigher must be one of {', '.join(CHECKWEIGHERS)}, "
              f"got {checkweigher!r}", file=sys.stderr)
        return 2
    if checkweigher == "modbus":
        from simulators.modbus_line import MAX_RATE_PER_S

        if rate > MAX_RATE_PER_S:
            # A counter trigger sees one weighing per poll at most: weighings closer than a
            # few polls would be missed (a counter gap), and their cartons not accounted for.
            print(
                f"edge-agent demo: the Modbus checkweigher weighs at most {MAX_RATE_PER_S:g} "
                f"cartons/s (the agent polls its weighing counter every 50 ms): the line "
                f"runs at {MAX_RATE_PER_S:g} cartons/s instead of {rate:g}",
                flush=True,
            )
            rate = MAX_RATE_PER_S
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
    if live is None:
        live = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    signals = _Signals()
    with signals.installed(), _log_to(workdir / "demo.log"):
        demo = Demo(
            rate=rate, seconds=seconds, workdir=workdir, signals=signals,
            console=Console(highlight=False), interactive=live, checkweigher=checkweigher,
            faults=fault_list, clocks=clock_offsets,
            modbus_station=modbus_station and checkweigher == "mqtt", sorter_rate=sorter_rate,
        )
        try:
            return demo.run()
        finally:
            # On any way out (an error, a signal): every child stopped, with its tree.
            demo.close()
            for left in stop_all():
                print(f"edge-agent demo: stopped a process left running: {left}",
                      file=sys.stderr, flush=True)
