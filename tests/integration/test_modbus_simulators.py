"""The ACME Modbus simulators, read by independent clients: pymodbus's and Debian's mbpoll.

These pin the register maps of device_profiles/acme_*.yaml from the outside (addresses are
written here as in the vendor manuals, values decoded here with struct), the devices'
behaviour (counters, handshakes) and every fault mode the connector tests rely on.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from ruamel.yaml import YAML

from edge_agent.profiles_modbus import ModbusProfile
from simulators.modbus_devices import (
    KINDS,
    PROFILES,
    CheckweigherSim,
    ConveyorSim,
    ModbusDeviceSim,
    PickToLightSim,
    Realism,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT = 1


@asynccontextmanager
async def client(port: int, timeout: float = 1.0) -> AsyncIterator[AsyncModbusTcpClient]:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=timeout, retries=0,
                             reconnect_delay=0)
    try:
        assert await c.connect(), f"cannot connect to 127.0.0.1:{port}"
        yield c
    finally:
        c.close()


async def hr(c: AsyncModbusTcpClient, address: int, count: int) -> list[int]:
    r = await c.read_holding_registers(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.registers)


async def ir(c: AsyncModbusTcpClient, address: int, count: int) -> list[int]:
    r = await c.read_input_registers(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.registers)


async def coils(c: AsyncModbusTcpClient, address: int, count: int) -> list[bool]:
    r = await c.read_coils(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.bits[:count])


def regs_bytes(regs: list[int]) -> bytes:
    return b"".join(struct.pack(">H", r) for r in regs)


def text(regs: list[int]) -> str:
    return regs_bytes(regs).rstrip(b"\0").decode("ascii")


async def eventually(check, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# --- profiles -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_profile_validates(kind: str) -> None:
    path = PROFILES / f"{KINDS[kind].profile_name}.yaml"
    profile = ModbusProfile.model_validate(YAML(typ="safe").load(path.read_text()))
    assert profile.events


# --- checkweigher: holding registers 40001.. (1-based), float CDAB ----------------------------

async def test_checkweigher_registers_per_manual() -> None:
    async with CheckweigherSim() as cw, client(cw.port) as c:
        seq = await cw.weigh("T0000017", 1234.5, in_tolerance=True)
        assert seq == 1
        regs = await hr(c, 0, 12)  # 40001-40012
        lo, hi = regs[0:2]
        assert struct.unpack(">f", regs_bytes([hi, lo]))[0] == 1234.5  # CDAB
        assert regs[2] == 1  # 40003 sequence
        assert regs[3] & 0b1111 == 0b0001  # 40004 in tolerance
        assert text(regs[4:9]) == "T0000017"  # 40005-40009
        assert struct.unpack(">I", regs_bytes(regs[9:11]))[0] == 1  # 40010 total, ABCD
        assert regs[11] == 1200  # 40012 nominal

        await cw.weigh("T0000018", 999.0, in_tolerance=False)
        regs = await hr(c, 0, 9)
        assert regs[2] == 2
        assert regs[3] & 0b1111 == 0b0010  # underweight, not in tolerance
        assert text(regs[4:9]) == "T0000018"

        regs = await hr(c, 12, 4)  # 40013-40016 weighing time, epoch ms, ABCD
        ms = struct.unpack(">Q", regs_bytes(regs))[0]
        assert ms == round(cw.log[-1].time * 1000) and abs(ms / 1000 - time.time()) < 60

        r = await c.read_holding_registers(16, count=1, device_id=UNIT)  # past 40016
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_ADDRESS


async def test_checkweigher_counter_increments_gaps_and_wraps() -> None:
    async with CheckweigherSim() as cw, client(cw.port) as c:
        seen = []
        for i in range(3):
            await cw.weigh(f"T{i}", 100.0 + i)
            seen.append((await hr(c, 2, 1))[0])
        assert seen == [1, 2, 3]
        cw.skip_counter(4)  # weighings 4-6 lost: a gap of 3
        assert (await hr(c, 2, 1))[0] == 7
        cw.set("seq", 65535)
        assert await cw.weigh("T9", 1.0) == 0
        assert (await hr(c, 2, 1))[0] == 0


async def test_checkweigher_automatic_mode() -> None:
    async with CheckweigherSim(rate=50) as cw, client(cw.port) as c:
        async def advanced() -> None:
            assert (await hr(c, 2, 1))[0] >= 5
        await eventually(advanced)
        assert text((await hr(c, 4, 5))).startswith("T")


# --- conveyor: 0-based, input registers + coil --------------------------------------------------

async def test_conveyor_running_jam_and_clear() -> None:
    async with ConveyorSim() as cv, client(cv.port) as c:
        assert await coils(c, 0, 1) == [True]
        regs = await ir(c, 0, 10)
        assert regs[0] == 0b0001  # ready
        assert regs[1] == 0
        assert 440 <= struct.unpack(">h", regs_bytes([regs[2]]))[0] <= 460  # 0.1 m/min

        cv.jam(1)
        regs = await ir(c, 0, 3)
        assert regs[0] == 0b0110  # jam + fault active, not ready
        assert regs[1] == 1  # jam at photo-eye
        assert regs[2] == 0
        assert await coils(c, 0, 1) == [False]

        cv.jam(3)
        assert (await ir(c, 0, 2)) == [0b1100, 3]  # e-stop: fault + e-stop bits, no jam

        cv.clear()
        assert (await ir(c, 0, 2)) == [0b0001, 0]
        assert await coils(c, 0, 1) == [True]


async def test_conveyor_counts_move_and_word_orders() -> None:
    async with ConveyorSim(rate=40) as cv, client(cv.port) as c:
        async def counting() -> None:
            regs = await ir(c, 4, 4)
            assert struct.unpack(">I", regs_bytes(regs[0:2]))[0] >= 5  # ABCD
            assert struct.unpack(">I", regs_bytes(regs[2:4]))[0] >= 5
        await eventually(counting)
        cv.set("infeed_count", 0x0001_0002)
        assert await ir(c, 4, 2) == [1, 2]  # ABCD: high word first
        cv.jam()  # stops run time and counting
        cv.set("motor_run_time_s", 0x0003_0004)
        assert await ir(c, 8, 2) == [4, 3]  # CDAB: low word first
        r = await c.read_input_registers(0, count=65, device_id=UNIT)  # limit is 64
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_VALUE


# --- pick-to-light: 1-based, handshakes -----------------------------------------------------

async def test_pick_to_light_confirm_handshake() -> None:
    async with PickToLightSim() as ptl, client(ptl.port) as c:
        base = 110  # position 2: 40111-40118 -> protocol 110-117
        await c.write_register(base + 4, 5, device_id=UNIT)  # WMS writes display qty
        assert ptl.get("display_qty_2") == 5
        assert text(await hr(c, base, 4)) == "A12-03-2"
        assert (await hr(c, base - 1, 1)) == [0]  # 40110 key sequence: no press yet

        assert ptl.confirm(2, 4)
        assert await coils(c, 0, 4) == [False, True, False, False]  # coil 00002
        assert (await hr(c, base + 4, 2)) == [5, 4]  # display, picked
        assert (await hr(c, base + 6, 1))[0] & 0b110 == 0b110  # confirm flag + online
        assert (await hr(c, base - 1, 1)) == [1]  # the press's sequence
        assert not ptl.confirm(2, 3)  # ignored until acknowledged
        assert not ptl.acknowledged("confirm_2")

        await c.write_coil(1, False, device_id=UNIT)  # the ack: the module clears the flag
        assert ptl.acks["confirm_2"] == 1 and ptl.presses[-1].acked

        async def cleared() -> None:
            assert await coils(c, 0, 4) == [False] * 4
            assert (await hr(c, base + 6, 1))[0] & 0b100 == 0
        await eventually(cleared)
        assert ptl.acknowledged("confirm_2")
        assert ptl.confirm(2, 3)
        assert (await hr(c, base - 1, 1)) == [2]
        assert [(p.position, p.kind, p.seq, p.qty) for p in ptl.presses] == [
            (2, "confirm", 1, 4), (2, "confirm", 2, 3)]


async def test_pick_to_light_short_handshake() -> None:
    async with PickToLightSim() as ptl, client(ptl.port) as c:
        base = 130  # position 4: 40131-40138
        assert ptl.short(4, 1)
        regs = await hr(c, base, 8)
        assert regs[5] == 1  # picked
        assert regs[6] & 0b111 == 0b011  # short flag + online
        await c.write_register(base + 7, 1, device_id=UNIT)  # 40138 short ack
        assert ptl.acks["short_4"] == 1

        async def cleared() -> None:
            regs = await hr(c, base, 8)
            assert regs[6] & 0b11 == 0b10
            assert regs[7] == 0  # the module reset the ack register
        await eventually(cleared)
        assert ptl.acknowledged("short_4")
        assert ptl.acks["short_1"] == 0


async def test_pick_to_light_heartbeat() -> None:
    async with PickToLightSim() as ptl, client(ptl.port) as c:
        assert await hr(c, 0, 1) == [12]  # zone number
        first = (await hr(c, 1, 1))[0]

        async def beating() -> None:
            assert (await hr(c, 1, 1))[0] != first
        await eventually(beating, timeout=3)


# --- fault injection, on every kind ------------------------------------------------------------

def first_read(sim: ModbusDeviceSim):  # type: ignore[no-untyped-def]
    """A valid read of the device's first table, as (client method name, address)."""
    table = next(iter(sim.memory.tables))
    lo = min(sim.memory.tables[table])
    method = {"coil": "read_coils", "discrete_input": "read_discrete_inputs",
              "input_register": "read_input_registers",
              "holding_register": "read_holding_registers"}[table]
    return method, lo


async def read_once(c: AsyncModbusTcpClient, sim: ModbusDeviceSim):  # type: ignore[no-untyped-def]
    method, address = first_read(sim)
    return await getattr(c, method)(address, count=1, device_id=UNIT)


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_fault_exception_responses(kind: str) -> None:
    async with KINDS[kind]() as sim, client(sim.port) as c:
        sim.faults.exception = ExcCodes.DEVICE_BUSY
        r = await read_once(c, sim)
        assert r.isError() and r.exception_code == ExcCodes.DEVICE_BUSY
        sim.faults.exception = ExcCodes.ILLEGAL_ADDRESS
        r = await read_once(c, sim)
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_ADDRESS
        sim.faults.clear()
        assert not (await read_once(c, sim)).isError()


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_fault_blackhole_times_out(kind: str) -> None:
    async with KINDS[kind]() as sim:
        sim.faults.blackhole = True
        async with client(sim.port, timeout=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(ModbusException):
                await read_once(c, sim)
            assert time.monotonic() - t0 >= 0.25
        sim.faults.blackhole = False
        async with client(sim.port) as c:
            assert not (await read_once(c, sim)).isError()


async def test_fault_slow_replies() -> None:
    async with CheckweigherSim() as cw, client(cw.port, timeout=2) as c:
        t0 = time.monotonic()
        await hr(c, 0, 3)
        fast = time.monotonic() - t0
        cw.faults.delay_ms = 300
        t0 = time.monotonic()
        await hr(c, 0, 3)
        assert time.monotonic() - t0 >= 0.29 > fast


async def test_fault_disconnect_closes_connections() -> None:
    async with ConveyorSim() as cv:
        reader, writer = await asyncio.open_connection("127.0.0.1", cv.port)
        # a raw Modbus/TCP read of input register 0: MBAP + PDU
        writer.write(struct.pack(">HHHBBHH", 1, 0, 6, UNIT, 4, 0, 1))
        reply = await asyncio.wait_for(reader.readexactly(11), 2)
        assert reply[7] == 4 and reply[8] == 2
        await asyncio.sleep(0.05)
        assert cv.disconnect() == 1
        assert await asyncio.wait_for(reader.read(), 2) == b""  # EOF from the device
        writer.close()
        async with client(cv.port) as c:  # a new connection is served
            assert await coils(c, 0, 1) == [True]


async def test_fault_stop_refuses_and_restart_serves_on_same_port() -> None:
    async with CheckweigherSim() as cw:
        await cw.weigh("T1", 500.0)
        port = cw.port
        await cw.stop()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await cw.start()
        assert cw.port == port
        async with client(port) as c:
            assert (await hr(c, 2, 1)) == [1]  # memory survives a restart
        await cw.restart(down_secs=0.05)
        async with client(port) as c:
            assert text(await hr(c, 4, 5)) == "T1"


# --- interoperability with Debian's mbpoll --------------------------------------------------------

def mbpoll_path() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        pytest.fail("mbpoll is not installed; `make test` installs it (apt-get install -y mbpoll)")
    return path


async def mbpoll(port: int, *args: str) -> dict[int, str]:
    """Run mbpoll once; returns {reference: printed value}."""
    proc = await asyncio.create_subprocess_exec(
        mbpoll_path(), "-m", "tcp", "-a", str(UNIT), "-1", "-o", "2", "-p", str(port), *args,
        "127.0.0.1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    text_out = out.decode()
    assert proc.returncode == 0, text_out
    return {int(m[1]): m[2] for m in re.finditer(r"^\[(\d+)\]:\s+(\S+)", text_out, re.M)}


async def test_mbpoll_reads_checkweigher() -> None:
    async with CheckweigherSim() as cw:
        await cw.weigh("T0000017", 1234.5, in_tolerance=True)
        # 16-bit holding registers, references as in the manual (1-based, mbpoll's default)
        values = await mbpoll(cw.port, "-t", "4", "-r", "1", "-c", "12")
        assert values[2] == "17562" and values[1] == "20480"  # 1234.5 = 0x449A5000, CDAB
        assert values[3] == "1"  # sequence
        assert values[4] == "1"  # in tolerance
        assert [int(values[r]) for r in range(5, 10)] == [0x5430, 0x3030, 0x3030, 0x3137, 0]  # "T0000017"
        assert values[12] == "1200"
        # float: mbpoll's default word order is low word first, i.e. CDAB
        assert float((await mbpoll(cw.port, "-t", "4:float", "-r", "1", "-c", "1"))[1]) == 1234.5
        # the total count is ABCD: mbpoll's -B (big endian word order)
        await cw.weigh("T0000018", 1000.0)
        assert (await mbpoll(cw.port, "-t", "4:int", "-B", "-r", "10", "-c", "1"))[10] == "2"


# --- the CLI ------------------------------------------------------------------------------------------

async def test_cli_ready_line_and_automatic_mode() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.modbus_devices", "--kind", "checkweigher",
        "--port", "0", "--rate", "20", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        m = re.fullmatch(r"READY checkweigher port=(\d+)\n", line)
        assert m, line
        async with client(int(m[1])) as c:
            async def advanced() -> None:
                assert (await hr(c, 2, 1))[0] >= 3
            await eventually(advanced)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()


# --- realistic behaviour (on by default, switchable, seeded) ------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_unit_ids_the_device_does_not_serve_get_exception_0x0b(kind: str) -> None:
    async with KINDS[kind]() as sim, client(sim.port) as c:
        method, address = first_read(sim)
        r = await getattr(c, method)(address, count=1, device_id=7)
        assert r.isError() and r.exception_code == ExcCodes.GATEWAY_NO_RESPONSE  # 0x0B
        assert not (await read_once(c, sim)).isError()  # unit 1 is served
    async with KINDS[kind](realism=Realism.off()) as sim, client(sim.port) as c:
        method, address = first_read(sim)
        assert not (await getattr(c, method)(address, count=1, device_id=7)).isError()


async def test_read_only_registers_refuse_writes() -> None:
    async with CheckweigherSim() as cw, client(cw.port) as c:
        await cw.weigh("T1", 500.0)
        r = await c.write_register(2, 99, device_id=UNIT)  # 40003 sequence: read-only
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_ADDRESS
        assert cw.get("seq") == 1
        assert not (await c.write_register(11, 1500, device_id=UNIT)).isError()  # nominal
        assert cw.get("nominal_weight_g") == 1500
    async with PickToLightSim() as ptl, client(ptl.port) as c:
        r = await c.write_register(99, 5, device_id=UNIT)  # 40100 key sequence
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_ADDRESS
        r = await c.write_registers(104, [3, 3], device_id=UNIT)  # display ok, picked not
        assert r.isError() and ptl.get("picked_qty_1") == 0 and ptl.get("display_qty_1") == 0
        assert not (await c.write_register(104, 3, device_id=UNIT)).isError()
    async with ConveyorSim() as cv, client(cv.port) as c:
        r = await c.write_coil(0, False, device_id=UNIT)
        assert r.isError() and r.exception_code == ExcCodes.ILLEGAL_ADDRESS
        assert cv.get("running")


async def test_a_press_while_the_flag_is_being_cleared_is_accepted() -> None:
    """After the acknowledge the module shows the flag a while longer; a press then is a new
    key event (new sequence), so the flag may never be seen clear between two presses."""
    realism = Realism(ack_clear_ms=(5000, 5000))
    async with PickToLightSim(realism=realism) as ptl, client(ptl.port) as c:
        assert ptl.confirm(1, 2)
        assert not ptl.confirm(1, 5)  # not acknowledged: ignored
        await c.write_coil(0, False, device_id=UNIT)
        assert await coils(c, 0, 1) == [True]  # acknowledged, not yet cleared
        assert ptl.confirm(1, 3)  # accepted
        assert (await hr(c, 99, 8))[0::6] == [2, 3]  # key sequence 2, picked 3
        assert await coils(c, 0, 1) == [True]
        assert [(p.seq, p.qty, p.acked) for p in ptl.presses] == [(1, 2, True), (2, 3, False)]
        assert ptl.counts() == {"confirm": 2, "short": 0, "ignored": 1}


async def test_delays_are_seeded() -> None:
    def delays(seed: int) -> list[float]:
        sim = PickToLightSim(realism=Realism(seed=seed))
        return [sim.rng.uniform(*sim.realism.ack_clear_ms) for _ in range(3)]
    assert delays(3) == delays(3) != delays(4)


@pytest.mark.parametrize("reset", [False, True])
async def test_device_restart_mid_flow_keeps_counters(reset: bool) -> None:
    async with PickToLightSim() as ptl:
        assert ptl.confirm(3, 4)  # pending, never acknowledged
        await ptl.restart(0.05, reset=reset)
        async with client(ptl.port) as c:
            regs = await hr(c, 119, 8)  # position 3: 40120-40127
            assert regs[0] == 1  # the key sequence survives a power cycle
            assert bool(regs[7] & 0b100) is not reset  # the pending flag only without reset
            assert text(regs[1:5]) == "A12-03-3"
        assert ptl.presses[0].lost is reset
        assert ptl.confirm(3, 1) is reset  # with the flag kept, still waiting for its ack
    async with CheckweigherSim() as cw:
        await cw.weigh("T1", 500.0)
        await cw.restart(0.0, reset=reset)
        assert cw.get("seq") == 1 and cw.get("total_count") == 1
        assert cw.get("tracking_id") == ("" if reset else "T1")
    async with ConveyorSim() as cv:
        cv.jam(1)
        await cv.restart(0.0, reset=reset)
        assert cv.get("fault_count") == 1 and cv.get("jam") is not reset
