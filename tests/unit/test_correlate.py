"""The correlate rule: deterministic joins, timeouts by event time, no-reads, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_site
from edge_agent.events import DeviceEvent
from edge_agent.rules.correlate import Correlate
from edge_agent.testing.fakes import RecordingOutput

EXAMPLE = Path(__file__).parents[2] / "edge_agent" / "examples" / "site.yaml"
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def rule_cfg():
    site, _ = load_site(EXAMPLE)
    return site.rules[0]


def scan(i: int, t: float, barcode: str | None = None, seq: int | None = None) -> DeviceEvent:
    tid = f"T{i:07d}"
    return DeviceEvent(
        "SCN1", "read", {"seq": seq if seq is not None else i, "tracking_id": tid,
                          "barcode": barcode if barcode is not None else f"C{i:07d}"},
        t, t + 0.01, f"SCN1/read/{seq if seq is not None else i}",
    )


def weight(i: int, t: float, grams: float = 1234.5) -> DeviceEvent:
    return DeviceEvent(
        "CW1", "weight", {"seq": i, "tracking_id": f"T{i:07d}", "weight_g": grams, "in_tolerance": True},
        t, t + 0.01, f"CW1/weight/{i}",
    )


def feed(rule: Correlate, out: RecordingOutput, *evs: DeviceEvent) -> None:
    for ev in evs:
        rule.on_event(ev, "scan" if ev.device == "SCN1" else "weight", out)


def test_scan_then_weight_closes_the_carton(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, scan(1, T0), weight(1, T0 + 0.2, 987.0))
    assert out.types() == ["carton_closed"]
    ev = out.events[0]
    assert ev.subject == "C0000001"
    assert ev.data["carton_id"] == "C0000001"
    assert ev.data["weight_g"] == 987.0
    assert ev.data["tracking_id"] == "T0000001"
    assert ev.data["station"] == "CLOSE1"
    assert ev.data["scan_time"].startswith("2027-01-15T08:00:00.000")
    assert ev.time == T0 + 0.2  # the later device timestamp
    assert ev.source == "edge-agent/s1/rules/close-station-1"
    assert rule.open_keys() == 1  # closed key kept to absorb stragglers until its window ends


def test_weight_before_scan_closes_the_carton_too(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, weight(2, T0), scan(2, T0 + 0.1))
    assert out.types() == ["carton_closed"]
    assert out.events[0].data["weight_g"] == 1234.5


def test_same_inputs_same_id_different_inputs_different_id(rule_cfg):
    a, b, c = (Correlate(rule_cfg, site="s1") for _ in range(3))
    oa, ob, oc = RecordingOutput(), RecordingOutput(), RecordingOutput()
    feed(a, oa, scan(3, T0), weight(3, T0 + 0.1))
    feed(b, ob, weight(3, T0 + 0.1), scan(3, T0))  # same messages, other order
    feed(c, oc, scan(3, T0, seq=99), weight(3, T0 + 0.1))  # another scan message
    assert oa.events[0].id == ob.events[0].id
    assert oa.events[0].id != oc.events[0].id


def test_missing_weight_times_out_by_event_time(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, scan(4, T0))
    # Later cartons move the watermark; at t0 + window + lateness the window closes.
    feed(rule, out, scan(5, T0 + 5.5), weight(5, T0 + 5.6))
    assert out.types() == ["carton_closed"]
    feed(rule, out, scan(6, T0 + 6.2))
    assert out.types() == ["carton_closed", "carton_exception"]
    exc = out.events[1]
    assert exc.data == {
        "tracking_id": "T0000004", "reason": "no_weight", "station": "CLOSE1",
        "carton_id": "C0000004", "weight_g": None,
    }
    assert exc.subject == "T0000004"
    assert exc.time == T0 + 5.0


def test_missing_scan_reports_no_scan(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, weight(7, T0), weight(8, T0 + 7))
    assert out.types() == ["carton_exception"]
    assert out.events[0].data["reason"] == "no_scan"
    assert out.events[0].data["weight_g"] == 1234.5


@pytest.mark.parametrize("barcode", ["NOREAD", ""])
def test_no_read_emits_scan_no_read_and_absorbs_the_weight(rule_cfg, barcode):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, scan(9, T0, barcode=barcode))
    assert out.types() == ["scan_no_read"]
    assert out.events[0].data["tracking_id"] == "T0000009"
    assert out.events[0].data["scanner"] == "SCN1"
    feed(rule, out, weight(9, T0 + 0.3), scan(10, T0 + 20))  # weight late; window passes
    assert out.types() == ["scan_no_read"]  # no carton_exception for the no-read carton
    assert rule.counters["absorbed"] == 1


def test_repeated_input_for_a_key_is_absorbed(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(rule, out, scan(11, T0), scan(11, T0 + 0.05, seq=111), weight(11, T0 + 0.1))
    feed(rule, out, weight(11, T0 + 0.2))  # a second weighing after close
    assert out.types() == ["carton_closed"]
    assert rule.counters["absorbed"] == 2


def test_restart_restores_open_windows_and_gives_the_same_ids(rule_cfg):
    live, out_live = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(live, out_live, scan(13, T0), scan(14, T0 + 0.1), weight(13, T0 + 0.2), weight(14, T0 + 0.3))

    first, out1 = Correlate(rule_cfg, site="s1"), RecordingOutput()
    feed(first, out1, scan(13, T0), scan(14, T0 + 0.1), weight(13, T0 + 0.2))
    # crash: a new rule instance loads what was persisted; the weight of 14 arrives after
    second, out2 = Correlate(rule_cfg, site="s1"), RecordingOutput()
    second.load_state(out1.persisted("close-station-1"))
    second.on_tick(T0 + 100, out2)  # long after: must not expire before replayed input comes
    feed(second, out2, weight(14, T0 + 0.3))
    assert [e.id for e in out1.events + out2.events] == [e.id for e in out_live.events]
    assert out2.types() == ["carton_closed"]


def test_open_keys_are_bounded(rule_cfg):
    rule, out = Correlate(rule_cfg, site="s1", max_open_keys=10), RecordingOutput()
    for i in range(15):
        feed(rule, out, scan(100 + i, T0 + i * 0.001))
    assert rule.open_keys() <= 10
    assert out.types() == ["carton_exception"] * 5
    assert rule.counters["forced_expiry"] == 5


def test_timeout_subject_naming_a_missing_input_falls_back_to_the_key(rule_cfg):
    cfg = rule_cfg.model_copy(
        update={"on_timeout": rule_cfg.on_timeout.model_copy(update={"subject": "${scan.barcode}"})}
    )
    rule, out = Correlate(cfg, site="s1"), RecordingOutput()
    feed(rule, out, weight(20, T0), weight(21, T0 + 7))
    assert out.types() == ["carton_exception"]
    assert out.events[0].subject == "T0000020"
