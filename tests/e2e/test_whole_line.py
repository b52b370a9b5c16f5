"""End to end: the whole line at 200 cartons/s with realistic devices and faults injected.

`edge-agent demo` as a site engineer runs it, headless: the MQTT packing station CLOSE1
(scanner SCN1, checkweigher CW1 with its clock 3 h behind) at 200 cartons/s, a second
station CLOSE2 weighing on the Modbus checkweigher CW2, the Modbus conveyor CONV1 (it
jams) and pick-to-light PTL1 (a picker presses keys), the OPC UA sorter SORTER1 at 200
cartons/s; the devices' realistic behaviour is on (millisecond timestamps that collide,
clocks a little off and drifting, handshake flags cleared late, the sorter's clock 2 s
ahead). While it runs: the broker stops for 5 s and comes back, PTL1 restarts, and the
sorter's OPC UA server restarts (with its induct stopped and its belt empty: a restart
drops what a server had queued, which would make true events unobservable).

The demo's ledger (``<workdir>/ledger.json``) checks every delivery at the WMS, the ERP and
on the MQTT bus against every simulator's ground truth: per destination and event type,
nothing missing, wrong, invented or delivered under a second id, precision and recall 1.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_demo import Demo, _watch, assert_no_child_left

RATE = 200
SECONDS = 60  # the sorter restart waits for its belt to empty (~13 s at 200/s) first
FAULTS = ("broker-outage@10:5", "restart:PTL1@18:2", "restart:SORTER1@24:2")
# The soak: longer, two outages, every device restarted, a power cycle.
SOAK_SECONDS = 120
SOAK_FAULTS = ("broker-outage@10:5", "restart:PTL1@18:2", "restart:SORTER1@24:2",
               "restart:CONV1@40:3", "power-cycle:PTL1@50:2", "broker-outage@60:8",
               "restart:SORTER1@80:3")
CLOCK_OFFSET_SECS = -10800  # the checkweigher's clock, 3 h behind
CARTON_TYPES = ("carton_closed", "carton_exception", "scan_no_read")
SORTER_TYPES = ("carton_sorted", "sort_exception")
PICK_TYPES = ("pick_confirmed", "pick_short")


@pytest.mark.timeout(300)
def test_whole_line_with_faults_is_exactly_once_everywhere(tmp_path):
    run_whole_line(tmp_path, SECONDS, FAULTS)


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_whole_line_soak_with_every_fault_is_exactly_once_everywhere(tmp_path):
    run_whole_line(tmp_path, SOAK_SECONDS, SOAK_FAULTS)


def run_whole_line(tmp_path, seconds: int, faults: tuple[str, ...]) -> None:
    workdir = tmp_path / "demo"
    args = ["--seconds", str(seconds), "--rate", str(RATE), "--sorter-rate", str(RATE),
            "--no-live", "--workdir", str(workdir),
            "--clock", f"checkweigher={CLOCK_OFFSET_SECS}"]
    for f in faults:
        args += ["--fault", f]
    t0 = time.monotonic()
    demo = Demo(*args)
    try:
        assert demo.running.wait(60), demo.output()
        _watch(demo, seconds + 150)
        rc = demo.wait(150)
        wall = time.monotonic() - t0
        out = demo.output()
        doc = json.loads((workdir / "ledger.json").read_text())
        tail = out[-8000:]
        assert rc == 0, tail
        assert doc["ok"] and doc["exactly_once"], tail
        assert not doc["problems"] and not doc["notes"], (doc["problems"], doc["notes"])

        rows = {(r["sink"], r["type"]): r for r in doc["rows"]}
        assert {s for s, _ in rows} == {"wms", "erp", "bus"}, tail
        for (sink, type_), r in rows.items():
            assert r["missing"] == r["wrong"] == r["invented"] == r["dup_facts"] == 0, (
                sink, type_, r, doc["examples"])
            assert r["delivered"] == r["expected"] == r["received"], (sink, type_, r)
            assert r["precision"] == r["recall"] == 1.0, (sink, type_, r)

        def expected(sink: str, *types: str) -> int:
            return sum(rows[(sink, t)]["expected"] for t in types if (sink, t) in rows)

        # Non-trivial: both stations' cartons, the sorter's, the picks and the stops, and
        # exceptions among them, all facts of the ledger.
        assert doc["cartons"] >= RATE * seconds * 0.8, doc["cartons"]
        assert doc["stations"].get("CLOSE1", 0) > 0 and doc["stations"].get("CLOSE2", 0) > 0
        assert expected("wms", *CARTON_TYPES) == doc["cartons"]
        assert expected("wms", "carton_exception") >= 1
        assert expected("wms", "scan_no_read") >= 1
        assert expected("wms", "carton_sorted") >= RATE * 10, rows.get(("wms", "carton_sorted"))
        assert expected("wms", "sort_exception") >= 1
        assert expected("wms", "equipment_fault") >= 1
        presses = doc["presses"]["confirm"] + doc["presses"]["short"] - doc["presses"]["lost"]
        assert expected("wms", *PICK_TYPES) == presses > 0
        assert expected("erp", "carton_closed") == expected("wms", "carton_closed") > 0
        assert expected("bus", *CARTON_TYPES, *SORTER_TYPES, *PICK_TYPES, "equipment_fault") \
            == rows[("wms", "total")]["expected"]

        # Every fault happened as planned, and the agent saw it happen.
        assert [f["fault"] for f in doc["faults"]] == list(faults)
        for f in doc["faults"]:
            assert f["step"] == "done" and not f["notes"], f
            assert f["began_secs"] >= f["at_secs"] and f["ended_secs"] - f["began_secs"] \
                >= f["down_secs"], f
        assert doc["clocks"] == {"checkweigher": CLOCK_OFFSET_SECS}
        status = json.loads((workdir / "status.json").read_text())
        conns = status["connectors"]
        assert conns["mqtt:local"]["restarts"] >= 1, conns  # the broker outage
        for device in {f.split(":")[1].split("@")[0] for f in faults if ":" in f.split("@")[0]}:
            name = f"opcua:{device}" if device == "SORTER1" else f"modbus:{device}"
            assert conns[name]["restarts"] >= 1, (device, conns)
        assert all(not any((c.get("counter_gaps") or {}).values()) for c in conns.values()), conns
        assert status["sinks"]["bus"]["link"]["state"] == "online"
        cw1 = status["engine"]["sources"]["CW1"]
        assert abs(cw1["clock_offset_secs"] - CLOCK_OFFSET_SECS) < 5, cw1

        assert "result: exactly once at wms, erp and bus:" in out, tail
        assert_no_child_left(demo)
        print(f"\nwhole line: {doc['cartons']:,} cartons, "
              f"{rows[('wms', 'total')]['expected']:,} facts at the WMS, {wall:.0f} s wall")
    finally:
        demo.kill()
