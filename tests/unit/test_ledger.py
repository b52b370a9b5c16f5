"""The ledger cannot be fooled: each way a sink can be wrong is counted in its own column."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from simulators.carton_line import plan_cartons
from simulators.ledger import (
    Fact,
    account,
    carton_facts,
    press_facts,
    reconcile,
    sorter_expected,
    sorter_facts,
    sorter_ledger,
    sorter_received,
)


def ev(eid: str, type_: str, data: dict[str, Any], subject: str | None = None) -> dict[str, Any]:
    return {"specversion": "1.0", "id": eid, "type": type_,
            "subject": subject or data.get("tracking_id") or data.get("location"), "data": data}


def closed(eid: str, tid: str, weight: float = 1234.5) -> dict[str, Any]:
    return ev(eid, "carton_closed", {"tracking_id": tid, "carton_id": "C" + tid[1:],
                                     "weight_g": weight, "station": "CLOSE1"})


FACTS = [
    Fact("carton_closed", "T1", {"tracking_id": "T1", "carton_id": "C1", "weight_g": 1234.5}),
    Fact("carton_closed", "T2", {"tracking_id": "T2", "carton_id": "C2", "weight_g": 1234.5}),
    Fact("carton_exception", "T3", {"tracking_id": "T3", "reason": "no_weight"}),
]
GOOD = [closed("a", "T1"), closed("b", "T2"),
        ev("c", "carton_exception", {"tracking_id": "T3", "reason": "no_weight"})]


def test_everything_right_is_exactly_once():
    led = account(FACTS, {"wms": GOOD})
    assert led.exactly_once, led.problems
    t = led.total("wms")
    assert (t.expected, t.delivered, t.received) == (3, 3, 3)
    assert t.precision == t.recall == 1.0
    assert led.verdict().startswith("exactly once")


def test_a_duplicate_delivery_of_one_id_is_shown_but_allowed():
    led = account(FACTS, {"wms": [*GOOD, closed("a", "T1")]})
    row = led.rows[("wms", "carton_closed")]
    assert row.dup_deliveries == 1 and row.dup_facts == 0 and row.delivered == 2
    assert led.exactly_once
    assert "1 redeliveries" in led.verdict()


def test_a_duplicate_fact_under_a_new_id_is_not_exactly_once():
    led = account(FACTS, {"wms": [*GOOD, closed("a2", "T1")]})
    row = led.rows[("wms", "carton_closed")]
    assert row.dup_facts == 1 and row.delivered == 2 and row.received == 3
    assert row.precision == 2 / 3
    assert not led.exactly_once
    assert "delivered again under id a2" in led.examples()[0]


def test_a_wrong_value_is_counted_and_the_fact_not_missing():
    led = account(FACTS, {"wms": [closed("a", "T1", weight=999.0), *GOOD[1:]]})
    row = led.rows[("wms", "carton_closed")]
    assert (row.wrong, row.missing, row.delivered) == (1, 0, 1)
    assert row.recall == 0.5
    assert not led.exactly_once
    assert "weight_g=999.0, want 1234.5" in led.examples()[0]


def test_numbers_match_within_the_tolerance_only():
    near = account(FACTS, {"wms": [closed("a", "T1", weight=1234.5 + 1e-9), *GOOD[1:]]})
    assert near.exactly_once
    loose = [Fact("carton_closed", "T1", {"weight_g": 1234.5}, tolerance=0.1)]
    assert account(loose, {"wms": [closed("a", "T1", weight=1234.55)]}).exactly_once
    assert not account(loose, {"wms": [closed("a", "T1", weight=1234.7)]}).exactly_once


def test_a_missing_fact_is_counted():
    led = account(FACTS, {"wms": GOOD[1:]})
    row = led.rows[("wms", "carton_closed")]
    assert (row.missing, row.delivered, row.expected) == (1, 1, 2)
    assert not led.exactly_once


def test_an_exception_for_a_carton_that_closed_is_invented():
    false = ev("x", "carton_exception", {"tracking_id": "T1", "reason": "no_scan"})
    led = account(FACTS, {"wms": [*GOOD, false]})
    row = led.rows[("wms", "carton_exception")]
    assert (row.invented, row.delivered) == (1, 1)
    assert "false exception" in led.examples()[0]
    assert not led.exactly_once


def test_an_event_without_any_fact_is_invented():
    led = account(FACTS, {"wms": [*GOOD, closed("z", "T99")]})
    assert led.rows[("wms", "carton_closed")].invented == 1
    assert not led.exactly_once


def test_a_type_the_sink_does_not_subscribe_to_is_invented_there():
    led = account(FACTS, {"wms": GOOD, "erp": GOOD[:2]},
                  types={"wms": None, "erp": {"carton_closed"}})
    assert led.exactly_once
    led = account(FACTS, {"erp": GOOD}, types={"erp": {"carton_closed"}})
    assert led.rows[("erp", "carton_exception")].invented == 1
    assert not led.exactly_once


def test_rows_are_per_sink_and_type_with_totals_in_the_table():
    led = account(FACTS, {"wms": GOOD, "bus": [*GOOD, GOOD[0]]})
    table = led.table()
    assert [r[:2] for r in table] == [
        ["wms", "carton_closed"], ["wms", "carton_exception"], ["wms", "total"],
        ["bus", "carton_closed"], ["bus", "carton_exception"], ["bus", "total"]]
    bus_total = table[-1]
    assert bus_total[2:9] == ["3", "3", "0", "0", "0", "1", "0"]
    assert bus_total[9:] == ["1.0000", "1.0000"]
    lines = led.lines()
    assert lines[0].split()[:3] == ["sink", "type", "expected"] and len(lines) == 7


PRESSES = [
    {"kind": "confirm", "location": "A1", "position": 1, "qty": 3},
    {"kind": "confirm", "location": "A1", "position": 1, "qty": 2},
    {"kind": "short", "location": "A2", "position": 2, "qty": 1, "display_qty": 2},
]


def pick(eid: str, loc: str, qty: int, seq: int | None = None) -> dict[str, Any]:
    data = {"location": loc, "position": int(loc[1:]), "qty": qty, "zone": "PTL1"}
    if seq is not None:
        data["press_seq"] = seq
    return ev(eid, "pick_confirmed", data)


SHORT = ev("s", "pick_short", {"location": "A2", "position": 2, "qty_picked": 1,
                               "qty_expected": 2})


def test_presses_are_counted_per_location_without_a_press_sequence():
    facts = press_facts(PRESSES)
    assert account(facts, {"wms": [pick("p1", "A1", 3), pick("p2", "A1", 2), SHORT]}).exactly_once
    # The first press again under a new id: a duplicate fact.
    led = account(facts, {"wms": [pick("p1", "A1", 3), pick("p1b", "A1", 3), pick("p2", "A1", 2),
                                  SHORT]})
    assert led.rows[("wms", "pick_confirmed")].dup_facts == 1
    # A press that did not happen.
    led = account(facts, {"wms": [pick("p1", "A1", 3), pick("p2", "A1", 2), pick("p3", "A1", 5),
                                  SHORT]})
    assert led.rows[("wms", "pick_confirmed")].wrong + led.rows[("wms", "pick_confirmed")].dup_facts \
        + led.rows[("wms", "pick_confirmed")].invented == 1
    assert not led.exactly_once


def test_a_press_sequence_tells_a_second_press_from_a_second_id():
    facts = press_facts(PRESSES)
    # Same qty twice but the same press_seq: one press under two ids.
    facts2 = press_facts([PRESSES[0], {**PRESSES[0]}])
    led = account(facts2, {"wms": [pick("p1", "A1", 3, seq=7), pick("p1b", "A1", 3, seq=7)]})
    row = led.rows[("wms", "pick_confirmed")]
    assert (row.delivered, row.dup_facts, row.missing) == (1, 1, 1)
    led = account(facts2, {"wms": [pick("p1", "A1", 3, seq=7), pick("p2", "A1", 3, seq=8)]})
    assert led.exactly_once
    # Facts that know the sequence: an event with a sequence nobody pressed is invented.
    known = press_facts([{**PRESSES[0], "seq": 1}, {**PRESSES[1], "seq": 2}])
    led = account(known, {"wms": [pick("p1", "A1", 3, seq=1), pick("p2", "A1", 2, seq=2),
                                  pick("p9", "A1", 2, seq=9)]})
    assert led.rows[("wms", "pick_confirmed")].invented == 1
    assert account(facts[:2], {"wms": [pick("p1", "A1", 3), pick("p2", "A1", 2)]}).exactly_once


SORTER_TRUTH = [
    {"tracking_id": "S1", "done": True, "final_disposition": "sorted", "final_lane": 5,
     "dispositions": ["sorted"], "read": True},
    {"tracking_id": "S2", "done": True, "final_disposition": "sorted", "final_lane": 3,
     "dispositions": ["recirculated", "recirculated", "sorted"], "read": True},
    {"tracking_id": "S3", "done": True, "final_disposition": "lost_mistrack", "final_lane": 0,
     "dispositions": ["lost_mistrack"], "read": True},
    {"tracking_id": "S4", "done": False, "final_disposition": None, "final_lane": None,
     "dispositions": ["recirculated"], "read": True},
]


def sorted_ev(eid: str, tid: str, lane: int) -> dict[str, Any]:
    return ev(eid, "carton_sorted", {"tracking_id": tid, "lane": lane, "disposition": "sorted"})


def sort_exc(eid: str, tid: str, reason: str) -> dict[str, Any]:
    return ev(eid, "sort_exception", {"tracking_id": tid, "reason": reason})


SORTER_GOOD = [sorted_ev("1", "S1", 5), sorted_ev("2", "S2", 3),
               sort_exc("3", "S2", "recirculated_too_often"), sort_exc("4", "S3", "lost")]


def test_sorter_facts_and_the_older_tuple_view():
    assert len(sorter_facts(SORTER_TRUTH)) == 4
    assert sorter_received(SORTER_GOOD) == sorter_expected(SORTER_TRUTH)
    # A redelivered id is one event; a second id for the same divert is two.
    assert sorter_received([*SORTER_GOOD, SORTER_GOOD[0]]) == sorter_expected(SORTER_TRUTH)
    assert sorter_received([*SORTER_GOOD, sorted_ev("9", "S1", 5)]) != sorter_expected(SORTER_TRUTH)


def test_sorter_ledger_finds_false_exceptions_and_ignores_unfinished_cartons():
    unfinished = sort_exc("5", "S4", "no_confirmation")
    assert sorter_ledger(SORTER_TRUTH, {"wms": [*SORTER_GOOD, unfinished]}).exactly_once
    false = sort_exc("6", "S1", "no_confirmation")
    led = sorter_ledger(SORTER_TRUTH, {"wms": [*SORTER_GOOD, false]})
    assert led.rows[("wms", "sort_exception")].invented == 1
    assert "false exception" in led.examples()[0]
    wrong_lane = sorter_ledger(SORTER_TRUTH, {"wms": [sorted_ev("1", "S1", 4), *SORTER_GOOD[1:]]})
    assert wrong_lane.rows[("wms", "carton_sorted")].wrong == 1


GT = [c.ground_truth() for c in plan_cartons(
    60, seed=3, noread_frac=0.1, missing_weight_frac=0.1, missing_scan_frac=0.1, dup_frac=0.0,
    reorder_frac=0.0)]


def perfect(cartons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [ev(f"{c['tracking_id']}-{i}", e["type"], {**e["data"], "extra": 1})
            for c in cartons for i, e in enumerate(c["expected"])]


def test_reconcile_keeps_its_shape_and_now_fails_on_a_second_id():
    events = perfect(GT)
    led = reconcile(GT, events)
    assert led.ok and led.accounted == led.cartons == 60, led.summary()
    assert reconcile(GT, events + events[:5]).ok  # redeliveries of the same ids
    again = copy.deepcopy(events[0])
    again["id"] = "another-id"
    led = reconcile(GT, [*events, again])
    assert not led.ok and len(led.duplicates) == 1 and led.accounted == 59
    assert not reconcile(GT, events[1:]).ok
    kinds = {c["tracking_id"]: c["expected"][0]["type"] for c in GT}
    closed_tid = next(t for t, k in kinds.items() if k == "carton_closed")
    false = ev("f", "carton_exception", {"tracking_id": closed_tid, "reason": "no_weight"})
    led = reconcile(GT, [*events, false])
    assert not led.ok and led.unexpected == [f"{closed_tid}:carton_exception"]
    # The ERP subscribes to carton_closed only: the rest is not expected there.
    erp = [e for e in events if e["type"] == "carton_closed"]
    assert reconcile(GT, erp, types={"carton_closed"}).ok
    assert not reconcile(GT, events, types={"carton_closed"}).ok


CORRUPTIONS = ("redeliver", "second_id", "wrong", "drop", "invent")


@pytest.mark.parametrize("seed", range(150))
def test_any_corruption_but_a_redelivery_breaks_exactly_once(seed):
    """Random corruptions (a seeded property test: hypothesis is not a dependency here), each
    on its own event; only redeliveries of the same id keep it exactly once."""
    rnd = random.Random(seed)
    corruptions = [rnd.choice(CORRUPTIONS) for _ in range(rnd.randint(0, 4))]
    facts = carton_facts(GT)
    events = perfect(GT)
    free = rnd.sample(range(len(events)), len(events))
    order = []
    for kind in corruptions:  # an invented exception is about a carton that closed
        i = next(i for i in free if kind != "invent" or events[i]["type"] == "carton_closed")
        free.remove(i)
        order.append(i)
    drops = set()
    extra = []
    for kind, i in zip(corruptions, order, strict=True):
        e = events[i]
        if kind == "redeliver":
            extra.append(copy.deepcopy(e))
        elif kind == "second_id":
            extra.append({**copy.deepcopy(e), "id": e["id"] + "-bis"})
        elif kind == "wrong":
            events[i] = {**e, "data": {**e["data"], "tracking_id": e["data"]["tracking_id"],
                                       "station": "ELSEWHERE"}}
        elif kind == "drop":
            drops.add(i)
        else:
            extra.append(ev(f"inv-{i}", "carton_exception",
                            {"tracking_id": e["data"]["tracking_id"], "reason": "no_scan"}))
    rnd.shuffle(extra)
    got = [e for i, e in enumerate(events) if i not in drops] + extra
    led = account(facts, {"bus": got})
    t = led.total()
    assert t.dup_deliveries == corruptions.count("redeliver")
    assert t.dup_facts == corruptions.count("second_id")
    assert t.wrong == corruptions.count("wrong")
    assert t.missing == corruptions.count("drop")
    assert t.invented == corruptions.count("invent")
    assert led.exactly_once == (set(corruptions) <= {"redeliver"})
