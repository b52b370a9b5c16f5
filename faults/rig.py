"""One scenario's rig: a real mosquitto, two stand-in receivers (WMS, ERP), a bus subscriber,
the real agent process (``edge-agent run``) on a site file written here, the fault suite's own
device publisher, and a monitor thread.

Owns starting and stopping all of them (``close()`` stops every process it started, whatever
happened) and the record of what a scenario did to them: the fault windows (which justify a
re-send to a sink), the agent's exits other than our kill -9s (each restarted after a second,
as systemd's ``Restart=always`` would), peak RSS and the outbox's largest size on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from simulators.broker import Mosquitto
from simulators.bus_recorder import BusRecorder
from simulators.procs import PROFILES, AgentProc, ReceiverProc

from .ledger import (
    SINK_TYPES,
    Delivery,
    FactBook,
    LedgerResult,
    Window,
    account,
    deliveries_from_bus,
    deliveries_from_receiver,
    expected,
)
from .publisher import CHECKWEIGHER, SCANNER, DevicePublisher

SINKS = ("wms", "erp", "bus")
RESTART_DELAY_SECS = 1.0  # systemd RestartSec of the shipped unit


def site_yaml(*, site: str, broker_port: int, wms_url: str, erp_url: str, outbox_path: Path,
              max_disk_mb: int = 2048, http_timeout_secs: float = 10,
              max_backoff_ms: int = 60000, extra_outbox: str = "", devices: str = "",
              rules: str = "", wms_types: tuple[str, ...] = ()) -> str:
    """The site every scenario runs: one carton-closing station, WMS, ERP and the bus; a
    scenario may add ``devices`` and ``rules`` (YAML lines at their level) and event types
    for the WMS (``wms_types``)."""
    types = ", ".join(("carton_scanned", "carton_closed", "carton_exception", "scan_no_read",
                       *wms_types))
    return f"""\
site: {site}
profiles_dir: {PROFILES}
brokers:
  local: {{host: 127.0.0.1, port: {broker_port}, protocol: "5"}}
devices:
  {SCANNER}:
    profile: generic_json_scanner
    connection: {{kind: mqtt, broker: local, topic_base: site/faults/scanner/{SCANNER}}}
  {CHECKWEIGHER}:
    profile: generic_json_checkweigher
    connection: {{kind: mqtt, broker: local, topic_base: site/faults/checkweigher/{CHECKWEIGHER}}}
{devices}rules:
  - name: close
    kind: correlate
    key: tracking_id
    window_secs: 5
    inputs:
      scan: {{device: {SCANNER}, event: read}}
      weight: {{device: {CHECKWEIGHER}, event: weight}}
    emit:
      type: carton_closed
      subject: ${{scan.barcode}}
      data: {{carton_id: "${{scan.barcode}}", tracking_id: "${{key}}", weight_g: "${{weight.weight_g}}"}}
    terminate_on:
      - input: scan
        when: {{field: barcode, in: ["NOREAD", ""]}}
        emit:
          type: scan_no_read
          subject: ${{key}}
          data: {{tracking_id: "${{key}}"}}
    on_timeout:
      type: carton_exception
      subject: ${{key}}
      reasons: {{weight: no_weight, scan: no_scan}}
      data: {{tracking_id: "${{key}}", reason: "${{reason}}"}}
  - name: scanned
    kind: map
    inputs:
      scan: {{device: {SCANNER}, event: read}}
    emit:
      type: carton_scanned
      subject: ${{scan.tracking_id}}
      data: {{tracking_id: "${{scan.tracking_id}}", barcode: "${{scan.barcode}}"}}
{rules}sinks:
  wms:
    kind: http
    url: {wms_url}
    mode: batch
    timeout_secs: {http_timeout_secs}
    retry: {{max_backoff_ms: {max_backoff_ms}}}
    event_types: [{types}]
  erp:
    kind: http
    url: {erp_url}
    mode: batch
    timeout_secs: {http_timeout_secs}
    retry: {{max_backoff_ms: {max_backoff_ms}}}
    event_types: [carton_closed]
  bus:
    kind: mqtt
    broker: local
    prefix: edge/{{site}}
outbox:
  path: {outbox_path}
  max_disk_mb: {max_disk_mb}
{extra_outbox}"""


@dataclass
class Exit:
    at: float
    code: int | None
    log_tail: str


@dataclass
class Samples:
    peak_rss_mb: float = 0.0
    max_disk_mb: float = 0.0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    disk_mb: list[tuple[float, float]] = field(default_factory=list)
    paused_seen: bool = False
    pause_causes: set[str] = field(default_factory=set)  # every cause the status named
    min_free_mb: float = float("inf")  # lowest free space seen on the outbox's filesystem


class Rig:
    def __init__(self, workdir: Path, *, name: str, rate: float, outbox_dir: Path | None = None,
                 seed: int = 1, clock_offset: Any = None,
                 offline_at_start: frozenset[str] = frozenset(), **site: Any):
        self.workdir = workdir
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.windows: list[Window] = []
        self.exits: list[Exit] = []
        self.kills = 0
        self.samples = Samples()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._expect_down = False
        self._stop = threading.Event()
        self._started: list[Any] = []
        self.broker = self._own(Mosquitto(workdir=workdir / "broker", persistent=True).start())
        self.wms = self._own(ReceiverProc("wms", workdir))
        self.erp = self._own(ReceiverProc("erp", workdir))
        self.site = f"faults-{name.replace('_', '-')}"
        self.outbox_dir = outbox_dir or workdir / "var"
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        self.db = self.outbox_dir / "edge-agent.db"
        self.max_disk_mb = int(site.get("max_disk_mb", 2048))
        self.config = workdir / "site.yaml"
        self.config.write_text(site_yaml(
            site=self.site, broker_port=self.broker.port, wms_url=self.wms.url,
            erp_url=self.erp.url, outbox_path=self.db, **site))
        self.bus = BusRecorder(self.broker.host, self.broker.port, f"edge/{self.site}/events/#",
                               "5", client_id=f"fault-bus-{self.site}")
        self._started.append(self.bus)
        self.agent = AgentProc(self.config, workdir)
        self.publisher: DevicePublisher | None = None
        self.rate = rate
        self.seed = seed
        self.clock_offset = clock_offset
        # Devices the agent cannot reach when it starts (start() does not wait for them).
        self.offline_at_start = offline_at_start
        self.started_at = 0.0  # when start() started the agent
        # What the scenario set up besides the rig (e.g. faults.devices), and the facts of
        # devices other than the publisher's (counted by settle() and the ledger).
        self.extra: dict[str, Any] = {}
        self.facts: Callable[[], FactBook] | None = None
        self._monitor = threading.Thread(target=self._watch, name="fault-monitor", daemon=True)

    def _own(self, thing: Any) -> Any:
        self._started.append(thing)
        return thing

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, ready_timeout_secs: float = 90) -> Rig:
        self.started_at = time.time()
        if self.offline_at_start:
            self.agent.start()
            self.wait_ready(ready_timeout_secs, skip=self.offline_at_start)
        else:
            self.agent.start().wait_ready(ready_timeout_secs)
        self._monitor.start()
        self.publisher = DevicePublisher(self.broker.host, self.broker.port,
                                         tag=f"{self.name[:6]}{os.getpid() % 1000}",
                                         rate=self.rate, seed=self.seed,
                                         clock_offset=self.clock_offset)
        return self

    def wait_ready(self, timeout_secs: float, *, skip: frozenset[str]) -> dict[str, Any]:
        """Like ``AgentProc.wait_ready`` (every connector online, every device watched for a
        whole window) but for the devices not in ``skip`` (and their connectors,
        ``kind:device``)."""
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            st = self.agent.status()
            if st and st.get("pid") == self.agent.pid and all(
                    c["state"] == "online" for n, c in st["connectors"].items()
                    if n.split(":", 1)[-1] not in skip):
                eng = st.get("engine", {})
                since = [s.get("covered_since") for d, s in eng.get("sources", {}).items()
                         if d not in skip]
                if all(c is not None and st["time"] - c > eng.get("max_window_secs", 0)
                       for c in since):
                    return st
            if self.agent.proc and self.agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.agent.proc.returncode}; "
                                   f"see {self.agent.log_path}")
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready in {timeout_secs}s; see {self.agent.log_path}")

    def connector(self, name: str) -> dict[str, Any] | None:
        """One connector's status (e.g. ``modbus:CW2``) from the running agent's status
        file, with the file's time as ``at`` (None when there is no status of the running
        agent)."""
        st = self.agent.status()
        if not st or self.agent.proc is None or st.get("pid") != self.agent.pid:
            return None
        c = st["connectors"].get(name)
        return None if c is None else {**c, "at": st["time"]}

    def run_line(self) -> None:
        assert self.publisher is not None
        self.publisher.start()

    def close(self) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(10)
        errors: list[BaseException] = []
        if self.publisher is not None:
            self.publisher.close()
        try:
            self._expect_down = True
            if self.agent.proc is not None and self.agent.proc.poll() is None:
                if self.agent.proc.returncode is None:
                    try:
                        os.kill(self.agent.pid, signal.SIGCONT)  # if a scenario left it frozen
                    except ProcessLookupError:
                        pass
                self.agent.stop(30)
        except BaseException as exc:  # everything below must still stop
            errors.append(exc)
        for thing in reversed(self._started):
            try:
                thing.close() if isinstance(thing, BusRecorder) else thing.stop()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- faults ----------------------------------------------------------------------------

    def window(self, start: float, end: float, what: str, sinks: set[str] | None = None) -> None:
        self.windows.append(Window(start, end, what, None if sinks is None else frozenset(sinks)))

    def kill9(self, ready_timeout_secs: float = 90) -> float:
        """kill -9 the agent and start it again; returns seconds until it was ready."""
        with self._lock:
            self._expect_down = True
            t = time.time()
            self.agent.kill9()
            self.kills += 1
            self.window(t, t, "kill -9")
            self.agent.start()
            self._expect_down = False
        self.agent.wait_ready(ready_timeout_secs, covered=False)
        return time.time() - t

    def freeze_copy_kill(self, ready_timeout_secs: float = 90) -> float:
        """The power-cut approximation: SIGSTOP, copy the outbox files as they are, kill -9,
        put the copy back, start again."""
        with self._lock:
            self._expect_down = True
            t = time.time()
            assert self.agent.proc is not None
            os.kill(self.agent.pid, signal.SIGSTOP)
            snap = self.workdir / "powercut-copy"
            shutil.rmtree(snap, ignore_errors=True)
            snap.mkdir()
            names = [p.name for p in self.outbox_dir.iterdir()
                     if p.name.startswith(self.db.name)]
            for n in names:
                shutil.copyfile(self.outbox_dir / n, snap / n)
            self.agent.kill9()
            self.kills += 1
            for p in self.outbox_dir.iterdir():
                if p.name.startswith(self.db.name):
                    p.unlink()
            for n in names:
                shutil.copyfile(snap / n, self.outbox_dir / n)
            self.window(t, t, "power cut")
            self.agent.start()
            self._expect_down = False
        self.agent.wait_ready(ready_timeout_secs, covered=False)
        return time.time() - t

    def broker_restart(self, down_secs: float, wait: Any) -> None:
        """Stop the broker cleanly (it saves its sessions), keep it down, start it again."""
        t = time.time()
        port = self.broker.port
        self.broker.stop()
        self._started.remove(self.broker)
        wait(down_secs)
        self.broker = self._own(Mosquitto(port, workdir=self.workdir / "broker",
                                          persistent=True).start())
        self.window(t, time.time() + 5, "broker restart", {"bus"})

    # --- monitoring ------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                proc = self.agent.proc
                if proc is not None and proc.poll() is not None and not self._expect_down:
                    tail = self.agent.log()[-3000:]
                    self.exits.append(Exit(time.time(), proc.returncode, tail))
                    self.window(time.time(), time.time(), "agent exit")
                    if self._stop.wait(RESTART_DELAY_SECS):
                        return
                    self.agent.start()
                    continue
                pid = proc.pid if proc is not None else None
            self._sample(pid)

    def _sample(self, pid: int | None) -> None:
        now = time.time()
        if pid is not None:
            try:
                rss = psutil.Process(pid).memory_info().rss / 2**20
                self.samples.rss_mb.append((now, rss))
                self.samples.peak_rss_mb = max(self.samples.peak_rss_mb, rss)
            except psutil.Error:
                pass
        size = 0
        try:
            for p in self.outbox_dir.iterdir():
                if p.name.startswith(self.db.name):
                    size += p.stat().st_size
        except OSError:
            pass
        mb = size / 2**20
        self.samples.disk_mb.append((now, mb))
        self.samples.max_disk_mb = max(self.samples.max_disk_mb, mb)
        try:
            free = shutil.disk_usage(self.outbox_dir).free / 2**20
            self.samples.min_free_mb = min(self.samples.min_free_mb, free)
        except OSError:
            pass
        st = self.agent.status()
        if st and st.get("ingest_paused"):
            self.samples.paused_seen = True
            self.samples.pause_causes.update(st.get("ingest_pause") or {})

    # --- the end ---------------------------------------------------------------------------

    def stop_line(self, drain_timeout_secs: float = 120) -> None:
        assert self.publisher is not None
        self.publisher.stop(drain_timeout_secs)

    def required_counts(self) -> dict[str, int]:
        """Per sink, the facts it must hold: what is required less what its receiver was told
        to reject (dead by contract)."""
        assert self.publisher is not None
        required, _ = expected(self.publisher.cartons)
        dead = self.dead()
        book = self.facts() if self.facts is not None else None
        return {s: sum(1 for f in required if f[0] in SINK_TYPES[s]
                       and f"{f[0]}|{f[1]}" not in dead.get(s, ()))
                + (book.required_count(s) if book is not None else 0)
                for s in SINKS}

    def unique_counts(self) -> dict[str, int]:
        return {"wms": self.wms.stats()["unique"], "erp": self.erp.stats()["unique"],
                "bus": self.bus.unique()}

    def settle(self, timeout_secs: float = 180, stable_secs: float = 3.0) -> str | None:
        """Until every sink holds at least what is required, the agent has no window open and
        nothing pending, and the sinks' holdings stopped changing for ``stable_secs``; returns
        None, or why it did not settle in time."""
        want = self.required_counts()
        deadline = time.monotonic() + timeout_secs
        last: tuple[Any, ...] | None = None
        since = time.monotonic()
        why = "not checked"
        while time.monotonic() < deadline:
            got = self.unique_counts()
            dups = (self.wms.stats()["duplicates"], self.erp.stats()["duplicates"],
                    len(self.bus.deliveries()))
            snapshot = (tuple(got.values()), dups)
            if snapshot != last:
                last, since = snapshot, time.monotonic()
            why = self._unsettled(want, got)
            if why is None and time.monotonic() - since >= stable_secs:
                return None
            time.sleep(0.2)
        return why

    def _unsettled(self, want: dict[str, int], got: dict[str, int]) -> str | None:
        short = {s: f"{got[s]}/{want[s]}" for s in SINKS if got[s] < want[s]}
        st = self.agent.status()
        if st is not None and st.get("pid") == self.agent.pid:
            open_keys = sum(st["engine"]["open_keys"].values())
            if open_keys:
                return f"{open_keys} windows open"
        pending = outbox_pending(self.db)
        if pending:
            return f"outbox pending {pending}"
        if short:
            return f"sinks short of what is required: {short}"
        return None

    def holdings(self) -> dict[str, list[Delivery]]:
        out = {"wms": deliveries_from_receiver(self.wms.received()),
               "erp": deliveries_from_receiver(self.erp.received())}
        with self.bus.lock:
            events = list(self.bus.events)
            arrivals = [m["arrival"] for m in self.bus.meta]
        out["bus"] = deliveries_from_bus(events, arrivals)
        return out

    def dead(self) -> dict[str, set[str]]:
        return {s: {f"{r['type']}|{r['key']}" for r in getattr(self, s).received()["rejected"]}
                for s in ("wms", "erp")}

    def ledger(self) -> LedgerResult:
        assert self.publisher is not None
        return account(self.holdings(), self.publisher.cartons, self.windows, self.dead(),
                       self.facts() if self.facts is not None else None)


def outbox_pending(db: Path) -> dict[str, int]:
    """sink -> pending deliveries, read-only; {} when the outbox cannot be read."""
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return {}
    try:
        rows = con.execute("SELECT sink, count(*) FROM deliveries WHERE state = 0 GROUP BY sink")
        return {s: n for s, n in rows}
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def log_control_chars(text: str) -> int:
    """Lines of an agent log holding raw control characters (a peer's bytes logged raw)."""
    bad = 0
    for line in text.split("\n"):
        if any((ord(ch) < 32 and ch != "\t") or ch == "\x7f" for ch in line.rstrip("\r")):
            bad += 1
    return bad


def dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
