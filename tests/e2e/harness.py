"""The end-to-end harness: one line of real processes per test, and ground-truth checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from simulators.bus_recorder import BusRecorder
from simulators.ledger import reconcile
from simulators.procs import AgentProc, LineProc, ReceiverProc, write_site

FRACTIONS = {
    "noread_frac": 0.03,
    "missing_weight_frac": 0.03,
    "missing_scan_frac": 0.02,
    "dup_frac": 0.05,
    "reorder_frac": 0.05,
}
WMS_TYPES = {"carton_closed", "carton_exception", "scan_no_read"}
ERP_TYPES = {"carton_closed"}
SETTLE_SECS = 30  # windows close 6 s after the last message; generous for a loaded CI box


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

    def close(self) -> None:
        try:
            self.agent.stop()
        finally:
            self.bus.close()
            self.wms.stop()
            self.erp.stop()


def assert_all_delivered(line: Line, gt: dict) -> None:
    want = line.expect(gt)
    assert line.wms.wait_unique(want["wms"], SETTLE_SECS) == want["wms"], line.agent.log()[-3000:]
    assert line.erp.wait_unique(want["erp"], SETTLE_SECS) == want["erp"]
    assert line.bus.wait_unique(want["bus"], SETTLE_SECS) == want["bus"]
    time.sleep(1.0)  # anything extra (a wrong late exception) would arrive now
    cartons = gt["cartons"]
    for name, got, types in (
        ("wms", line.wms.received()["events"], WMS_TYPES),
        ("erp", line.erp.received()["events"], ERP_TYPES),
        ("bus", line.bus.events, None),
    ):
        led = reconcile(cartons, got, types=types)
        assert led.ok, f"{name}: {led.summary()}: {led.missing[:5]} {led.unexpected[:5]} {led.wrong_values[:5]}"
        assert len({e["id"] for e in got}) == want[name]


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
