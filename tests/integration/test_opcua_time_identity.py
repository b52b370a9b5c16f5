"""Device time and message identity from what the OPC UA device said (issue 7 items 2, 4):
an event takes the trigger's SourceTimestamp (an OPC UA event its Time), never the agent's
clock; its id comes from the device's data, so the same notification seen again -- by a
reconnected or a restarted agent -- has the same id, or makes no event at all."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from edge_agent.profiles_opcua import OpcuaProfile
from simulators.opcua_sorter import SorterSim
from tests.integration.test_opcua_binding import (
    Divert,
    connector,
    divert_profile,
    ms,
    running,
    until,
)
from tests.integration.test_opcua_connector import shipped_profile

pytestmark = pytest.mark.timeout(120)


def change_profile() -> OpcuaProfile:
    """A tracking id that changes (no counter): an event per new value, with the lane."""
    return OpcuaProfile.model_validate({
        "version": 1, "vendor": "test", "model": "divert record", "protocol": "opcua",
        "signals": {n.lower(): {"node": f"nsu=urn:test:divert;s=D.{n}"}
                    for n in ("TrackingId", "Lane", "Count")},
        "events": {"seen": {"trigger": {"kind": "change", "signal": "trackingid"},
                            "fields": {"lane": "lane"}}},
    })


async def test_event_time_is_the_triggers_source_timestamp_not_the_agents_clock():
    async with Divert() as srv:
        c = connector(srv.endpoint, divert_profile())
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            stamped = ms(time.time() - 3 * 3600)  # a device clock three hours behind
            t0 = time.time()
            await srv.divert("A", 1, stamped)
            assert await until(lambda: len(ing.events) == 1)
            ev = ing.events[0]
            assert ev.time == stamped.timestamp()  # as the device said it: not clamped
            assert t0 <= ev.received_at <= time.time()  # arrival: the agent's clock


async def test_opcua_event_time_is_its_time_property():
    async with SorterSim(rate=0, travel_secs=0.2, clock_offset_secs=3600, clock_drift_ppm=0) as sim:
        c = connector(sim.endpoint, shipped_profile())
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            await sim.induct("S1", "C1", lane=4)
            await sim.alarm("sorter jammed (fault 1001)")
            assert await until(lambda: {e.event for e in ing.events} >= {"induct", "divert", "alarm"})
            for ev in ing.events:  # the sorter's clock is an hour ahead
                assert 3590 < ev.time - ev.received_at < 3610, ev
                assert ev.time * 1000 == int(ev.time * 1000)  # its milliseconds, not ours


async def test_same_notification_same_id_for_every_agent_and_after_a_reconnect():
    async with Divert() as srv:
        a = connector(srv.endpoint, change_profile())
        b = connector(srv.endpoint, change_profile())
        async with running(a) as ing_a, running(b) as ing_b:
            assert await until(lambda: a.health.state == b.health.state == "online")
            when = ms(time.time())
            await srv.write("Lane", 9, when)
            await srv.write("TrackingId", "X1", when)
            assert await until(lambda: len(ing_a.events) == len(ing_b.events) == 1)
            await srv.write("TrackingId", "X2", when)  # same millisecond, another value
            assert await until(lambda: len(ing_a.events) == len(ing_b.events) == 2)
            ids = [e.msg_id for e in ing_a.events]
            assert ids == [e.msg_id for e in ing_b.events]  # what the device said, not when
            assert len(set(ids)) == 2
            assert all(when.isoformat() in i for i in ids)
            # A reconnect re-sends the current value: no event (and never another id).
            restarts = a.health.restarts
            await srv.restart()
            assert await until(lambda: a.health.restarts > restarts and a.health.state == "online")
            await srv.write("TrackingId", "X3", when + dt.timedelta(milliseconds=1))
            assert await until(lambda: len(ing_a.events) == 3)
            assert [e.msg_id for e in ing_a.events[:2]] == ids
        # A restarted agent sees the current value as its baseline: no event for it.
        fresh = connector(srv.endpoint, change_profile())
        async with running(fresh) as ing:
            assert await until(lambda: fresh.health.state == "online")
            await srv.write("TrackingId", "X4", when + dt.timedelta(milliseconds=2))
            assert await until(lambda: len(ing.events) == 1)
            assert ing.events[0].fields == {"lane": 9}
            assert ing.events[0].msg_id not in {e.msg_id for e in ing_a.events}
