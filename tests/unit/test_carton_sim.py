"""The carton-line simulator: a seeded plan with the right ground truth, published in full."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.carton_line import (
    Carton,
    Device,
    Outcome,
    plan_cartons,
    render_plan,
    run_line,
)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FRACTIONS = dict(
    noread_frac=0.02,
    missing_weight_frac=0.03,
    missing_scan_frac=0.01,
    dup_frac=0.05,
    reorder_frac=0.10,
)
START = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def plan(count: int = 2000, seed: int = 1, **overrides: Any) -> list[Carton]:
    return plan_cartons(count, seed=seed, **{**FRACTIONS, **overrides})


def test_plan_is_deterministic_for_a_seed():
    assert plan(seed=7) == plan(seed=7)
    assert plan(seed=7) != plan(seed=8)
    a = render_plan(plan(seed=7), start_time=START)
    b = render_plan(plan(seed=7), start_time=START)
    assert [p.payload for p in a] == [p.payload for p in b]


def test_a_plan_from_start_index_is_the_same_slice_of_a_longer_plan():
    whole = plan(count=300)
    part = plan(count=100, start_index=200)
    assert part == whole[200:]
    assert part[0].tracking_id == "T0000200"
    assert part[0].carton_id == "C0000200"


def test_fractions_are_roughly_right_on_10000_cartons():
    cartons = plan(count=10_000)
    n = len(cartons)
    outcomes = Counter(c.outcome for c in cartons)
    # Tolerances are about four binomial standard deviations.
    assert abs(outcomes[Outcome.NO_READ] / n - 0.02) < 0.006
    assert abs(outcomes[Outcome.MISSING_WEIGHT] / n - 0.03) < 0.007
    assert abs(outcomes[Outcome.MISSING_SCAN] / n - 0.01) < 0.004
    originals = sum(1 for c in cartons for m in c.messages if not m.duplicate)
    dups = sum(1 for c in cartons for m in c.messages if m.duplicate)
    assert abs(dups / originals - 0.05) < 0.006
    has_both = (Outcome.NORMAL, Outcome.NO_READ)
    both = [c for c in cartons if c.outcome in has_both]
    assert abs(sum(c.reordered for c in both) / len(both) - 0.10) < 0.013
    assert not any(c.reordered for c in cartons if c.outcome not in has_both)


def test_each_outcome_has_its_messages_and_expected_events():
    cartons = plan(count=3000)
    barcodes = Counter()
    for c in cartons:
        devices = {m.device for m in c.messages}
        fields = {m.device: json.loads(b"{" + m.body) for m in c.messages}
        assert [e.type for e in c.expected] == [
            {
                Outcome.NORMAL: "carton_closed",
                Outcome.NO_READ: "scan_no_read",
                Outcome.MISSING_WEIGHT: "carton_exception",
                Outcome.MISSING_SCAN: "carton_exception",
            }[c.outcome]
        ]
        data = c.expected[0].data
        assert data["tracking_id"] == c.tracking_id
        assert data["station"] == "CLOSE1"
        if c.outcome is Outcome.NORMAL:
            assert devices == {Device.SCANNER, Device.CHECKWEIGHER}
            assert fields[Device.SCANNER]["barcode"] == c.carton_id
            assert data == {
                "carton_id": c.carton_id,
                "weight_g": c.weight_g,
                "station": "CLOSE1",
                "tracking_id": c.tracking_id,
            }
        elif c.outcome is Outcome.NO_READ:
            assert devices == {Device.SCANNER, Device.CHECKWEIGHER}  # still weighed
            barcodes[fields[Device.SCANNER]["barcode"]] += 1
        elif c.outcome is Outcome.MISSING_WEIGHT:
            assert devices == {Device.SCANNER}
            assert data["reason"] == "no_weight"
            assert data["carton_id"] == c.carton_id
        else:
            assert devices == {Device.CHECKWEIGHER}
            assert data["reason"] == "no_scan"
        if Device.CHECKWEIGHER in fields:
            assert fields[Device.CHECKWEIGHER]["weight_g"] == c.weight_g
            assert fields[Device.CHECKWEIGHER]["in_tolerance"] is True
        assert 200.0 <= c.weight_g <= 25000.0
        assert round(c.weight_g, 1) == c.weight_g
    # Both no-read spellings occur, and nothing else.
    assert set(barcodes) == {"NOREAD", ""}


def test_payloads_have_the_device_format():
    pubs = render_plan(plan(count=50), start_time=START, interval_ms=100.0)
    scan = next(p for p in pubs if p.topic == "site/close1/scanner/SCN1/read")
    weight = next(p for p in pubs if p.topic == "site/close1/checkweigher/CW1/weight")
    s, w = json.loads(scan.payload), json.loads(weight.payload)
    assert list(s) == ["seq", "ts", "tracking_id", "barcode", "symbology"]
    assert list(w) == ["seq", "ts", "tracking_id", "weight_g", "in_tolerance"]
    assert TS.match(s["ts"]) and TS.match(w["ts"])
    assert s["symbology"] == "code128"
    assert isinstance(s["seq"], int) and isinstance(w["weight_g"], float)
    # The first message is due at 0 ms, so it carries start_time exactly.
    assert json.loads(pubs[0].payload)["ts"] == "2026-11-22T10:00:00.000Z"
    # Every ts is start_time + due, to the millisecond (duplicates repeat their original's).
    for p in pubs:
        if not p.duplicate:
            device_time = datetime.fromisoformat(json.loads(p.payload)["ts"])
            assert device_time - START == timedelta(milliseconds=round(p.due_ms))


def test_duplicates_are_byte_identical_and_later():
    pubs = render_plan(plan(count=2000), start_time=START, interval_ms=20.0)
    by_key: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for p in pubs:
        by_key[(p.topic, p.tracking_id)].append(p)
    dup_groups = [g for g in by_key.values() if len(g) > 1]
    assert len(dup_groups) > 100
    for original, dup in dup_groups:
        assert not original.duplicate and dup.duplicate
        assert dup.payload == original.payload
        assert dup.due_ms > original.due_ms


def test_seq_counts_per_device_in_publication_order():
    pubs = render_plan(plan(count=2000), start_time=START, interval_ms=2.0)
    for topic in {p.topic for p in pubs}:
        sent = [json.loads(p.payload) for p in pubs if p.topic == topic and not p.duplicate]
        assert [m["seq"] for m in sent] == list(range(1, len(sent) + 1))
        # Device time grows with seq (a duplicate repeats an older ts, so it is left out).
        assert [m["ts"] for m in sent] == sorted(m["ts"] for m in sent)


def test_reordered_cartons_publish_the_weight_first():
    cartons = plan(count=2000)
    pubs = render_plan(cartons, start_time=START, interval_ms=1.0)
    first_device: dict[str, str] = {}
    due: dict[tuple[str, str], float] = {}
    for p in pubs:
        device = p.topic.split("/")[2]
        first_device.setdefault(p.tracking_id, device)
        due.setdefault((p.tracking_id, device), p.due_ms)
    for c in cartons:
        if c.outcome not in (Outcome.NORMAL, Outcome.NO_READ):
            continue
        scan, weight = due[(c.tracking_id, "scanner")], due[(c.tracking_id, "checkweigher")]
        if c.reordered:
            assert first_device[c.tracking_id] == "checkweigher"
            assert -150.0 <= weight - scan <= -20.0
        else:
            assert first_device[c.tracking_id] == "scanner"
            assert 50.0 <= weight - scan <= 300.0
    assert sum(c.reordered for c in cartons) > 100


def test_invalid_fractions_are_rejected():
    with pytest.raises(ValueError, match=r"0\.\.1"):
        plan(dup_frac=1.5)
    with pytest.raises(ValueError, match="add up"):
        plan(noread_frac=0.5, missing_weight_frac=0.4, missing_scan_frac=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real mosquitto on a free 127.0.0.1 port; yields the port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    port = _free_port()
    home = tmp_path_factory.mktemp("mosquitto")
    conf = home / "mosquitto.conf"
    # A subscriber briefly behind must not lose QoS 1 messages to the default queue limit.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\n"
    )
    with open(home / "mosquitto.log", "w") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((home / "mosquitto.log").read_text()) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Subscriber:
    """Records every message under a topic filter, from paho's network thread."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{port}-{topic}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.on_connect = lambda c, *_args: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_for(self, count: int, timeout_s: float) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_run_line_delivers_every_planned_message(mosquitto, tmp_path, protocol):
    base = f"test/{protocol}"
    planned = plan(count=3000, seed=3, base=base)
    expected = Counter((m.topic, m.tracking_id) for c in planned for m in c.messages)
    sub = Subscriber(mosquitto, f"{base}/#")
    try:
        gt_path = tmp_path / "gt.json"
        summary = run_line(
            "127.0.0.1",
            mosquitto,
            count=3000,
            rate_per_s=3000,
            seed=3,
            base=base,
            protocol=protocol,
            ground_truth_path=gt_path,
            **FRACTIONS,
        )
        got = sub.wait_for(sum(expected.values()), timeout_s=20)
    finally:
        sub.close()

    assert summary.unacked == 0
    assert summary.messages == sum(expected.values())
    received = Counter((topic, json.loads(payload)["tracking_id"]) for topic, payload in got)
    assert received == expected
    # A duplicate repeats its original byte for byte.
    payloads = defaultdict(list)
    for topic, payload in got:
        payloads[(topic, json.loads(payload)["tracking_id"])].append(payload)
    dups = [p for p in payloads.values() if len(p) == 2]
    assert dups and all(a == b for a, b in dups)
    for _topic, payload in got:
        assert TS.match(json.loads(payload)["ts"])
    document = json.loads(gt_path.read_text())
    assert document["cartons"] == [c.ground_truth() for c in planned]
    assert document["summary"]["cartons"] == 3000
    assert document["summary"]["unacked"] == 0


def test_forever_mode_appends_every_finished_carton(mosquitto, tmp_path):
    gt_path = tmp_path / "gt.jsonl"
    stop = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        result["summary"] = run_line(
            "127.0.0.1",
            mosquitto,
            count=None,
            rate_per_s=500,
            seed=5,
            start_index=1000,
            ground_truth_path=gt_path,
            stop=stop,
            **FRACTIONS,
        )

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.6)
    stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    lines = [json.loads(line) for line in gt_path.read_text().splitlines()]
    summary = result["summary"]
    assert summary.unacked == 0
    assert len(lines) == summary.cartons > 100
    # No carton is left half-published: every started carton finished, none skipped.
    assert sorted(line["tracking_id"] for line in lines) == [
        f"T{i:07d}" for i in range(1000, 1000 + summary.cartons)
    ]
    planned = plan(count=summary.cartons, seed=5, start_index=1000)
    assert sorted(lines, key=lambda line: line["tracking_id"]) == [
        c.ground_truth() for c in planned
    ]


class FakeWeigher:
    """A `Weigher` that records its weighings and reports weights rounded to 0.5 g."""

    def __init__(self) -> None:
        self.weighed: list[tuple[str, float, bool]] = []

    def weigh(self, tracking_id: str, weight_g: float, in_tolerance: bool) -> None:
        self.weighed.append((tracking_id, weight_g, in_tolerance))

    def reading(self, weight_g: float) -> float:
        return round(weight_g * 2) / 2

    def drain(self, timeout_s: float) -> bool:
        return True


def test_run_line_weighs_on_a_weigher_instead_of_publishing_weights(mosquitto, tmp_path):
    base = "test/weigher"
    fractions = {**FRACTIONS, "dup_frac": 0.3}
    planned = plan(count=300, seed=7, base=base, **fractions)
    scans = Counter(
        (m.topic, m.tracking_id) for c in planned for m in c.messages if m.device is Device.SCANNER
    )
    sub = Subscriber(mosquitto, f"{base}/#")
    weigher = FakeWeigher()
    try:
        gt_path = tmp_path / "gt.json"
        summary = run_line(
            "127.0.0.1", mosquitto, count=300, rate_per_s=1000, seed=7, base=base,
            ground_truth_path=gt_path, weigher=weigher, **fractions,
        )
        got = sub.wait_for(sum(scans.values()), timeout_s=20)
        time.sleep(0.2)  # nothing else arrives: no weight is published
        got = sub.wait_for(sum(scans.values()) + 1, timeout_s=0)
    finally:
        sub.close()
    assert summary.unacked == 0
    # Scans (duplicates included) over MQTT, as planned; no weight on MQTT.
    assert Counter((t, json.loads(p)["tracking_id"]) for t, p in got) == scans
    # One weighing per carton that has a weight, in the plan's due order; duplicates dropped.
    weighed = [c for c in planned if c.outcome is not Outcome.MISSING_WEIGHT]
    assert sorted(weigher.weighed) == sorted((c.tracking_id, c.weight_g, True) for c in weighed)
    assert summary.weighings == len(weighed)
    assert any(m.duplicate and m.device is Device.CHECKWEIGHER for c in planned for m in c.messages)
    # The ground truth is the plan, with the weights as the device reports them.
    cartons = json.loads(gt_path.read_text())["cartons"]
    assert [c["tracking_id"] for c in cartons] == [c.tracking_id for c in planned]
    for truth, c in zip(cartons, planned, strict=True):
        assert truth["weight_g"] == weigher.reading(c.weight_g)
        for exp in truth["expected"]:
            if "weight_g" in exp["data"]:
                assert exp["data"]["weight_g"] == weigher.reading(c.weight_g)
        assert truth["outcome"] == str(c.outcome)


def test_modbus_weigher_spaces_weighings_and_reports_float32():
    from simulators.modbus_line import ModbusWeigher

    weigher = ModbusWeigher(min_gap_s=0.1).start()
    try:
        seen: list[tuple[float, int, str]] = [(0.0, 0, "")]  # power-up: nothing weighed
        t0 = time.monotonic()
        for i in range(3):  # all due at once: the device weighs them one by one
            weigher.weigh(f"T{i:07d}", 1234.5 + i / 10, True)
        while len(seen) < 4 and time.monotonic() - t0 < 5:
            seq = weigher.sim.get("seq")
            if seen[-1][1] != seq:
                seen.append((time.monotonic() - t0, seq, weigher.sim.get("tracking_id")))
            time.sleep(0.005)
        assert weigher.drain(5)
        assert [(s, tid) for _t, s, tid in seen[1:]] == [(i + 1, f"T{i:07d}") for i in range(3)]
        assert seen[3][0] - seen[2][0] >= 0.09 and seen[2][0] - seen[1][0] >= 0.09
        assert weigher.sim.get("weight_g") == weigher.reading(1234.7) != 1234.7
        assert weigher.weighings == 3
    finally:
        weigher.close()
