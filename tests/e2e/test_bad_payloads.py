"""Malformed device payloads are counted and set aside; they never crash the agent and
never reach a sink, and good cartons around them still flow."""

from __future__ import annotations

import json
import math

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.e2e.harness import SETTLE_SECS, _cli, assert_exact, merge_truth

SCAN = "site/close1/scanner/SCN1/read"
WEIGH = "site/close1/checkweigher/CW1/weight"
TS = "2026-11-22T10:00:00.000Z"


def scan(**over) -> bytes:
    body = {"seq": 1, "ts": TS, "tracking_id": "TBAD", "barcode": "CBAD", "symbology": "code128"}
    body.update(over)
    return json.dumps(body).encode()


def weigh(**over) -> bytes:
    body = {"seq": 1, "ts": TS, "tracking_id": "TBAD", "weight_g": 100.0, "in_tolerance": True}
    body.update(over)
    return json.dumps(body, allow_nan=True).encode()


BAD = [  # (topic, payload, reason the agent must give)
    (SCAN, b"hello", "not_json"),
    (SCAN, b"", "not_json"),
    (SCAN, b"\xff\xfe{\"seq\": 1}", "not_utf8"),
    (SCAN, b"[1, 2, 3]", "not_object"),
    (SCAN, json.dumps({"seq": 2, "ts": TS, "barcode": "C1"}).encode(), "missing_field"),
    (SCAN, scan(tracking_id=None, seq=3), "missing_field"),
    (SCAN, scan(tracking_id=12345, seq=4), "wrong_type"),
    (SCAN, scan(seq=True), "wrong_type"),
    (SCAN, scan(barcode="X" * 500, seq=5), "too_long"),
    (SCAN, scan(barcode="Y" * 5000, seq=6), "oversized"),
    (WEIGH, weigh(weight_g=math.nan, seq=7), "not_finite"),
    (WEIGH, weigh(weight_g=-5.0, seq=8), "out_of_range"),
    (WEIGH, weigh(ts="yesterday", seq=9), "bad_timestamp"),
    (WEIGH, weigh(ts="2026-11-22T10:00:00", seq=10), "bad_timestamp"),
    (WEIGH, weigh(weight_g="heavy", seq=11), "wrong_type"),
]


def test_bad_payloads_are_quarantined_and_good_cartons_still_flow(line):
    line.agent.start().wait_ready()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect(line.broker.host, line.broker.port)
    pub.loop_start()
    try:
        first = line.run_line(count=100, rate=200, seed=3, start_index=0)
        for topic, payload, _ in BAD:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        gt1 = first.wait(60)
        gt2 = line.run_line(count=100, rate=200, seed=4, start_index=100).wait(60)
    finally:
        pub.loop_stop()
        pub.disconnect()
    gt = merge_truth(gt1, gt2)
    want = line.expect(gt)["wms"]
    line.wms.wait_unique(want, SETTLE_SECS)  # the ledger says what is missing, if anything
    line.settle()
    # Nothing from the bad payloads reached any sink (a TBAD event would be invented), the
    # rest is exact.
    assert_exact(line.ledger(gt["cartons"]))
    st = line.agent.status()
    assert line.agent.proc.poll() is None  # still running
    counted: dict[str, int] = {}
    for key, n in st["engine"]["bad_payloads"].items():
        reason = key.split(":", 1)[1]
        counted[reason] = counted.get(reason, 0) + n
    expected: dict[str, int] = {}
    for _, _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert counted == expected
    # Set aside for inspection, with their bytes.
    line.agent.stop()
    rows = _cli(line, "outbox", "quarantine", "--limit", "100")
    assert sorted(r["reason"] for r in rows) == sorted(r for _, _, r in BAD)
    assert {r["source"] for r in rows} == {SCAN, WEIGH}
    assert any(r["bytes"] == 5 for r in rows if r["reason"] == "not_json")
