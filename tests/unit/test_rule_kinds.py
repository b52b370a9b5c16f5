"""The map and count rule kinds, and a correlate rule that only watches for a timeout."""

from __future__ import annotations

from edge_agent.config import CorrelateRule, CountRule, MapRule
from edge_agent.events import DeviceEvent
from edge_agent.rules.correlate import Correlate
from edge_agent.rules.count import Count
from edge_agent.rules.map import Map
from edge_agent.testing.fakes import RecordingOutput

T0 = 1_800_000_000.0


def divert(tid: str, disposition: str, n: int, t: float = T0) -> DeviceEvent:
    return DeviceEvent("SORTER1", "divert", {"tracking_id": tid, "disposition": disposition,
                                             "lane": 3}, t, t, f"SORTER1/divert/{n}")


def induct(tid: str, n: int, t: float = T0) -> DeviceEvent:
    return DeviceEvent("SORTER1", "induct", {"tracking_id": tid}, t, t, f"SORTER1/induct/{n}")


def test_map_filters_shapes_and_ids_by_message():
    rule = Map(MapRule.model_validate({
        "kind": "map", "name": "sorted", "inputs": {"d": {"device": "SORTER1", "event": "divert"}},
        "when": {"field": "disposition", "equals": "sorted"},
        "emit": {"type": "carton_sorted", "subject": "${d.tracking_id}",
                 "data": {"lane": "${d.lane}", "where": "${d.device}"}},
    }), site="s1")
    out = RecordingOutput()
    rule.on_event(divert("S1", "recirculated", 1), "d", out)
    rule.on_event(divert("S1", "sorted", 2), "d", out)
    assert out.types() == ["carton_sorted"]
    assert out.events[0].subject == "S1" and out.events[0].data == {"lane": 3, "where": "SORTER1"}
    again = RecordingOutput()
    Map(rule.cfg, site="s1").on_event(divert("S1", "sorted", 2), "d", again)
    assert again.events[0].id == out.events[0].id  # same message, same event id


def count_rule(threshold: int = 2) -> Count:
    return Count(CountRule.model_validate({
        "kind": "count", "name": "recirc", "key": "tracking_id", "threshold": threshold,
        "window_secs": 60, "inputs": {"d": {"device": "SORTER1", "event": "divert"}},
        "when": {"field": "disposition", "equals": "recirculated"},
        "emit": {"type": "sort_exception", "data": {"reason": "recirculated_too_often",
                                                    "tracking_id": "${key}"}},
    }), site="s1")


def test_count_emits_once_at_the_threshold_per_key():
    rule, out = count_rule(), RecordingOutput()
    for n, (tid, disp) in enumerate([("S1", "recirculated"), ("S2", "recirculated"),
                                     ("S1", "sorted"), ("S1", "recirculated"),
                                     ("S1", "recirculated")]):
        rule.on_event(divert(tid, disp, n), "d", out)
    assert [(e.type, e.data["tracking_id"]) for e in out.events] == [("sort_exception", "S1")]


def test_count_state_survives_a_restart_and_expires_after_the_window():
    rule, out = count_rule(), RecordingOutput()
    rule.on_event(divert("S1", "recirculated", 1), "d", out)
    restarted = count_rule()
    restarted.load_state(out.persisted("recirc"))
    restarted.on_event(divert("S1", "recirculated", 2, T0 + 1), "d", out)
    assert out.types() == ["sort_exception"]
    restarted.on_tick(T0 + 120, out)  # the wall clock alone expires nothing
    assert restarted.open_keys() == 1
    restarted.advance(T0 + 120, out)  # event time does
    assert restarted.open_keys() == 0


def test_a_correlation_without_emit_only_reports_what_did_not_come():
    rule = Correlate(CorrelateRule.model_validate({
        "kind": "correlate", "name": "confirmed", "key": "tracking_id", "window_secs": 5,
        "allowed_lateness_secs": 0,
        "inputs": {"induct": {"device": "SORTER1", "event": "induct"},
                   "divert": {"device": "SORTER1", "event": "divert"}},
        "on_timeout": {"type": "sort_exception", "reasons": {"divert": "no_confirmation"},
                       "data": {"tracking_id": "${key}", "reason": "${reason}"}},
    }), site="s1")
    out = RecordingOutput()
    rule.on_event(induct("S1", 1), "induct", out)
    rule.on_event(divert("S1", "sorted", 1, T0 + 1), "divert", out)  # confirmed: no event
    rule.on_event(induct("S2", 2, T0 + 2), "induct", out)  # never confirmed
    rule.on_event(induct("S3", 3, T0 + 8), "induct", out)  # moves the watermark
    assert [(e.type, e.data) for e in out.events] == [
        ("sort_exception", {"tracking_id": "S2", "reason": "no_confirmation"})]
