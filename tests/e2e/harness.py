"""The end-to-end harness: one line of real processes per test, and ground-truth checks.

Every check goes through one ledger (``simulators.ledger``): ``line.ledger(cartons)`` is
what each sink received, every delivery (repeats of an id included), against the line's
ground truth, per sink and per event type; ``assert_exact(ledger)`` fails with the table
and examples unless nothing is missing, wrong, invented or delivered under a second id.
``line.settle()`` waits (on conditions, not a fixed time) until anything late, such as a
false exception from a window closing, would have arrived.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from simulators.bus_recorder import BusRecorder
from simulators.ledger import Ledger, account, carton_facts
from simulators.procs import AgentProc, LineProc, ReceiverProc, write_site
from simulators.receiver import merge_deliveries

FRACTIONS = {
    "noread_frac": 0.03,
    "missing_weight_frac": 0.03,
    "missing_scan_frac": 0.02,
    "dup_frac": 0.05,
    "reorder_frac": 0.05,
}
WMS_TYPES = {"carton_closed", "carton_exception", "scan_no_read"}
ERP_TYPES = {"carton_closed"}
SINK_TYPES: dict[str, set[str] | None] = {"wms": WMS_TYPES, "erp": ERP_TYPES, "bus": None}
SINKS = ("wms", "erp", "bus")
SETTLE_SECS = 60  # windows close 6-12 s after the last message; generous for a loaded CI box


class Line:
    """One test's line: receivers, bus recorder, agent, config."""

    def __init__(self, broker, workdir: Path, protocol: str = "5"):
        self.broker = broker
        self.workdir = workdir
        self.protocol = protocol
        self.wms = ReceiverProc("wms", workdir)
        self.erp = ReceiverProc("erp", workdir)
        self.site = f"e2e-{workdir.name[-20:].replace('_', '-').strip('-')}"
        self.config = write_site(
            workdir, broker_port=broker.port, wms_url=self.wms.url, erp_url=self.erp.url,
            protocol=protocol, replace={"site: dc-demo-1": f"site: {self.site}"},
        )
        self.bus = BusRecorder(broker.host, broker.port, f"edge/{self.site}/events/#", protocol)
        self.agent = AgentProc(self.config, workdir)
        self.db = workdir / "var" / "edge-agent.db"

    def run_line(self, count: int, rate: float, seed: int, **kw) -> LineProc:
        return LineProc(
            self.workdir, port=self.broker.port, count=count, rate=rate, seed=seed,
            fractions=FRACTIONS, protocol=self.protocol, **kw,
        )

    def expect(self, gt: dict) -> dict[str, int]:
        t = gt["summary"]["expected_types"]
        return {
            "wms": sum(n for k, n in t.items() if k in WMS_TYPES),
            "erp": sum(n for k, n in t.items() if k in ERP_TYPES),
            "bus": sum(t.values()),
        }

    def deliveries(self, sink: str) -> list[dict[str, Any]]:
        """Every delivery ``sink`` received, in arrival order, repeats of an id included."""
        if sink == "bus":
            return self.bus.deliveries()
        doc = getattr(self, sink).received()
        return merge_deliveries(doc["events"], doc.get("redelivered", []))

    def ledger(self, cartons: Iterable[Mapping[str, Any]], sinks: Iterable[str] = SINKS,
               only: Iterable[str] | None = None) -> Ledger:
        """The sinks' deliveries against the cartons' ground truth; ``only``: the tracking
        ids in scope (events about others are ignored, e.g. while a recorder was away)."""
        scope = None if only is None else set(only)
        received = {s: self.deliveries(s) for s in sinks}
        return account(
            carton_facts(c for c in cartons if scope is None or c["tracking_id"] in scope),
            received, types=SINK_TYPES,
            ignore=None if scope is None else (
                lambda e: (e.get("data") or {}).get("tracking_id") not in scope),
        )

    def settle(self, sinks: Iterable[str] = SINKS, timeout_secs: float = SETTLE_SECS) -> None:
        """Until the agent has no window open and nothing pending, and each of ``sinks`` holds
        every event the outbox says it delivered: nothing more can arrive then."""
        sinks = list(sinks)
        t0 = time.time()
        deadline = time.monotonic() + timeout_secs
        why = "not checked"
        while time.monotonic() < deadline:
            why = self._unsettled(sinks, t0)
            if why is None:
                return
            time.sleep(0.1)
        raise AssertionError(f"the line did not settle in {timeout_secs} s: {why}")

    def _unsettled(self, sinks: list[str], t0: float) -> str | None:
        st = self.agent.status()
        running = self.agent.proc is not None and self.agent.proc.poll() is None
        if running:
            if not st or st.get("pid") != self.agent.pid or st.get("time", 0) < t0:
                return "no fresh agent status"
            open_keys = sum(st["engine"]["open_keys"].values())
            if open_keys:
                return f"{open_keys} windows open"
        states = _outbox_states(self.db)
        pending = {s: n.get(0, 0) for s, n in states.items() if n.get(0)}
        if pending:
            return f"pending deliveries {pending}"
        for sink in sinks:
            want = states.get(sink, {}).get(1, 0)
            got = self.bus.unique() if sink == "bus" else getattr(self, sink).stats()["unique"]
            if got != want:
                return f"{sink} has {got} events, the outbox delivered {want}"
        return None

    def close(self) -> None:
        try:
            self.agent.stop()
        finally:
            self.bus.close()
            self.wms.stop()
            self.erp.stop()


def _outbox_states(db: Path) -> dict[str, dict[int, int]]:
    """sink -> delivery state (0 pending, 1 delivered, 2 dead) -> rows, read-only."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = con.execute("SELECT sink, state, count(*) FROM deliveries GROUP BY sink, state")
        out: dict[str, dict[int, int]] = {}
        for sink, state, n in rows:
            out.setdefault(sink, {})[state] = n
        return out
    finally:
        con.close()


def assert_exact(ledger: Ledger, context: str = "") -> None:
    """Exactly once at every sink of the ledger: nothing missing, wrong, invented or under a
    second id (redeliveries of one id are allowed); fails with the table and examples."""
    assert ledger.exactly_once, "\n".join(
        [ledger.verdict(), *ledger.lines(), *ledger.examples(limit=12)] + ([context] if context else []))


def merge_truth(*gts: dict) -> dict:
    """Ground truths of several line runs as one."""
    out: dict = {"summary": {"expected_types": {}}, "cartons": []}
    for g in gts:
        out["cartons"] += g["cartons"]
        for k, n in g["summary"]["expected_types"].items():
            out["summary"]["expected_types"][k] = out["summary"]["expected_types"].get(k, 0) + n
    return out


def assert_all_delivered(line: Line, gt: dict) -> Ledger:
    want = line.expect(gt)
    # Waits only: if something is missing, the ledger below says what.
    line.wms.wait_unique(want["wms"], SETTLE_SECS)
    line.erp.wait_unique(want["erp"], SETTLE_SECS)
    line.bus.wait_unique(want["bus"], SETTLE_SECS)
    line.settle()  # anything extra (a wrong late exception) has arrived now
    led = line.ledger(gt["cartons"])
    assert_exact(led, line.agent.log()[-2000:])
    for sink in SINKS:
        assert led.total(sink).expected == want[sink], (sink, led.lines())
    return led


def _cli_text(line: Line, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args, "-c", str(line.config)],
        capture_output=True, text=True, timeout=60, cwd=line.workdir,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cli(line: Line, *args: str) -> list[dict]:
    return [json.loads(x) for x in _cli_text(line, *args).splitlines() if x.strip()]


def _wait_rows(line: Line, *args: str) -> list[dict]:
    deadline = time.monotonic() + SETTLE_SECS
    while time.monotonic() < deadline:
        rows = _cli(line, *args)
        if rows:
            return rows
        time.sleep(0.2)
    return []
