"""Event time against real faults (issue 7 item 1), through real processes: a 5 s broker
outage in the middle of the flow and a checkweigher whose clock is 3 h off must not turn
complete cartons into exceptions, nor hide the real ones."""

from __future__ import annotations

import time

import pytest

from simulators.broker import Mosquitto
from simulators.bus_recorder import BusRecorder
from tests.e2e.harness import Line, assert_exact

OUTAGE_SECS = 5.0
HOURS_3 = 3 * 3600


def _wait(cond, timeout_secs: float, what: str) -> None:
    deadline = time.monotonic() + timeout_secs
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("cw_clock", [-HOURS_3, HOURS_3], ids=["cw-3h-behind", "cw-3h-ahead"])
def test_broker_outage_mid_flow_and_a_clock_3h_off_invent_nothing(tmp_path, cw_clock):
    broker = Mosquitto(workdir=tmp_path / "broker", persistent=True).start()
    line = Line(broker, tmp_path)
    line.bus.close()  # a recorder that keeps its session across the broker's restart
    line.bus = BusRecorder(broker.host, broker.port, f"edge/{line.site}/events/#",
                           client_id=f"recorder-{line.site}")
    try:
        line.agent.start().wait_ready()
        run = line.run_line(count=3000, rate=200, seed=71, clocks={"checkweigher": cw_clock})
        # Mid-flow: once the WMS has a good part of the first cartons, the broker goes away.
        _wait(lambda: line.wms.stats()["unique"] >= 400, 60, "the first cartons at the WMS")
        broker.stop()  # mosquitto keeps the sessions and their queued messages on a clean stop
        _wait(lambda: all(c["state"] == "offline"
                          for c in (line.agent.status() or {}).get("connectors", {}).values()),
              30, "the agent to see the broker gone")
        time.sleep(OUTAGE_SECS)  # the outage itself (the scenario, not a synchronisation)
        broker = Mosquitto(broker.port, workdir=tmp_path / "broker", persistent=True).start()
        line.broker = broker
        gt = run.wait(180)
        line.settle(timeout_secs=90)
        ledger = line.ledger(gt["cartons"])
        assert_exact(ledger, context=f"checkweigher clock {cw_clock:+} s, broker outage")
        exceptions = sum(r.expected for (s, t), r in ledger.rows.items()
                         if s == "wms" and t == "carton_exception")
        assert exceptions > 50  # the real exceptions were there, and were not hidden as gaps
        st = line.agent.status()
        assert st["engine"]["unseen"] == {}, st["engine"]["unseen"]
        cw = st["engine"]["sources"]["CW1"]
        assert abs(cw["clock_corrected_secs"] - cw_clock) < 5, cw
    finally:
        line.close()
        broker.stop()
