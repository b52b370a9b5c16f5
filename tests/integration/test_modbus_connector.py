"""The Modbus connector over real TCP against the pymodbus simulators: events from state,
acknowledges written after the commit, and fault isolation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from pymodbus.constants import ExcCodes

from edge_agent.config import ModbusConnection
from edge_agent.connectors.modbus import ModbusConnector
from edge_agent.profiles import load_profile
from edge_agent.runtime.clock import SystemClock
from edge_agent.runtime.supervisor import supervise
from edge_agent.testing.fakes import RecordingIngest
from simulators.modbus_devices import CheckweigherSim, ConveyorSim, PickToLightSim

PROFILES = Path(__file__).parents[2] / "device_profiles"


def connector(sim, profile: str, device: str, **conn) -> ModbusConnector:
    conn.setdefault("timeout_ms", 300)
    c = ModbusConnection(kind="modbus", host="127.0.0.1", port=sim.port, **conn)
    return ModbusConnector(device, c, load_profile(PROFILES / f"{profile}.yaml"), SystemClock())


@contextlib.asynccontextmanager
async def running(*connectors: ModbusConnector, ingest=None):
    ingest = ingest or RecordingIngest()
    tasks = [
        asyncio.create_task(supervise(c.name, lambda c=c: c.run(ingest), c.health,
                                      initial_backoff_secs=0.2, max_backoff_secs=1.0))
        for c in connectors
    ]
    try:
        yield ingest
    finally:
        for c in connectors:
            await c.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(pred, secs: float = 5.0) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def polled(c: ModbusConnector, n: int = 3, secs: float = 10.0) -> bool:
    """`c` polled `n` more times (the first poll only learns counters and edges)."""
    start = c.polls
    return await until(lambda: c.polls >= start + n, secs)


async def test_checkweigher_counter_makes_one_event_per_weighing_and_reports_gaps():
    async with CheckweigherSim() as sim:
        c = connector(sim, "acme_checkweigher_mb", "CW2")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert await polled(c)
            await sim.weigh("T0000042", 1234.5, True)
            assert await until(lambda: len(ing.events) == 1)
            ev = ing.events[0]
            assert (ev.device, ev.event) == ("CW2", "weight")
            assert ev.fields["tracking_id"] == "T0000042"
            assert abs(ev.fields["weight_g"] - 1234.5) < 1e-3
            assert ev.fields["in_tolerance"] is True
            sim.skip_counter(3)  # two weighings the agent never saw
            assert await until(lambda: len(ing.events) == 2)
            assert [b[2] for b in ing.bad] == ["counter_gap"]
            assert "2 event(s) missed" in ing.bad[0][3]
            assert c.status()["counter_gaps"] == {"weight": 2}


async def test_pick_to_light_confirm_and_short_are_acknowledged_after_the_event():
    async with PickToLightSim() as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert sim.confirm(2, 4)
            assert await until(lambda: len(ing.events) == 1)
            ev = ing.events[0]
            assert ev.event == "confirm_2"
            assert ev.fields["position"] == 2
            assert 4 in ev.fields.values()  # the quantity picked, under the profile's name
            assert await until(lambda: sim.acknowledged("confirm_2"))
            assert sim.short(3, 1)
            assert await until(lambda: len(ing.events) == 2)
            assert ing.events[1].event == "short_3"
            assert await until(lambda: sim.acknowledged("short_3"))
            assert await polled(c)
            assert len(ing.events) == 2  # one event per press, not one per poll


async def test_held_ack_means_the_device_keeps_its_data():
    """Until the event is durable (the ack callback runs) the flag stays set, and the
    connector does not make the event again while it waits."""

    class HoldingIngest(RecordingIngest):
        def device_event(self, ev, ack):
            self.events.append(ev)
            self.held = ack

    async with PickToLightSim() as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c, ingest=HoldingIngest()) as ing:
            assert await until(lambda: c.health.state == "online")
            sim.confirm(1, 2)
            assert await until(lambda: len(ing.events) == 1)
            assert await polled(c)
            assert not sim.acknowledged("confirm_1") and len(ing.events) == 1
            ing.held()
            assert await until(lambda: sim.acknowledged("confirm_1"))


async def test_conveyor_jam_is_an_event_with_the_fault_text():
    async with ConveyorSim() as sim:
        c = connector(sim, "acme_conveyor_section", "CONV3")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert await polled(c)
            sim.jam(1)
            assert await until(lambda: any(e.event == "jam" for e in ing.events))
            jam = next(e for e in ing.events if e.event == "jam")
            assert jam.fields["fault_code"] == "jam_at_photo_eye"  # the enum text, not the code
            sim.clear()
            assert await polled(c)
            sim.jam(2)  # a motor overload is a fault, not a jam
            faults = lambda: [e for e in ing.events if e.event == "fault"]  # noqa: E731
            assert await until(lambda: len(faults()) == 2)  # the jam was a fault too
            fault = faults()[-1]
            assert fault.fields["fault_code"] == "motor_overload"
            assert [e.event for e in ing.events].count("jam") == 1


async def test_one_silent_device_does_not_slow_the_others():
    async with CheckweigherSim() as a, CheckweigherSim() as b, CheckweigherSim() as bad:
        ca = connector(a, "acme_checkweigher_mb", "A")
        cb = connector(b, "acme_checkweigher_mb", "B")
        cbad = connector(bad, "acme_checkweigher_mb", "BAD")
        async with running(ca, cb, cbad):
            assert await until(lambda: all(c.health.state == "online" for c in (ca, cb, cbad)))
            bad.faults.blackhole = True  # accepts, never answers
            await asyncio.sleep(0.5)
            pa, pb = ca.polls, cb.polls
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            elapsed = time.monotonic() - t0
            fast = min(g.interval_ms for g in ca.profile.poll_groups.values()) / 1000
            # Healthy devices keep (nearly) their own rate: at least 80% of their polls.
            per_sec = sum(1 / (g.interval_ms / 1000) for g in ca.profile.poll_groups.values())
            assert ca.polls - pa >= 0.8 * per_sec * elapsed, (ca.polls - pa, per_sec, fast)
            assert cb.polls - pb >= 0.8 * per_sec * elapsed
            assert cbad.health.state in ("degraded", "offline")
            assert "no answer" in (cbad.health.last_error or "")


async def test_late_replies_are_never_taken_for_the_answer_to_another_request():
    async with CheckweigherSim() as sim:
        c = connector(sim, "acme_checkweigher_mb", "CW2", timeout_ms=200)
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert await polled(c)
            sim.faults.delay_ms = 350  # every reply comes after the request timed out
            for i in range(5):
                await sim.weigh(f"T{i:07d}", 1000.0 + i, True)
                await asyncio.sleep(0.15)
            sim.faults.delay_ms = 0
            await sim.weigh("T0000099", 1099.0, True)
            assert await until(lambda: any(e.fields["tracking_id"] == "T0000099" for e in ing.events), 10)
            # Every event's fields belong together: weight 1000+i goes with T000000i.
            for e in ing.events:
                i = int(e.fields["tracking_id"][1:])
                assert abs(e.fields["weight_g"] - (1000.0 + i)) < 1e-3, e.fields


async def test_device_restart_reconnects_within_10_s():
    async with CheckweigherSim() as sim:
        c = connector(sim, "acme_checkweigher_mb", "CW2")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            await sim.stop()
            assert await until(lambda: c.health.state == "offline", 5)
            r0 = c.health.restarts
            await asyncio.sleep(3.0)
            # No busy loop while it is down: reconnects back off (full jitter up to 0.2 s
            # doubling to 1 s here: about 6 to 12 tries in 3 s; a busy loop makes hundreds).
            attempts = c.health.restarts - r0
            assert attempts >= 1, "it keeps trying"
            assert attempts <= 20, attempts
            await sim.start()
            t0 = time.monotonic()
            assert await until(lambda: c.health.state == "online", 10)
            assert time.monotonic() - t0 < 10
            assert await polled(c)
            await sim.weigh("T0000007", 777.0, True)
            assert await until(lambda: any(e.fields["tracking_id"] == "T0000007" for e in ing.events))


async def test_exception_responses_are_clear_errors_and_degrade_without_crashing():
    """Only exception responses: degraded (an answer is not an outage: never offline, with
    the default thresholds), counted, and online again at the next good read."""
    async with CheckweigherSim() as sim:
        c = connector(sim, "acme_checkweigher_mb", "CW2")
        async with running(c):
            assert await until(lambda: c.health.state == "online")
            sim.faults.exception = ExcCodes.DEVICE_BUSY
            assert await until(lambda: c.health.state == "degraded", 15)
            assert "exception 6 (SERVER DEVICE BUSY)" in c.health.last_error
            assert c.status()["exception_responses"]["fc3 exception 6 (SERVER DEVICE BUSY)"] >= 3
            sim.faults.exception = None
            assert await until(lambda: c.health.state == "online")
            assert c.health.restarts == 0


async def test_rtu_frames_over_tcp_for_serial_gateways():
    """A serial gateway passing RTU frames (CRC, no MBAP header) over TCP."""
    from pymodbus import FramerType
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    sim = CheckweigherSim()  # its memory and behaviour, served by an RTU-framing server
    server = ModbusTcpServer(
        SimDevice(0, simdata=SimData(0, values=0, datatype=DataType.REGISTERS)),
        framer=FramerType.RTU, address=("127.0.0.1", 0),
    )
    server.context = sim.memory  # as simulators.modbus_devices does
    await server.serve_forever(background=True)
    sim.port = server.transport.sockets[0].getsockname()[1]
    try:
        c = connector(sim, "acme_checkweigher_mb", "CW9", framing="rtu_over_tcp")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert await polled(c)
            await sim.weigh("T0000900", 900.5, False)
            assert await until(lambda: len(ing.events) == 1)
            assert ing.events[0].fields["tracking_id"] == "T0000900"
            assert ing.events[0].fields["in_tolerance"] is False
    finally:
        await server.shutdown()


async def test_a_press_right_after_an_acknowledge_is_not_missed():
    async with PickToLightSim() as sim:
        c = connector(sim, "acme_pick_to_light", "PTL1")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            for n in range(10):
                # Press again as soon as the previous press is acknowledged, before a poll
                # could see the flag cleared.
                assert await until(lambda n=n: sim.confirm(1, n + 1), 5)
            assert await until(lambda: len(ing.events) == 10)
            assert await polled(c)
            assert [e.fields["qty_picked"] for e in ing.events] == list(range(1, 11))


async def test_paused_reading_leaves_the_data_on_the_device_until_resumed():
    """The outbox is full: no polls, nothing ingested, the press not acknowledged (it stays
    on the device); at resume it arrives, once, and is acknowledged. A checkweigher's latest
    weighing is still in its registers and arrives too."""
    async with PickToLightSim() as ptl, CheckweigherSim() as cw, CheckweigherSim() as clock_sim:
        c = connector(ptl, "acme_pick_to_light", "PTL1")
        w = connector(cw, "acme_checkweigher_mb", "CW2")
        clock = connector(clock_sim, "acme_checkweigher_mb", "CLOCK")  # never paused
        async with running(c, w, clock) as ing:
            assert await until(lambda: all(x.health.state == "online" for x in (c, w, clock)))
            assert await polled(c) and await polled(w)
            c.pause_reading()
            w.pause_reading()
            assert c.status()["paused"] and w.status()["paused"]
            reads = ptl.memory.reads
            assert ptl.confirm(3, 5)
            await cw.weigh("T0000555", 555.0, True)
            # An unpaused device polled 20 times meanwhile: the paused ones would have, too.
            assert await polled(clock, 20)
            assert ing.events == []
            assert not ptl.acknowledged("confirm_3")  # still on the device
            assert ptl.memory.reads <= reads + 1  # at most the poll that was on the wire
            c.resume_reading()
            w.resume_reading()
            assert await until(lambda: len(ing.events) == 2)
            assert {e.event for e in ing.events} == {"confirm_3", "weight"}
            assert await until(lambda: ptl.acknowledged("confirm_3"))
            assert next(e for e in ing.events if e.event == "weight").fields["tracking_id"] == "T0000555"
            assert await polled(c)
            assert len(ing.events) == 2 and ing.bad == []
