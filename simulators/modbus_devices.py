"""Modbus TCP device simulators: an ACME conveyor section, checkweigher and pick-to-light zone.

Owns simulated device memory laid out per the profiles in ``device_profiles/acme_*.yaml``,
device behaviour (a weighing advances the sequence counter, a key press sets a flag the
host must acknowledge) and fault injection. It never imports ``edge_agent``: values are
encoded here with ``struct`` from the YAML's plain data, so reading them back through the
agent's decoder is an independent check of that decoder.

Shape: a pymodbus ``ModbusTcpServer`` answers from our own datastore (`DeviceMemory`) on an
ephemeral port; clients connect to a thin asyncio TCP proxy on the public port, which is
what makes the transport faults possible (blackhole, slow replies, dropped connections,
stop and restart on the same port). Exception responses come from the datastore.

    async with CheckweigherSim(port=0) as cw:          # in-process, port 0 = pick one
        await cw.weigh("T0000001", 1234.5, True)
        cw.faults.delay_ms = 300                        # every reply 300 ms late
        await cw.restart(0.5, reset=True)               # a power cycle mid-flow

Devices behave like the real equipment by default (`Realism`: unknown unit ids answered
with exception 0x0B, read-only registers refuse writes, handshake flags cleared a while
after the acknowledge); `realism=Realism.off()` is an ideal device. Ground truth:
`CheckweigherSim.log`, `ConveyorSim.faults_log`, `PickToLightSim.presses` (with the key
sequence each press got, as the agent's events carry it in `press_seq`).

    python -m simulators.modbus_devices --kind checkweigher --port 5020 --rate 5
    # prints "READY checkweigher port=5020", runs until SIGINT/SIGTERM

Everything binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from ruamel.yaml import YAML

PROFILES = Path(__file__).resolve().parents[1] / "device_profiles"

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
# Function code -> table, as in the Modbus application protocol spec.
FC_TABLE: dict[int, Table] = {
    1: "coil", 5: "coil", 15: "coil",
    2: "discrete_input",
    4: "input_register",
    3: "holding_register", 6: "holding_register", 16: "holding_register",
    22: "holding_register", 23: "holding_register",
}
STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "int64": ">q",
          "uint64": ">Q", "float32": ">f", "float64": ">d"}
INT_BITS = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}


# --- encoding (our own, deliberately not edge_agent.codecs) ---------------------------

def order_bytes(big_endian: bytes, order: str) -> bytes:
    """Rearrange a big-endian (ABCD) value into `order`, for values of 2 or more registers.

    ABCD: high word first, high byte first. DCBA: all bytes reversed (little endian).
    BADC: high word first, bytes swapped in each word. CDAB: words reversed, bytes in a
    word big endian. For 64-bit values the same rule applies to all four words.
    """
    words = [big_endian[i:i + 2] for i in range(0, len(big_endian), 2)]
    if order == "ABCD":
        return big_endian
    if order == "DCBA":
        return big_endian[::-1]
    if order == "BADC":
        return b"".join(w[::-1] for w in words)
    if order == "CDAB":
        return b"".join(reversed(words))
    raise ValueError(f"unknown byte order {order!r}")


def to_registers(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def from_registers(regs: Sequence[int]) -> bytes:
    return b"".join(r.to_bytes(2, "big") for r in regs)


@dataclass(frozen=True)
class SignalSpec:
    """One signal of a profile, as plain data, with protocol (0-based) address."""

    name: str
    table: Table
    address: int
    type: str
    order: str
    bit: int | None = None
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0

    @property
    def count(self) -> int:
        if self.table in ("coil", "discrete_input") or self.type in ("bit", "int16", "uint16"):
            return 1
        if self.type == "string":
            assert self.length is not None
            return self.length
        return struct.calcsize(STRUCT[self.type]) // 2

    def encode(self, value: Any) -> list[int]:
        """Engineering value -> registers (not for bool/bit signals)."""
        if self.type == "string":
            assert self.length is not None
            raw = str(value).encode("ascii")
            if len(raw) > 2 * self.length:
                raise ValueError(f"{self.name}: {value!r} is longer than {2 * self.length} chars")
            raw = raw.ljust(2 * self.length, b"\0")
            if self.order in ("BADC", "DCBA"):  # byte-swapped text, as some PLCs send
                raw = b"".join(raw[i:i + 2][::-1] for i in range(0, len(raw), 2))
            return to_registers(raw)
        fmt = STRUCT[self.type]
        if self.type.startswith("float"):
            raw_value: float | int = (float(value) - self.offset) / self.scale
        else:
            raw_value = round((float(value) - self.offset) / self.scale)
            bits = INT_BITS[self.type]
            if self.type.startswith("uint"):
                raw_value %= 1 << bits  # counters wrap like the device's
        data = struct.pack(fmt, raw_value)
        if len(data) > 2:
            data = order_bytes(data, self.order)
        return to_registers(data)

    def decode(self, regs: Sequence[int]) -> Any:
        """Registers -> engineering value (the inverse of encode, for `get`)."""
        data = from_registers(regs)
        if self.type == "string":
            if self.order in ("BADC", "DCBA"):
                data = b"".join(data[i:i + 2][::-1] for i in range(0, len(data), 2))
            return data.rstrip(b"\0").decode("ascii")
        if len(data) > 2:
            # Each reordering is its own inverse.
            data = order_bytes(data, self.order)
        (raw,) = struct.unpack(STRUCT[self.type], data)
        value = raw * self.scale + self.offset
        return value if self.type.startswith("float") or self.scale != 1.0 or self.offset \
            else int(value)


def load_profile(name: str, directory: Path = PROFILES) -> dict[str, Any]:
    """The profile YAML as plain data."""
    with open(directory / f"{name}.yaml", encoding="utf-8") as f:
        data: dict[str, Any] = YAML(typ="safe").load(f)
    return data


def signal_specs(profile: dict[str, Any]) -> dict[str, SignalSpec]:
    base = int(profile.get("addressing", 0))
    default_order = profile.get("byte_order", "ABCD")
    return {
        name: SignalSpec(
            name=name, table=s["table"], address=int(s["address"]) - base, type=s["type"],
            order=s.get("order") or default_order, bit=s.get("bit"), length=s.get("length"),
            scale=float(s.get("scale", 1.0)), offset=float(s.get("offset", 0.0)),
        )
        for name, s in profile["signals"].items()
    }


# --- device memory: the datastore pymodbus answers from --------------------------------

@dataclass
class Faults:
    """What the simulated device does wrong; change fields at any time.

    blackhole: connections are accepted and requests read, but nothing is answered.
    delay_ms: every reply is held this long before it is sent.
    exception: answer requests with this Modbus exception code instead (e.g.
        ExcCodes.ILLEGAL_ADDRESS = 2, ExcCodes.DEVICE_BUSY = 6); `exception_on` says
        whether reads, writes or both get it.
    exception_rate: the fraction of those requests that get it (1.0, the default: every
        one), drawn from a random generator seeded with `exception_seed`, as a busy PLC or
        a gateway answers "busy" now and then.
    """

    blackhole: bool = False
    delay_ms: int = 0
    exception: ExcCodes | None = None
    exception_on: Literal["read", "write", "all"] = "read"
    exception_rate: float = 1.0
    exception_seed: int = 0
    exceptions_sent: int = 0  # requests answered with `exception`
    _rng: random.Random | None = field(default=None, repr=False, compare=False)

    def draw_exception(self) -> bool:
        """Whether this request gets the exception (counted)."""
        if self.exception_rate < 1.0:
            if self._rng is None:
                self._rng = random.Random(self.exception_seed)
            if self._rng.random() >= self.exception_rate:
                return False
        self.exceptions_sent += 1
        return True

    def clear(self) -> None:
        self.blackhole = False
        self.delay_ms = 0
        self.exception = None
        self.exception_on = "read"
        self.exception_rate = 1.0


@dataclass
class Realism:
    """How much like the real equipment the simulated device behaves; all on by default,
    seeded (the same seed, the same delays). `Realism.off()` is the ideal device.

    unit_ids: the unit ids the device answers; any other gets exception 0x0B (GATEWAY
        TARGET DEVICE FAILED TO RESPOND), as a gateway or a strict device does. None: all.
    read_only: a write to a register or coil the device does not accept (a status, a
        result, a sequence) gets exception 0x02 (ILLEGAL DATA ADDRESS).
    ack_clear_ms: a handshake flag is cleared this long (uniform in the range, seeded)
        *after* the host's acknowledge, as a module scanning its inputs does; the operator
        may press again in between (the press is accepted, the flag stays set, the key
        sequence advances). (0, 0): cleared by the acknowledge itself.
    """

    seed: int = 0
    unit_ids: tuple[int, ...] | None = (1,)
    read_only: bool = True
    ack_clear_ms: tuple[float, float] = (20.0, 150.0)

    @classmethod
    def off(cls, seed: int = 0) -> Realism:
        return cls(seed=seed, unit_ids=None, read_only=False, ack_clear_ms=(0.0, 0.0))


class DeviceMemory:
    """The four Modbus tables of one device, at protocol (0-based) addresses.

    Each table spans from its lowest to its highest address used by the profile (signals
    and ack targets), zero-filled in between like a PLC's memory; reads outside it get
    ILLEGAL DATA ADDRESS, reads longer than the profile's limit ILLEGAL DATA VALUE.
    Requests for a unit id not in `units` get GATEWAY TARGET DEVICE FAILED TO RESPOND;
    writes to a cell not in `writable` (None: every cell) get ILLEGAL DATA ADDRESS.

    Implements the datastore interface pymodbus 3.16's server calls
    (``async_getValues``/``async_setValues``/``device_ids``).
    """

    def __init__(self, extents: dict[Table, tuple[int, int]], faults: Faults,
                 max_registers: int = 125, max_bits: int = 2000):
        self.tables: dict[Table, dict[int, int]] = {
            t: dict.fromkeys(range(lo, hi + 1), 0) for t, (lo, hi) in extents.items()
        }
        self.faults = faults
        self.max_registers = max_registers
        self.max_bits = max_bits
        self.reads = 0
        self.units: set[int] | None = None
        self.writable: set[tuple[Table, int]] | None = None
        self.refused_writes = 0
        self.writes: list[tuple[Table, int, list[int]]] = []
        # Called after a client write is stored: (table, address, values).
        self.on_write: Callable[[Table, int, list[int]], None] | None = None

    def device_ids(self) -> list[int]:
        return [0]

    def _check(self, table: Table, address: int, count: int, write: bool) -> ExcCodes | None:
        f = self.faults
        if f.exception is not None and (f.exception_on == "all"
                                        or f.exception_on == ("write" if write else "read")):
            if f.draw_exception():
                return f.exception
        limit = self.max_bits if table in ("coil", "discrete_input") else self.max_registers
        if count < 1 or count > limit:
            return ExcCodes.ILLEGAL_VALUE
        cells = self.tables.get(table, {})
        if address not in cells or address + count - 1 not in cells:
            return ExcCodes.ILLEGAL_ADDRESS
        if write and self.writable is not None and any(
                (table, a) not in self.writable for a in range(address, address + count)):
            self.refused_writes += 1
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    async def async_getValues(self, device_id: int, func_code: int, address: int,
                              count: int = 1) -> list[int] | list[bool] | ExcCodes:
        table = FC_TABLE[func_code]
        # pymodbus reads back after a write to build the reply: not a client read.
        if func_code in (1, 2, 3, 4):
            self.reads += 1
            if self.units is not None and device_id not in self.units:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if rc := self._check(table, address, count, write=False):
                return rc
        cells = self.tables[table]
        values = [cells.get(a, 0) for a in range(address, address + count)]
        if table in ("coil", "discrete_input"):
            return [bool(v) for v in values]
        return values

    async def async_setValues(self, device_id: int, func_code: int, address: int,
                              values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        table = FC_TABLE[func_code]
        if self.units is not None and device_id not in self.units:
            return ExcCodes.GATEWAY_NO_RESPONSE
        if rc := self._check(table, address, len(values), write=True):
            return rc
        ints = [int(v) for v in values]
        for i, v in enumerate(ints):
            self.tables[table][address + i] = v
        self.writes.append((table, address, ints))
        if self.on_write:
            self.on_write(table, address, ints)
        return None


# --- the proxy in front of the server: transport faults --------------------------------

class _FaultProxy:
    """Forwards TCP bytes between clients and the pymodbus server, applying `Faults`."""

    def __init__(self, faults: Faults):
        self.faults = faults
        self.backend_port = 0
        self._server: asyncio.Server | None = None
        # client side -> server side of each proxied connection
        self._conns: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_accepted = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._client, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        try:
            b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        self._conns[writer] = b_writer
        up = asyncio.create_task(self._pump(reader, b_writer, upstream=True))
        down = asyncio.create_task(self._pump(b_reader, writer, upstream=False))
        for t in (up, down):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        self._conns.pop(writer, None)
        writer.close()
        b_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(4096):
                if upstream and self.faults.blackhole:
                    continue  # swallow the request: the client waits until its timeout
                if not upstream and self.faults.delay_ms:
                    await asyncio.sleep(self.faults.delay_ms / 1000)
                writer.write(data)
                await writer.drain()

    def drop_connections(self) -> int:
        """Close every open client connection (a FIN, as a device dropping it); return how many."""
        conns = list(self._conns.items())
        self._conns.clear()
        for client, server in conns:
            client.close()
            server.close()
        return len(conns)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# --- simulated devices ------------------------------------------------------------------

class ModbusDeviceSim:
    """A simulated device: memory per its profile, a pymodbus server, a fault proxy.

    Values are set and read by signal name in engineering units (`set`, `get`); the
    subclasses add the device's behaviour. `stop` then `start` reuses the same port and
    keeps the memory; `restart(reset=True)` is a power cycle: registers back to their
    power-up values except the device's counters (`KEPT`, kept in non-volatile memory).
    `realism` (default: all on, see `Realism`) makes it answer like the real equipment.
    """

    profile_name: ClassVar[str]
    kind: ClassVar[str]
    WRITABLE: ClassVar[tuple[str, ...]] = ()  # signals the host may write (acks are added)
    KEPT: ClassVar[tuple[str, ...]] = ()  # signals a power cycle keeps (counters)

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, rate: float = 0.0,
                 realism: Realism | None = None, seed: int = 0):
        self.host = host
        self.port = port
        self.rate = rate
        self.seed = seed
        self.realism = realism if realism is not None else Realism(seed=seed)
        self.rng = random.Random(self.realism.seed)
        self.profile = load_profile(self.profile_name)
        self.signals = signal_specs(self.profile)
        self.faults = Faults()
        self.memory = DeviceMemory(self._extents(), self.faults,
                                   int(self.profile.get("max_registers_per_read", 125)),
                                   int(self.profile.get("max_bits_per_read", 2000)))
        self.memory.on_write = self._on_write
        if self.realism.unit_ids is not None:
            self.memory.units = set(self.realism.unit_ids)
        if self.realism.read_only:
            self.memory.writable = self._writable()
        self._proxy = _FaultProxy(self.faults)
        self._server: ModbusTcpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.running = False
        self.restarts = 0
        self._init_values()

    # lifecycle

    async def start(self) -> None:
        """Listen (again) on `port`; with port 0 the first start picks a free port."""
        # A placeholder device: the server answers from `self.memory` instead (below).
        server = ModbusTcpServer(
            SimDevice(0, simdata=SimData(0, values=0, datatype=DataType.REGISTERS)),
            address=("127.0.0.1", 0),
        )
        # pymodbus 3.16 has no public hook for a custom datastore with the new SimDevice
        # API; its server only calls async_getValues/async_setValues/device_ids on
        # `context`, which DeviceMemory implements. Checked by the integration tests.
        server.context = self.memory  # type: ignore[assignment]
        await server.serve_forever(background=True)
        assert server.transport is not None
        self._proxy.backend_port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._server = server
        self.port = await self._proxy.start(self.host, self.port)
        self.running = True
        self._tasks = [asyncio.create_task(t()) for t in self._behaviours()]

    async def stop(self) -> None:
        """Stop listening and drop every connection; clients now get 'connection refused'."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._proxy.stop()
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        self._stopped()
        self.running = False

    async def restart(self, down_secs: float = 0.0, *, reset: bool = False) -> None:
        """The device restarts mid-flow: connections dropped, `down_secs` refusing them;
        with `reset` its registers come back at power-up values (counters kept)."""
        await self.stop()
        await asyncio.sleep(down_secs)
        if reset:
            self.power_cycle()
        self.restarts += 1
        await self.start()

    def power_cycle(self) -> None:
        """Registers back to their power-up values, except the counters in `KEPT`."""
        kept = {n: self.get(n) for n in self.KEPT}
        for cells in self.memory.tables.values():
            for a in cells:
                cells[a] = 0
        self._power_up()
        for n, v in kept.items():
            self.set(n, v)

    async def __aenter__(self) -> ModbusDeviceSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # fault injection (see Faults for the settable ones)

    def disconnect(self) -> int:
        """Close all client connections now (the device's TCP stack resetting)."""
        return self._proxy.drop_connections()

    @property
    def connections_accepted(self) -> int:
        return self._proxy.connections_accepted

    # values by signal name

    def set(self, name: str, value: Any) -> None:
        s = self.signals[name]
        cells = self.memory.tables[s.table]
        if s.table in ("coil", "discrete_input"):
            cells[s.address] = int(bool(value))
        elif s.type == "bit":
            assert s.bit is not None
            mask = 1 << s.bit
            cells[s.address] = (cells[s.address] | mask) if value else (cells[s.address] & ~mask)
        else:
            for i, r in enumerate(s.encode(value)):
                cells[s.address + i] = r

    def get(self, name: str) -> Any:
        s = self.signals[name]
        cells = self.memory.tables[s.table]
        if s.table in ("coil", "discrete_input"):
            return bool(cells[s.address])
        if s.type == "bit":
            assert s.bit is not None
            return bool(cells[s.address] >> s.bit & 1)
        return s.decode([cells[s.address + i] for i in range(s.count)])

    # for subclasses

    def _extents(self) -> dict[Table, tuple[int, int]]:
        spans: dict[Table, list[int]] = {}
        for s in signal_specs(self.profile).values():
            spans.setdefault(s.table, []).extend([s.address, s.address + s.count - 1])
        for table, address in self._ack_cells():
            spans.setdefault(table, []).append(address)
        return {t: (min(a), max(a)) for t, a in spans.items()}

    def _ack_cells(self) -> list[tuple[Table, int]]:
        base = int(self.profile.get("addressing", 0))
        return [(ack["table"], int(ack["address"]) - base)
                for e in self.profile.get("events", {}).values()
                if (ack := e["trigger"].get("ack"))]

    def _writable(self) -> set[tuple[Table, int]]:
        out = set(self._ack_cells())
        for name in self.WRITABLE:
            s = self.signals[name]
            out.update((s.table, s.address + i) for i in range(s.count))
        return out

    def _init_values(self) -> None:
        """Power-up values, and the device's own state (once)."""
        self._power_up()

    def _power_up(self) -> None:
        """Register values at power-up."""

    def _stopped(self) -> None:
        """The device stopped (its Modbus task or its power)."""

    def _behaviours(self) -> list[Callable[[], Any]]:
        """Background coroutines run while the device is started."""
        return []

    def _on_write(self, table: Table, address: int, values: list[int]) -> None:
        """React to a client's write (already stored)."""


@dataclass
class Weighing:
    """Ground truth of one weighing."""

    seq: int
    tracking_id: str
    weight_g: float
    in_tolerance: bool
    time: float


class CheckweigherSim(ModbusDeviceSim):
    """ACME CW-200: `weigh` writes the result registers and time, then advances `seq`.

    `log` is the ground truth: every weighing, in order."""

    profile_name = "acme_checkweigher_mb"
    kind = "checkweigher"
    WRITABLE = ("nominal_weight_g",)
    KEPT = ("seq", "total_count", "nominal_weight_g")

    def _init_values(self) -> None:
        self.weighings = 0
        self.log: list[Weighing] = []
        super()._init_values()

    def _power_up(self) -> None:
        self.set("nominal_weight_g", 1200)

    async def weigh(self, tracking_id: str, weight_g: float, in_tolerance: bool = True) -> int:
        """One weighing; returns the new sequence number."""
        now = time.time()
        self.set("weight_g", weight_g)
        self.set("tracking_id", tracking_id)
        self.set("weigh_time", now)
        nominal = self.get("nominal_weight_g")
        self.set("in_tolerance", in_tolerance)
        self.set("underweight", not in_tolerance and weight_g < nominal)
        self.set("overweight", not in_tolerance and weight_g >= nominal)
        self.set("total_count", self.get("total_count") + 1)
        seq = self.skip_counter(1)
        self.log.append(Weighing(seq, tracking_id, weight_g, in_tolerance, self.get("weigh_time")))
        return seq

    def skip_counter(self, n: int) -> int:
        """Advance the sequence counter by `n` (n > 1 leaves a gap); returns it. Wraps at 2^16."""
        seq = (self.get("seq") + n) % 65536
        self.set("seq", seq)
        self.weighings += 1
        return int(seq)

    def _behaviours(self) -> list[Callable[[], Any]]:
        return [self._auto] if self.rate > 0 else []

    async def _auto(self) -> None:
        rng = random.Random(self.seed)
        n = 0
        while True:
            await asyncio.sleep(1 / self.rate)
            n += 1
            w = round(rng.uniform(900, 1500), 1)
            await self.weigh(f"T{n:07d}", w, 1100 <= w <= 1400)


CONVEYOR_NOMINAL_M_MIN = 45.2


class ConveyorSim(ModbusDeviceSim):
    """ACME CS-400: belt running at speed, photo-eye counts moving; `jam` stops it.

    `faults_log` is the ground truth: (fault count, code) of every fault, in order."""

    profile_name = "acme_conveyor_section"
    kind = "conveyor"
    KEPT = ("infeed_count", "discharge_count", "motor_run_time_s", "fault_count")

    def _init_values(self) -> None:
        self.faults_log: list[tuple[int, int]] = []
        super()._init_values()

    def _power_up(self) -> None:
        self.clear()

    def jam(self, code: int = 1) -> None:
        """Stop the belt with a fault; code 1 (jam at photo-eye) also sets the jam bit."""
        count = (self.get("fault_count") + 1) % 65536
        self.set("fault_count", count)
        self.faults_log.append((count, code))
        self.set("fault_code", code)
        self.set("fault_active", True)
        self.set("jam", code == 1)
        self.set("estop", code == 3)
        self.set("ready", False)
        self.set("running", False)
        self.set("speed_m_min", 0)
        self.set("motor_current_a", 0)

    def clear(self) -> None:
        """Operator reset: fault cleared, belt back at nominal speed."""
        for bit in ("jam", "fault_active", "estop"):
            self.set(bit, False)
        self.set("fault_code", 0)
        self.set("ready", True)
        self.set("running", True)
        self.set("speed_m_min", CONVEYOR_NOMINAL_M_MIN)
        self.set("motor_current_a", 3.2)

    def carton(self) -> None:
        """A carton passes both photo-eyes."""
        self.set("infeed_count", self.get("infeed_count") + 1)
        self.set("discharge_count", self.get("discharge_count") + 1)

    def _behaviours(self) -> list[Callable[[], Any]]:
        return [self._motion]

    async def _motion(self) -> None:
        rng = random.Random(self.seed)
        tick = 0.1
        due = 0.0
        run_time_s = float(self.get("motor_run_time_s"))
        while True:
            await asyncio.sleep(tick)
            if not self.get("running"):
                continue
            run_time_s += tick
            self.set("motor_run_time_s", int(run_time_s))
            self.set("speed_m_min", CONVEYOR_NOMINAL_M_MIN + rng.uniform(-0.3, 0.3))
            if self.rate > 0:
                due += tick * self.rate
                while due >= 1:
                    due -= 1
                    self.carton()


PTL_POSITIONS = 4


@dataclass
class Press:
    """Ground truth of one accepted key press: position, `confirm`/`short`, the module's key
    sequence it got (what the agent's event carries as `press_seq`), the quantity, and
    whether a power cycle wiped it before any host read it (`lost`)."""

    position: int
    kind: str
    seq: int
    qty: int
    time: float
    acked: bool = False
    lost: bool = False


class PickToLightSim(ModbusDeviceSim):
    """ACME PTL-4: `confirm`/`short` set a key flag the host must acknowledge.

    A module holds one key event at a time: a press while the last one is unacknowledged is
    ignored (returns False). An accepted press advances the position's key sequence, writes
    the quantity, then sets the flag. The acknowledge clears the flag `realism.ack_clear_ms`
    later; a press in between is accepted (the old flag is cleared at once, the new one set,
    so the flag may never be seen clear). `presses` is the ground truth, in order.
    """

    profile_name = "acme_pick_to_light"
    kind = "pick_to_light"
    WRITABLE = tuple(f"display_qty_{n}" for n in range(1, PTL_POSITIONS + 1))
    KEPT = tuple(f"press_seq_{n}" for n in range(1, PTL_POSITIONS + 1)) + ("heartbeat",)

    def _init_values(self) -> None:
        self.acks: dict[str, int] = {}
        self.presses: list[Press] = []
        self.ignored = 0
        # position -> the press waiting for its acknowledge / its flag being cleared
        self._pending: dict[int, Press] = {}
        self._clearing: dict[int, tuple[Press, asyncio.TimerHandle]] = {}
        for n in range(1, PTL_POSITIONS + 1):
            self.acks[f"confirm_{n}"] = 0
            self.acks[f"short_{n}"] = 0
        self._ack_targets: dict[tuple[Table, int], str] = {}
        base = int(self.profile["addressing"])
        for ev_name, ev in self.profile["events"].items():
            ack = ev["trigger"]["ack"]
            self._ack_targets[(ack["table"], int(ack["address"]) - base)] = ev_name
        self._coil = {n: self._ack_cell(f"confirm_{n}") for n in range(1, PTL_POSITIONS + 1)}
        super()._init_values()

    def _ack_cell(self, event: str) -> tuple[Table, int]:
        return next(k for k, v in self._ack_targets.items() if v == event)

    def _power_up(self) -> None:
        self.set("zone_number", 12)
        for n in range(1, PTL_POSITIONS + 1):
            self.set(f"location_{n}", f"A12-03-{n}")
            self.set(f"online_{n}", True)
        for n, p in list(self._pending.items()):
            p.lost = True  # never acknowledged: wiped by the power cycle
            del self._pending[n]

    def counts(self) -> dict[str, int]:
        """Accepted presses per kind, and presses ignored (the last one unacknowledged)."""
        out = {"confirm": 0, "short": 0, "ignored": self.ignored}
        for p in self.presses:
            out[p.kind] += 1
        return out

    def _flag(self, kind: str, n: int, value: bool) -> None:
        self.set(f"{kind}_flag_{n}", value)
        if kind == "confirm":  # the CONFIRM coil mirrors the status bit
            table, address = self._coil[n]
            self.memory.tables[table][address] = int(value)

    def _press(self, kind: str, position: int, qty: int) -> bool:
        n = position
        if n in self._pending:
            self.ignored += 1
            return False  # the module ignores presses until acked (it blinks)
        if n in self._clearing:  # acked, flag not yet cleared: clear it now
            done, handle = self._clearing.pop(n)
            handle.cancel()
            self._clear(done)
        seq = (self.get(f"press_seq_{n}") + 1) % 65536
        self.set(f"press_seq_{n}", seq)
        self.set(f"picked_qty_{n}", qty)
        p = Press(n, kind, seq, qty, time.time())
        self.presses.append(p)
        self._pending[n] = p
        self._flag(kind, n, True)
        return True

    def confirm(self, position: int, qty: int) -> bool:
        """CONFIRM pressed with `qty` on the display; False if the last press is unacknowledged."""
        return self._press("confirm", position, qty)

    def short(self, position: int, qty: int) -> bool:
        """SHORT pressed with `qty` actually picked; False if the last press is unacknowledged."""
        return self._press("short", position, qty)

    def acknowledged(self, event: str) -> bool:
        """Whether the last `confirm_N`/`short_N` is acknowledged and its flag cleared."""
        kind, n = event.rsplit("_", 1)
        return not self.get(f"{kind}_flag_{n}")

    def _clear(self, p: Press) -> None:
        self._flag(p.kind, p.position, False)
        if p.kind == "short":
            table, address = self._ack_cell(f"short_{p.position}")
            self.memory.tables[table][address] = 0  # the module resets the ack register

    def _on_write(self, table: Table, address: int, values: list[int]) -> None:
        for i, v in enumerate(values):
            ev = self._ack_targets.get((table, address + i))
            if ev is None:
                continue
            kind, n_ = ev.rsplit("_", 1)
            n = int(n_)
            p = self._pending.get(n)
            is_ack = (v == 0) if kind == "confirm" else (v == 1)
            if is_ack and p is not None and p.kind == kind:
                del self._pending[n]
                p.acked = True
                self.acks[ev] += 1
                lo, hi = self.realism.ack_clear_ms
                delay = self.rng.uniform(lo, hi) / 1000 if hi > 0 else 0.0
                if delay > 0:
                    handle = asyncio.get_running_loop().call_later(delay, self._cleared, n)
                    self._clearing[n] = (p, handle)
                    if kind == "confirm":  # still shown set until the module clears it
                        self.memory.tables[table][address + i] = 1
                else:
                    self._clear(p)
            elif kind == "confirm":
                # Not an acknowledge of a pending confirm: the coil shows the module's state.
                shown = (n in self._pending and self._pending[n].kind == "confirm") or (
                    n in self._clearing and self._clearing[n][0].kind == "confirm")
                self.memory.tables[table][address + i] = int(shown)
            else:
                self.memory.tables[table][address + i] = 0

    def _cleared(self, n: int) -> None:
        done = self._clearing.pop(n, None)
        if done is not None:
            self._clear(done[0])

    def _stopped(self) -> None:
        for n in list(self._clearing):  # the module finishes clearing what was acked
            done, handle = self._clearing.pop(n)
            handle.cancel()
            self._clear(done)

    def _behaviours(self) -> list[Callable[[], Any]]:
        return [self._heartbeat] + ([self._auto] if self.rate > 0 else [])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.set("heartbeat", (self.get("heartbeat") + 1) % 65536)

    async def _auto(self) -> None:
        rng = random.Random(self.seed)
        while True:
            await asyncio.sleep(1 / self.rate)
            n = rng.randint(1, PTL_POSITIONS)
            qty = rng.randint(1, 6)
            self.set(f"display_qty_{n}", qty)
            if rng.random() < 0.1:
                self.short(n, qty - 1)
            else:
                self.confirm(n, qty)


KINDS: dict[str, type[ModbusDeviceSim]] = {
    c.kind: c for c in (CheckweigherSim, ConveyorSim, PickToLightSim)
}


# --- CLI ---------------------------------------------------------------------------------

async def _serve(kind: str, host: str, port: int, rate: float, seed: int = 0,
                 ideal: bool = False) -> None:
    realism = Realism.off(seed) if ideal else Realism(seed=seed)
    sim = KINDS[kind](host=host, port=port, rate=rate, realism=realism, seed=seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"READY {kind} port={sim.port}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.modbus_devices",
                                description="Simulated ACME Modbus TCP devices.")
    p.add_argument("--kind", choices=sorted(KINDS), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5020, help="0 picks a free port")
    p.add_argument("--rate", type=float, default=0.0,
                   help="events per second in automatic mode (weighings, cartons, key "
                   "presses); 0 = only what a test scripts")
    p.add_argument("--seed", type=int, default=0, help="seed of the automatic mode and delays")
    p.add_argument("--ideal", action="store_true",
                   help="an ideal device: every unit id served, every cell writable, "
                   "handshake flags cleared by the acknowledge itself (see Realism)")
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(a.kind, a.host, a.port, a.rate, a.seed, a.ideal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
