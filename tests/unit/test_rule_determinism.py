"""Determinism as a tested contract (issue 7): for every rule kind, any interleaving,
duplication, pause and replay of the same device events within the lateness bound gives the
same business events with the same ids; exceptions exactly when a window truly expired in
event time. Rules run through the engine as in the agent (``RuleHarness``)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent.config import CorrelateRule, CountRule, MapRule
from edge_agent.events import DeviceEvent
from edge_agent.rules.correlate import Correlate
from edge_agent.rules.count import Count
from edge_agent.rules.map import Map
from edge_agent.testing.rules import RuleHarness

T0 = 1_800_000_000.0
WINDOW, LATENESS = 5.0, 1.0
MAX_DELAY = 0.5  # every message arrives within this of its device time (< lateness)

CLOSE = CorrelateRule.model_validate({
    "kind": "correlate", "name": "close", "key": "tracking_id", "window_secs": WINDOW,
    "allowed_lateness_secs": LATENESS,
    "inputs": {"scan": {"device": "SCN1", "event": "read"},
               "weight": {"device": "CW1", "event": "weight"}},
    "emit": {"type": "carton_closed", "data": {"w": "${weight.weight_g}"}},
    "on_timeout": {"type": "carton_exception", "reasons": {"weight": "no_weight", "scan": "no_scan"},
                   "data": {"reason": "${reason}"}},
})
RECIRC = CountRule.model_validate({
    "kind": "count", "name": "recirc", "key": "tracking_id", "threshold": 2, "window_secs": 30,
    "inputs": {"d": {"device": "SORTER1", "event": "divert"}},
    "emit": {"type": "sort_exception", "data": {"reason": "recirculated_too_often"}},
})
SORTED = MapRule.model_validate({
    "kind": "map", "name": "sorted", "inputs": {"d": {"device": "SORTER1", "event": "divert"}},
    "when": {"field": "ok", "equals": True},
    "emit": {"type": "carton_sorted", "subject": "${d.tracking_id}", "data": {}},
})


@dataclass(frozen=True)
class Carton:
    gap: float  # seconds after the previous carton's scan
    weight_after: float | None  # None: never weighed; beyond the window: weighed too late
    scanned: bool


cartons_st = st.lists(
    st.builds(
        Carton,
        gap=st.floats(0.05, 3.0),
        weight_after=st.one_of(st.none(), st.floats(0.0, WINDOW * 0.9), st.floats(WINDOW * 1.5, 8.0)),
        scanned=st.sampled_from([True, True, True, False]),
    ),
    min_size=1, max_size=25,
)


def device_events(cartons: list[Carton]) -> list[DeviceEvent]:
    """Each device's messages in its own time order (arrival filled in later)."""
    evs: list[DeviceEvent] = []
    t = T0
    for i, c in enumerate(cartons):
        t += c.gap
        tid = f"T{i:04d}"
        if c.scanned:
            evs.append(DeviceEvent("SCN1", "read", {"tracking_id": tid}, t, t, f"SCN1/read/{i}"))
        if c.weight_after is not None:
            tw = t + c.weight_after
            evs.append(DeviceEvent("CW1", "weight", {"tracking_id": tid, "weight_g": float(i)},
                                   tw, tw, f"CW1/weight/{i}"))
    evs.sort(key=lambda e: e.time)  # a device sends in its own time order
    return evs


def expected(cartons: list[Carton]) -> list[tuple[str, str]]:
    """What truly happened, in event time: (type, tracking id)."""
    out = []
    for i, c in enumerate(cartons):
        tid = f"T{i:04d}"
        weighed_in_time = c.weight_after is not None and c.weight_after < WINDOW
        if c.scanned and weighed_in_time:
            out.append(("carton_closed", tid))
        elif c.scanned or c.weight_after is not None:
            out.append(("carton_exception", tid))
    return sorted(out)


@st.composite
def deliveries(draw, evs: list[DeviceEvent]):
    """An arrival schedule: per message a delay within the bound, some redelivered, and
    maybe a broker outage during which messages wait and come at reconnect."""
    delays = [draw(st.floats(0.0, MAX_DELAY)) for _ in evs]
    dups = [draw(st.booleans()) and draw(st.booleans()) for _ in evs]
    outage = draw(st.one_of(st.none(), st.tuples(st.floats(0, 40), st.floats(1, 20))))
    return delays, dups, outage


def run(evs: list[DeviceEvent], delays, dups, outage, *, replay_at: float | None = None):
    h = RuleHarness([Correlate(CLOSE, site="s1")], start=T0 - 1)
    h.source("SCN1", buffered=True, resumed=True)
    h.source("CW1", buffered=True, resumed=True)
    items = []
    last: dict[str, float] = {}
    for ev, d, dup in zip(evs, delays, dups, strict=True):
        # A device's own messages arrive in the order it sent them.
        arrival = max(ev.time + d, last.get(ev.device, 0.0)) if replay_at is None else replay_at
        last[ev.device] = arrival
        if outage is not None and replay_at is None:
            start, length = T0 + outage[0], outage[1]
            if start <= arrival < start + length:
                arrival = start + length  # waited at the broker
        items.append((arrival, ev))
        if dup:
            items.append((arrival + 0.2, ev))  # redelivered (no ack seen)
    items.sort(key=lambda x: x[0])  # arrival order (stable: each device's stream in order)
    down = False
    for arrival, ev in items:
        if outage is not None and replay_at is None:
            start, length = T0 + outage[0], outage[1]
            if not down and h.clock.now() < start <= arrival:
                h.run_until(start)
                h.online("SCN1", False)
                h.online("CW1", False)
                down = True
            if down and arrival >= start + length:
                h.run_until(start + length)
                h.online("SCN1", True, resumed=True)
                h.online("CW1", True, resumed=True)
                down = False
        h.feed(DeviceEvent(ev.device, ev.event, dict(ev.fields), ev.time, arrival, ev.msg_id))
    if down:
        h.online("SCN1", True, resumed=True)
        h.online("CW1", True, resumed=True)
    h.run_until(h.clock.now() + 60)
    return h.events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_correlate_is_deterministic_under_any_delivery(data):
    cartons = data.draw(cartons_st)
    evs = device_events(cartons)
    delays, dups, outage = data.draw(deliveries(evs))
    live = run(evs, delays, dups, outage)
    got = sorted((e.type, e.data.get("tracking_id") or e.subject) for e in live)
    assert got == expected(cartons)
    # The same inputs delivered otherwise, or replayed long after, give the same ids.
    calm = run(evs, [0.0] * len(evs), [False] * len(evs), None)
    replay = run(evs, [0.0] * len(evs), [False] * len(evs), None, replay_at=T0 + 7200)
    ids = sorted(e.id for e in live)
    assert sorted(e.id for e in calm) == ids
    assert sorted(e.id for e in replay) == ids


def _subject_events(evs):
    return sorted((e.type, e.subject, e.id) for e in evs)


@settings(max_examples=100, deadline=None)
@given(
    passes=st.lists(st.tuples(st.integers(0, 4), st.floats(0.05, 20), st.booleans()),
                    min_size=1, max_size=30),
    delays=st.lists(st.floats(0, MAX_DELAY), min_size=30, max_size=30),
    replay_after=st.floats(60, 7200),
)
# Found by CI: five passes replayed in one burst were taken for a clock 60 s behind (the
# first epoch of a source started at -inf, so a burst confirmed it), which moved the last
# pass out of its count window.
@example(passes=[(0, 1.0, False), (0, 0.25, False), (0, 0.25, False), (1, 0.25, False),
                 (1, 0.25, False)], delays=[0.0] * 30, replay_after=60.0)
def test_count_and_map_are_deterministic_live_and_replayed(passes, delays, replay_after):
    evs, t = [], T0
    for n, (carton, gap, ok) in enumerate(passes):
        t += gap
        evs.append(DeviceEvent("SORTER1", "divert", {"tracking_id": f"R{carton}", "ok": ok},
                               t, t, f"SORTER1/divert/{n}"))

    def go(arrival_of, *, backlog: bool) -> list:
        h = RuleHarness([Count(RECIRC, site="s1"), Map(SORTED, site="s1")], start=T0 - 1)
        if backlog:  # only a buffered source (MQTT QoS 1, session kept) can replay
            h.source("SORTER1", buffered=True, resumed=True)
        else:
            h.source("SORTER1", lossless_reconnect=True)
        for i, ev in enumerate(evs):
            h.feed(DeviceEvent(ev.device, ev.event, dict(ev.fields), ev.time, arrival_of(i, ev),
                               ev.msg_id))
        h.run_until(h.clock.now() + 120)
        return h.events

    arrivals: list[float] = []
    for i, ev in enumerate(evs):  # in the sorter's order, each within the delay bound
        arrivals.append(max(ev.time + delays[i], arrivals[-1] if arrivals else 0.0))
    live = go(lambda i, ev: arrivals[i], backlog=False)
    # A replay: the backlog after an outage, delivered at once (a constant delay instead would
    # be indistinguishable from a device clock running behind, which the engine corrects).
    replay = go(lambda i, ev: evs[-1].time + replay_after, backlog=True)
    assert _subject_events(live) == _subject_events(replay)
    # exceptions exactly when a carton passed twice within 30 s of its first counted pass
    want: list[str] = []
    first: dict[str, float] = {}
    counted: dict[str, int] = {}
    for ev in evs:
        k = ev.fields["tracking_id"]
        if k not in first or ev.time - first[k] > RECIRC.window_secs:
            first[k], counted[k] = ev.time, 0
        counted[k] += 1
        if counted[k] == RECIRC.threshold:
            want.append(k)
    got = [e.subject for e in live if e.type == "sort_exception"]
    assert sorted(got) == sorted(want)
    assert len([e for e in live if e.type == "carton_sorted"]) == sum(ok for _, _, ok in passes)
