"""Device-event identity and time over real TCP against the (realistic) pymodbus simulators.

A device event's id comes from what the device said (a key sequence, its own time, the
data), never from a poll count or the agent's clock: one press is one id, read again after
a failed acknowledge or by a new connector after a crash, so the engine's dedup drops the
repeat. A handshake is re-armed only once its flag is seen cleared; the key sequence makes
a press in between safe. The event time is the device's own when the profile names one.
"""

from __future__ import annotations

import time

from pymodbus.constants import ExcCodes

from edge_agent.testing.fakes import RecordingIngest
from simulators.modbus_devices import CheckweigherSim, ConveyorSim, PickToLightSim, Realism

from .test_modbus_connector import connector, running, until


class NeverAcks(RecordingIngest):
    """Records events and never runs their acks: the agent crashed after the commit."""

    def device_event(self, ev, ack):  # type: ignore[no-untyped-def]
        self.events.append(ev)


def ids(ing: RecordingIngest, event: str | None = None) -> list[str]:
    return [e.msg_id for e in ing.events if event is None or e.event == event]


async def test_one_press_is_one_event_when_the_device_clears_its_flag_late():
    """The module clears the flag 150-300 ms after the ack (several polls): the flag still
    seen set after the ack is the same press, not a new one."""
    async with PickToLightSim(realism=Realism(ack_clear_ms=(150, 300))) as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            for n in range(5):
                assert sim.confirm(1, n + 1)
                assert await until(lambda: sim.acknowledged("confirm_1"), 10)
            polls = c.polls
            assert await until(lambda: c.polls >= polls + 4)  # a few more looks
            assert len(ing.events) == len(sim.presses) == 5, [e.msg_id for e in ing.events]
            assert [e.fields["press_seq"] for e in ing.events] == [1, 2, 3, 4, 5]
            assert [e.fields["qty_picked"] for e in ing.events] == [1, 2, 3, 4, 5]


async def test_a_press_before_the_flag_was_seen_cleared_is_not_missed():
    """Acknowledged, the flag still shown, the picker presses again: the flag is never seen
    clear, the key sequence tells the second press from the first."""
    async with PickToLightSim(realism=Realism(ack_clear_ms=(60_000, 60_000))) as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            for n in range(4):
                assert await until(lambda n=n: sim.confirm(2, n + 1), 10)  # once acked
            assert await until(lambda: all(p.acked for p in sim.presses), 10)
            polls = c.polls
            assert await until(lambda: c.polls >= polls + 4)  # the flag is still shown set
            assert [(e.event, e.fields["press_seq"], e.fields["qty_picked"]) for e in ing.events] \
                == [("confirm_2", p.seq, p.qty) for p in sim.presses]
            assert len(set(ids(ing))) == 4


async def test_a_failed_acknowledge_reads_the_same_press_again_under_the_same_id():
    async with PickToLightSim() as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1", offline_after_failures=1000)
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            sim.faults.exception = ExcCodes.DEVICE_FAILURE
            sim.faults.exception_on = "write"  # the device refuses the acknowledge
            assert sim.confirm(3, 2)
            assert await until(lambda: len(ing.events) >= 3)  # read again, ack tried again
            assert len(set(ids(ing))) == 1, ids(ing)
            sim.faults.clear()
            assert await until(lambda: sim.acknowledged("confirm_3"), 10)
            assert set(ids(ing)) == {"PTL1/confirm_3/press_seq_3=1"}
            assert sim.acks["confirm_3"] == 1


async def test_pick_to_light_crash_between_commit_and_ack_re_emits_the_same_ids():
    """Events committed, acks never written (the agent died): a new connector reads the
    still-set flags and makes the same ids, which the engine drops as duplicates."""
    async with PickToLightSim() as sim:
        sim.set("display_qty_1", 5)  # data that may change while the flag is set
        first = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(first, ingest=NeverAcks()) as before:
            assert await until(lambda: first.health.state == "online")
            assert sim.confirm(1, 4) and sim.short(2, 1)
            assert await until(lambda: len(before.events) == 2)
        sim.set("display_qty_1", 6)  # the WMS lit the next pick meanwhile
        second = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(second) as after:
            assert await until(lambda: sim.acknowledged("confirm_1") and sim.acknowledged("short_2"), 10)
            polls = second.polls
            assert await until(lambda: second.polls >= polls + 4)
        assert sorted(ids(after)) == sorted(ids(before))
        assert len(after.events) == 2


async def test_checkweigher_and_conveyor_ids_do_not_depend_on_who_polls_when():
    """The same weighing and the same jam, seen by two connectors polling at their own
    times (as an agent before and after a restart would), have the same ids."""
    async with CheckweigherSim() as cw, ConveyorSim() as cv:
        cws = [connector(cw, "acme_checkweigher_mb", "CW2") for _ in range(2)]
        cvs = [connector(cv, "acme_conveyor_section", "CONV3") for _ in range(2)]
        ings = [RecordingIngest() for _ in range(2)]
        async with running(cws[0], cvs[0], ingest=ings[0]), \
                running(cws[1], cvs[1], ingest=ings[1]):
            assert await until(lambda: all(c.polls >= 3 for c in cws + cvs))
            await cw.weigh("T0000001", 1001.0)
            cv.jam(1)
            assert await until(lambda: all(len(ids(i, "weight")) == 1 and len(ids(i, "jam")) == 1
                                           for i in ings))
            cv.clear()
            assert await until(lambda: all(c.values.get("jam") is False for c in cvs))
            cv.jam(1)  # the same jam again, nothing else moved: still another fault
            await cw.weigh("T0000002", 1002.0)
            assert await until(lambda: all(len(ids(i, "weight")) == 2 and len(ids(i, "jam")) == 2
                                           for i in ings))
        for event in ("weight", "jam", "fault"):
            assert ids(ings[0], event) == ids(ings[1], event)
            assert len(set(ids(ings[0], event))) == len(ids(ings[0], event))


async def test_event_time_is_the_devices_own_when_the_profile_names_it():
    async with CheckweigherSim() as cw, PickToLightSim() as ptl:
        ccw = connector(cw, "acme_checkweigher_mb", "CW2")
        cptl = connector(ptl, "acme_pick_to_light", "PTL1")
        async with running(ccw, cptl) as ing:
            assert await until(lambda: ccw.polls >= 3 and cptl.polls >= 3)
            cw.set("weigh_time", 1_700_000_000.123)  # the weigher's clock is its own
            cw.set("seq", cw.get("seq") + 1)
            t0 = time.time()
            assert ptl.confirm(1, 1)
            assert await until(lambda: len(ing.events) == 2)
            t1 = time.time()
        weight = next(e for e in ing.events if e.event == "weight")
        assert abs(weight.time - 1_700_000_000.123) < 1e-6
        assert t0 <= weight.received_at <= t1
        press = next(e for e in ing.events if e.event == "confirm_1")
        assert t0 <= press.time == press.received_at <= t1  # no device time: the poll's


async def test_a_device_restart_mid_flow_loses_and_repeats_nothing():
    async with PickToLightSim() as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            sim.faults.exception = ExcCodes.DEVICE_BUSY
            sim.faults.exception_on = "write"
            assert sim.confirm(4, 3)
            assert await until(lambda: len(ing.events) >= 1)
            await sim.restart(0.3)  # registers kept: the unacknowledged press is still there
            sim.faults.clear()
            assert await until(lambda: sim.acknowledged("confirm_4"), 15)
            assert sim.confirm(4, 2)
            assert await until(lambda: sim.acknowledged("confirm_4") and len(set(ids(ing))) == 2, 15)
        assert sorted(set(ids(ing))) == ["PTL1/confirm_4/press_seq_4=1", "PTL1/confirm_4/press_seq_4=2"]


async def test_a_device_running_before_the_agent_shows_only_what_follows():
    """Weighings before the agent connected are not events (a counter's first value is a
    baseline); every event after is a true weighing of the ground truth, once."""
    async with CheckweigherSim(rate=10, seed=3) as cw:
        assert await until(lambda: len(cw.log) >= 5, 15)
        before = cw.log[-1].seq  # weighed before the agent was there
        c = connector(cw, "acme_checkweigher_mb", "CW2")
        async with running(c) as ing:
            assert await until(lambda: len(ing.events) >= 5, 15)
        truth = {w.seq: w for w in cw.log}
        assert all(e.fields["seq"] > before for e in ing.events)
        for e in ing.events:
            w = truth[e.fields["seq"]]
            assert e.fields["tracking_id"] == w.tracking_id and abs(e.time - w.time) < 1e-3
        assert len({e.msg_id for e in ing.events}) == len(ing.events)
