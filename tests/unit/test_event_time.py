"""Rules on event time only (issue 7 items 1, 4 and 5): outages, stalls, device clocks far
off, late partners, and what the agent could not see, through the engine as the agent runs
it (``RuleHarness``: real Engine and Sources, a manual clock ticking every 100 ms)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import CorrelateRule, CountRule, load_site
from edge_agent.events import DeviceEvent
from edge_agent.rules.correlate import Correlate
from edge_agent.rules.count import Count
from edge_agent.testing.fakes import RecordingOutput
from edge_agent.testing.rules import RuleHarness

EXAMPLE = Path(__file__).parents[2] / "edge_agent" / "examples" / "site.yaml"
T0 = 1_800_000_000.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def close_cfg():
    site, _ = load_site(EXAMPLE)
    return site.rules[0]  # close-station-1: scan (SCN1) + weight (CW1), window 5 s, lateness 1 s


def scan(i: int, t: float, arrival: float | None = None) -> DeviceEvent:
    return DeviceEvent("SCN1", "read", {"seq": i, "tracking_id": f"T{i:07d}", "barcode": f"C{i:07d}"},
                       t, t + 0.01 if arrival is None else arrival, f"SCN1/read/{i}")


def weight(i: int, t: float, arrival: float | None = None) -> DeviceEvent:
    return DeviceEvent("CW1", "weight", {"seq": i, "tracking_id": f"T{i:07d}", "weight_g": 1000.0 + i,
                                         "in_tolerance": True},
                       t, t + 0.01 if arrival is None else arrival, f"CW1/weight/{i}")


def line(close_cfg, *, buffered: bool = True) -> RuleHarness:
    h = RuleHarness([Correlate(close_cfg, site="s1")], start=T0 - 1)
    h.source("SCN1", buffered=buffered, resumed=True)
    h.source("CW1", buffered=buffered, resumed=True)
    return h


def by_type(h: RuleHarness) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in h.events:
        out[e.type] = out.get(e.type, 0) + 1
    return out


def test_broker_outage_makes_no_exception(close_cfg):
    """5 s without any message (broker down): the backlog comes after; every carton closes."""
    h = line(close_cfg)
    for i in range(10):  # live, each weighed 0.3 s after its scan
        h.feed(scan(i, T0 + i * 0.5), weight(i, T0 + i * 0.5 + 0.3))
    h.online("SCN1", False)
    h.online("CW1", False)
    h.run_until(T0 + 5 + 20)  # the outage, and the ticks that run through it
    h.online("SCN1", True, resumed=True)
    h.online("CW1", True, resumed=True)
    now = h.clock.now()
    for i in range(10, 40):  # what the devices sent meanwhile, redelivered by the broker
        h.feed(scan(i, T0 + i * 0.5, arrival=now), weight(i, T0 + i * 0.5 + 0.3, arrival=now))
    h.run_until(now + 30)
    assert by_type(h) == {"carton_closed": 40}


def test_silent_checkweigher_still_gives_its_no_weight(close_cfg):
    """Connected but silent: it does not hold back the scanner's event time."""
    h = line(close_cfg)
    h.feed(scan(1, T0), weight(1, T0 + 0.2))
    for i in range(2, 6):  # weigher silent from here, scanner goes on
        h.feed(scan(i, T0 + i))
    h.feed(scan(6, T0 + 20))
    assert by_type(h) == {"carton_closed": 1, "carton_exception": 4}
    assert all(e.data["reason"] == "no_weight" for e in h.events if e.type == "carton_exception")


def test_quiet_line_closes_windows_on_quiet_time(close_cfg):
    h = line(close_cfg)
    h.feed(scan(0, T0 - 0.5), weight(0, T0 - 0.3))
    h.feed(scan(1, T0))
    h.run_until(T0 + 3)
    assert h.types() == ["carton_closed"]
    h.run_until(T0 + 12)
    assert h.types() == ["carton_closed", "carton_exception"]


def test_a_device_not_heard_from_since_it_reconnected_holds_event_time(close_cfg):
    """After a broker outage the agent is back first; the devices reconnect on their side
    later and then send what they held. Until a device speaks again it holds event time
    (at most hold_offline_secs), so its held messages are not judged late."""
    h = line(close_cfg)
    h.feed(scan(0, T0), weight(0, T0 + 0.2), scan(1, T0 + 1))
    for dev in ("SCN1", "CW1"):
        h.online(dev, False)
    h.run_until(T0 + 6)
    for dev in ("SCN1", "CW1"):
        h.online(dev, True, resumed=True)
    h.run_until(T0 + 20)  # the devices are still reconnecting
    h.feed(weight(1, T0 + 1.2, arrival=T0 + 20), scan(2, T0 + 20), weight(2, T0 + 20.1))
    h.run_until(T0 + 40)
    assert by_type(h) == {"carton_closed": 3}


def test_late_partner_of_an_expired_key_invents_no_second_exception(close_cfg):
    h = line(close_cfg)
    h.feed(scan(0, T0 - 1), weight(0, T0 - 0.8))
    h.feed(scan(1, T0))
    h.feed(scan(2, T0 + 8))  # event time passes T0 + 5 + 1: no_weight for T1 (true: late)
    assert h.types() == ["carton_closed", "carton_exception"]
    h.feed(weight(1, T0 + 7.5))  # the late weight of T1
    h.feed(weight(2, T0 + 8.2), scan(3, T0 + 30))  # and time goes on well past any window
    assert by_type(h) == {"carton_exception": 1, "carton_closed": 2}  # not a no_scan for T1
    assert h.counters("close-station-1")["late_after_timeout"] == 1


def test_disk_freeze_or_blocked_loop_makes_no_exception(close_cfg):
    """The loop was blocked 20 s (a disk freeze): the clock jumped between two ticks, and the
    messages that waited in the socket come after."""
    h = line(close_cfg)
    h.feed(scan(1, T0))
    h.clock.advance(20)  # one tick 20 s late
    h.engine.tick()
    h.run_until(T0 + 21)
    h.feed(weight(1, T0 + 0.3, arrival=T0 + 21))
    h.run_until(T0 + 40)
    assert h.types() == ["carton_closed"]


def test_ingest_paused_on_a_live_session_makes_no_exception(close_cfg):
    """Found by the fault suite (quota scenario): the agent's first session was new, so its
    devices were live; the outbox quota paused ingest for 38 s mid-flow while the devices went
    on publishing to the broker. The backlog read after the pause was taken for clocks running
    behind (their first messages were placed at arrival time), and the cartons whose scan came
    before the pause and weight after got a false no_weight."""
    h = RuleHarness([Correlate(close_cfg, site="s1")], start=T0 - 1)
    h.source("SCN1", buffered=True, resumed=False)  # a new session: nothing was waiting
    h.source("CW1", buffered=True, resumed=False)
    msgs = sorted([scan(i, T0 + i / 300) for i in range(3000)]
                  + [weight(i, T0 + i / 300 + 0.08) for i in range(3000)], key=lambda e: e.time)
    pause_at = T0 + 5.0
    h.feed(*[e for e in msgs if e.time < pause_at])
    h.engine.paused = True  # over the quota: connectors stop reading, messages wait upstream
    h.run_until(pause_at + 38)
    h.engine.paused = False
    now = h.clock.now()
    backlog = [e for e in msgs if e.time >= pause_at]
    for k, e in enumerate(backlog):  # drained faster than real time
        h.feed(DeviceEvent(e.device, e.event, e.fields, e.time, now + k * 0.0005, e.msg_id))
    h.run_until(h.clock.now() + 30)
    assert by_type(h) == {"carton_closed": 3000}
    assert h.counters("close-station-1")["late_after_timeout"] == 0


def test_device_clock_three_hours_behind_still_joins(close_cfg):
    """Cartons join from the first; once a minute of weighings shows the clock is behind,
    it is corrected, so the scanner's real no_weight exceptions are not held back 3 h."""
    h = line(close_cfg)
    for i in range(200):
        t = T0 + i * 0.5
        h.feed(scan(i, t))
        if i != 180:
            h.feed(weight(i, t + 0.3 - 3 * HOUR, arrival=t + 0.31))
    h.run_until(T0 + 120)
    assert by_type(h) == {"carton_closed": 199, "carton_exception": 1}
    assert h.engine.sources.by_device["CW1"].applied == pytest.approx(-3 * HOUR, abs=1)


def test_device_clock_three_hours_ahead_still_joins(close_cfg):
    h = line(close_cfg)
    for i in range(20):
        t = T0 + i * 0.5
        h.feed(weight(i, t + 0.3 + 3 * HOUR, arrival=t + 0.31), scan(i, t, arrival=t + 0.32))
    h.run_until(T0 + 40)
    assert by_type(h) == {"carton_closed": 20}


def test_one_weight_stamped_three_hours_ahead_in_a_replay_is_an_outlier(close_cfg):
    """A replay (arrivals long after the events) with one weight stamped +3 h: it must not
    push event time 3 h ahead and expire everyone else's window."""
    h = line(close_cfg)
    replay_at = T0 + 600
    h.run_until(replay_at)
    for i in range(20):
        t = T0 + i * 0.5
        w = weight(i, t + 0.3 + (3 * HOUR if i == 7 else 0), arrival=replay_at)
        h.feed(scan(i, t, arrival=replay_at), w)
    h.run_until(replay_at + 30)
    assert by_type(h) == {"carton_closed": 20}
    assert h.engine.sources.counters["clock_outliers"] == 1


def test_correlate_does_not_mutate_the_device_event(close_cfg):
    rule, out = Correlate(close_cfg, site="s1"), RecordingOutput()
    ahead = weight(1, T0 + 10_000, arrival=T0)
    rule.on_event(ahead, "weight", out)
    assert ahead.time == T0 + 10_000


def test_engine_hands_rules_a_copy_when_it_corrects_a_clock(close_cfg):
    h = line(close_cfg)
    events = [weight(i, T0 + i - 3 * HOUR, arrival=T0 + i) for i in range(3)]
    h.feed(*events)
    assert [e.time for e in events] == [T0 + i - 3 * HOUR for i in range(3)]


def test_no_exception_about_what_came_before_the_agent_connected():
    """Sorter (OPC UA, not buffered): a divert for a carton inducted before the agent
    subscribed is a gap, never `no_induct`; a carton inducted after is judged normally."""
    cfg = CorrelateRule.model_validate({
        "kind": "correlate", "name": "confirmed", "key": "tracking_id", "window_secs": 10,
        "inputs": {"induct": {"device": "SORTER1", "event": "induct"},
                   "divert": {"device": "SORTER1", "event": "divert"}},
        "on_timeout": {"type": "sort_exception", "reasons": {"induct": "no_induct",
                                                             "divert": "no_confirmation"},
                       "data": {"reason": "${reason}", "tracking_id": "${key}"}},
    })
    h = RuleHarness([Correlate(cfg, site="s1")], start=T0)
    h.source("SORTER1", lossless_reconnect=True)  # online at T0: nothing before it was seen

    def ev(name: str, tid: str, n: int, t: float) -> DeviceEvent:
        return DeviceEvent("SORTER1", name, {"tracking_id": tid}, t, t + 0.01, f"SORTER1/{name}/{n}")

    h.feed(ev("divert", "EARLY", 1, T0 + 0.3))  # inducted at T0 - 2: not seen
    h.feed(ev("induct", "LATE", 1, T0 + 30))  # inducted after: its divert never comes
    for n in range(2, 8):
        h.feed(ev("induct", f"X{n}", n, T0 + 40 + n), ev("divert", f"X{n}", n, T0 + 41 + n))
    h.run_until(T0 + 120)
    assert [(e.type, e.data["tracking_id"], e.data["reason"]) for e in h.events] == [
        ("sort_exception", "LATE", "no_confirmation")]
    assert h.counters("confirmed")["unseen"] == 1


def test_device_outage_without_buffer_is_a_gap_once_the_hold_is_over(close_cfg):
    """A Modbus checkweigher down for a minute (no broker keeps its weighings): the scans in
    that time are gaps, not no_weight exceptions; after it is back, exceptions are real."""
    h = RuleHarness([Correlate(close_cfg, site="s1")], start=T0 - 1)
    h.source("SCN1", buffered=True, resumed=True)
    h.source("CW1")
    h.feed(scan(0, T0), weight(0, T0 + 0.2))
    h.online("CW1", False)
    for i in range(1, 60):
        h.feed(scan(i, T0 + i))
    h.online("CW1", True)
    for i in range(60, 70):
        h.feed(scan(i, T0 + i), weight(i, T0 + i + 0.2))
    h.feed(scan(70, T0 + 70))  # no weight: a real exception
    h.run_until(T0 + 100)
    got = by_type(h)
    assert got == {"carton_closed": 11, "carton_exception": 1}, got
    assert h.counters("close-station-1")["unseen"] == 59


def count_rule() -> Count:
    return Count(CountRule.model_validate({
        "kind": "count", "name": "recirc", "key": "tracking_id", "threshold": 3,
        "window_secs": 60, "inputs": {"d": {"device": "SORTER1", "event": "divert"}},
        "emit": {"type": "sort_exception", "data": {"reason": "recirculated_too_often",
                                                    "tracking_id": "${key}"}},
    }), site="s1")


def test_count_live_and_replay_agree():
    """Three passes 25 s apart: within 60 s of the first. Live (ticks between) and replayed
    (all at once, an hour later) must emit the same."""
    def passes(arrival_offset: float) -> list[DeviceEvent]:
        return [DeviceEvent("SORTER1", "divert", {"tracking_id": "R1"}, T0 + k * 25,
                            T0 + k * 25 + arrival_offset, f"SORTER1/divert/{k}") for k in range(3)]

    live = RuleHarness([count_rule()], start=T0)
    live.source("SORTER1", lossless_reconnect=True)
    live.feed(*passes(0.01))
    replay = RuleHarness([count_rule()], start=T0 + HOUR)
    replay.source("SORTER1", lossless_reconnect=True)
    replay.feed(*passes(HOUR))
    assert live.types() == ["sort_exception"]
    assert [e.id for e in replay.events] == [e.id for e in live.events]


def test_backlog_of_a_device_with_a_corrected_clock_is_not_taken_for_a_new_clock(close_cfg):
    """CW1 3 h ahead (corrected). A broker outage: at reconnect the broker hands over what
    CW1 sent meanwhile, late, even before the agent has re-subscribed. Late is a backlog
    there, not a clock that changed: every carton still closes."""
    h = RuleHarness([Correlate(close_cfg, site="s1")], start=T0 - 1)
    h.source("SCN1", buffered=True, resumed=False)  # a new session: its messages are live
    h.source("CW1", buffered=True, resumed=False)
    for i in range(20):
        t = T0 + i * 0.1
        h.feed(scan(i, t), weight(i, t + 0.05 + 3 * HOUR, arrival=t + 0.06))
    assert h.engine.sources.by_device["CW1"].applied == pytest.approx(3 * HOUR, abs=1)
    h.feed(scan(20, T0 + 2.0))  # its weight is sent while the broker is down
    h.online("SCN1", False)
    h.online("CW1", False)
    h.run_until(T0 + 10)
    h.feed(weight(20, T0 + 2.05 + 3 * HOUR, arrival=T0 + 10))  # before the re-subscribe
    h.online("SCN1", True, resumed=True)
    h.online("CW1", True, resumed=True)
    for i in range(21, 30):
        t = T0 + 10 + i * 0.1
        h.feed(scan(i, t), weight(i, t + 0.05 + 3 * HOUR, arrival=t + 0.06))
    h.run_until(T0 + 40)
    assert by_type(h) == {"carton_closed": 30}


def test_windows_restored_after_a_restart_close_on_a_quiet_line(close_cfg):
    """kill -9 with windows open, and nothing more comes after the restart (everything was
    acknowledged): the restored windows still close, on quiet time after the restart."""
    import json

    import orjson

    live = line(close_cfg)
    live.feed(scan(0, T0), weight(0, T0 + 0.2), scan(1, T0 + 1))
    live.run_until(T0 + 2.5)  # the watermark is persisted by a tick
    state = {k: json.loads(orjson.dumps(v, default=lambda o: o.to_json()))
             for (r, k), v in live.committer.batch.state.items() if v is not None}
    again = RuleHarness([Correlate(close_cfg, site="s1")], start=T0 + 60)
    again.engine.restore({"close-station-1": {k: json.dumps(v) for k, v in state.items()}}, [])
    again.source("SCN1", buffered=True, resumed=True)
    again.source("CW1", buffered=True, resumed=True)
    again.run_until(T0 + 120)
    assert again.types() == ["carton_exception"]  # T1 had no weight
