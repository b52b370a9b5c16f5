"""The broker goes away and comes back: the agent reconnects by itself (with backoff),
its persistent session still holds what was published meanwhile, and nothing is lost."""

from __future__ import annotations

import time

from simulators.broker import Mosquitto
from tests.e2e.harness import Line, assert_exact, merge_truth


def test_agent_reconnects_after_broker_restart_and_loses_nothing(tmp_path):
    broker = Mosquitto(workdir=tmp_path / "broker", persistent=True).start()
    line = Line(broker, tmp_path)
    try:
        line.agent.start().wait_ready()
        gt1 = line.run_line(count=200, rate=200, seed=31, start_index=0).wait(60)
        want1 = line.expect(gt1)
        assert line.wms.wait_unique(want1["wms"], 30) == want1["wms"]
        line.bus.close()
        broker.stop()  # mosquitto saves its sessions on a clean stop
        deadline = time.monotonic() + 30  # the agent notices and retries with backoff
        while time.monotonic() < deadline:
            st = line.agent.status()
            if all(c["state"] == "offline" for c in st["connectors"].values()) \
                    and st["sinks"]["bus"]["link"]["state"] == "offline":
                break
            time.sleep(0.1)
        assert all(c["state"] == "offline" for c in st["connectors"].values())
        assert st["sinks"]["bus"]["link"]["state"] == "offline"
        broker = Mosquitto(broker.port, workdir=tmp_path / "broker", persistent=True).start()
        t0 = time.monotonic()
        line.broker = broker
        line.bus = type(line.bus)(broker.host, broker.port, f"edge/{line.site}/events/#")
        line.agent.wait_ready(timeout_secs=30)
        assert time.monotonic() - t0 < 30
        gt2 = line.run_line(count=200, rate=200, seed=32, start_index=200).wait(60)
        gt = merge_truth(gt1, gt2)
        # The bus recorder missed the first part while it was away: check the rest there.
        want = line.expect(gt)
        assert line.wms.wait_unique(want["wms"], 30) == want["wms"]
        assert line.erp.wait_unique(want["erp"], 30) == want["erp"]
        assert line.bus.wait_unique(line.expect(gt2)["bus"], 30) >= line.expect(gt2)["bus"]
        line.settle(sinks=["wms", "erp"])  # the new bus recorder missed the first part
        assert_exact(line.ledger(gt["cartons"], sinks=["wms", "erp"]))
        second = {c["tracking_id"] for c in gt2["cartons"]}
        assert_exact(line.ledger(gt2["cartons"], sinks=["bus"], only=second))
        st = line.agent.status()
        assert all(c["restarts"] >= 1 for c in st["connectors"].values())
        assert "went offline" in line.agent.log() and "back online" in line.agent.log()
    finally:
        line.close()
        broker.stop()
