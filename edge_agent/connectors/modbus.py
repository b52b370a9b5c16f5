"""Modbus connector: polls one device (Modbus TCP, or RTU frames over TCP) per its profile.

One connector per device, each its own supervised task and connection, so one bad device
never stalls the others. Requests on the connection are serialized (a lock), each with the
device's timeout; after a timeout the connection is recycled so that a late reply can never
be taken for the answer to a later request. A poll with no answer (a timeout, a dropped
connection) moves the device to *degraded*, and after ``offline_after_failures`` in a row
the connector raises ``NotConnected``: the supervisor marks it *offline* and reconnects with
backoff (no busy loop while it is down).

An exception response is an answer, not a failure of the device's connection: it is
counted (per function and exception code, in ``status()["exception_responses"]``), logged
once per kind, that poll of the group is dropped, and polling goes on at the same pace; the
device stays *online*. Only while a group gets nothing but exception responses for
``REFUSED_SECS`` (or three of its intervals, if longer) is the device *degraded* (it
answers, but gives no data), and it is *online* again at the next good read.

Reads follow the coalesced plan (``modbus_plan.plan``), per poll group at its interval.
Events come from state: a counter that advanced (a gap of more than one is reported as a
``counter_gap`` set aside for operators, never silently absorbed), a new-data handshake
(the acknowledge is written back *after* the event is durably committed, so a crash before
that leaves the device holding the data; re-armed only when the flag is seen cleared, or
at once by a new value of the trigger's ``sequence``), an edge, or a change beyond a deadband.
An event's id is what the device said (the profile's ``identity``: a sequence, the device's
time, the data), never a poll count or our clock, so the same occurrence read again after a
failed ack or a restart is dropped by the engine as a duplicate; its time is the profile's
``time`` signal when there is one, else the poll's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from ..config import ModbusConnection
from ..errors import NotConnected, RetriableError
from ..events import DeviceEvent
from ..profiles_modbus import BIT_TABLES, REGISTERS, ModbusEvent, ModbusProfile
from ..rules.engine import Ingest
from ..runtime.clock import Clock
from ..runtime.supervisor import Health
from .modbus_plan import ReadRequest, decode_request, plan
from .triggers import Watch

log = logging.getLogger(__name__)

FUNCTION_CODES = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}
EXCEPTION_NAMES = {
    1: "ILLEGAL FUNCTION", 2: "ILLEGAL DATA ADDRESS", 3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE", 5: "ACKNOWLEDGE", 6: "SERVER DEVICE BUSY",
    8: "MEMORY PARITY ERROR", 10: "GATEWAY PATH UNAVAILABLE", 11: "GATEWAY TARGET FAILED TO RESPOND",
}


REFUSED_SECS = 2.0  # only exception responses for a group this long: degraded


class ExceptionAnswer(Exception):
    """The device answered a request with a Modbus exception response (it is alive)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key  # "fc3 exception 6 (SERVER DEVICE BUSY)": what is counted


def exception_key(function_code: int, code: int | None) -> str:
    name = EXCEPTION_NAMES.get(code or 0, "unknown")
    return f"fc{function_code & 0x7F} exception {code} ({name})"


class DeviceError(RetriableError):
    """One failed poll: a timeout, a dropped connection or a reply that makes no sense."""

    def __init__(self, message: str, *, recycle: bool):
        super().__init__(message)
        self.recycle = recycle  # the connection may hold a late reply: drop it


class _Watcher:
    """One profile event: its trigger's state and what to read with it."""

    def __init__(self, name: str, spec: ModbusEvent, profile: ModbusProfile):
        self.name = name
        t = spec.trigger
        self.kind = t.kind
        self.signal = t.signal
        bits = 16 * REGISTERS.get(profile.signals[t.signal].type, 1)
        self.watch = Watch(t.kind, modulus=t.modulus or 2**bits, deadband=t.deadband)
        self.ack = t.ack
        self.sequence = t.sequence
        self.time = spec.time
        self.fields = spec.signal_map()
        self.constants = dict(spec.constants)
        self.identity = identity_signals(spec)
        self.ack_failing = False  # warned about a failing ack (once until it succeeds)


def identity_signals(spec: ModbusEvent) -> list[str]:
    """The signals whose values identify one occurrence of the event (see the profile's
    ``identity``): what the device said, never a poll count or the agent's clock."""
    if spec.identity is not None:
        return list(spec.identity)
    t = spec.trigger
    out = [t.sequence] if t.sequence else []
    if t.kind == "counter":
        out.append(t.signal)
    if spec.time:
        out.append(spec.time)
    out.extend(s for s in spec.signal_map().values() if s not in out)
    return out


class ModbusConnector:
    def __init__(
        self,
        device: str,
        conn: ModbusConnection,
        profile: ModbusProfile,
        clock: Clock,
    ):
        self.name = f"modbus:{device}"
        self.device = device
        self.conn = conn
        self.profile = profile
        self.clock = clock
        max_regs = min(profile.max_registers_per_read, conn.max_registers_per_read or 125)
        self.plan: dict[str, list[ReadRequest]] = plan(
            profile, max_registers=max_regs, max_bits=profile.max_bits_per_read, max_gap=conn.max_gap
        )
        self.intervals = {g: pg.interval_ms / 1000 for g, pg in profile.poll_groups.items() if g in self.plan}
        self.watchers = [_Watcher(n, e, profile) for n, e in profile.events.items()]
        self.by_group: dict[str, list[_Watcher]] = {}
        for w in self.watchers:
            self.by_group.setdefault(profile.signals[w.signal].group, []).append(w)
        self.values: dict[str, Any] = {}
        self.health = Health()
        self.failures = 0  # polls in a row without an answer
        self.exception_responses: dict[str, int] = {}  # exception_key -> count
        self._refused_since: dict[str, float] = {}  # group -> first of its exception-only polls
        self.polls = 0
        self.requests = 0
        self.client: AsyncModbusTcpClient | None = None
        self.lock = asyncio.Lock()
        self.ingest: Ingest | None = None
        self._stopping = False
        self._resumed = asyncio.Event()  # clear while paused (kept across reconnects)
        self._resumed.set()

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, ingest: Ingest) -> None:
        self.ingest = ingest
        await self._connect()
        try:
            await self._poll_forever()
        finally:
            self._close()

    async def stop(self) -> None:
        self._stopping = True
        self._close()

    def pause_reading(self) -> None:
        """Stop polling (the outbox is over its quota or the disk is full): what the device
        holds stays on it (a handshake flag stays set, unacknowledged), and a poll already
        on the wire is not turned into events. Acknowledges of events already committed are
        still written. A counter device goes on counting meanwhile: only its latest
        occurrence is still on the device at resume, the ones before are a counter gap."""
        if self._resumed.is_set():
            log.info("%s: polling paused", self.name)
        self._resumed.clear()

    def resume_reading(self) -> None:
        if not self._resumed.is_set():
            log.info("%s: polling resumed", self.name)
        self._resumed.set()

    async def _connect(self) -> None:
        c = self.conn
        self._close()
        client = AsyncModbusTcpClient(
            c.host, port=c.port, timeout=c.timeout_ms / 1000, retries=0, reconnect_delay=0,
            framer=FramerType.RTU if c.framing == "rtu_over_tcp" else FramerType.SOCKET,
            name=self.name,
        )
        try:
            ok = await asyncio.wait_for(client.connect(), c.timeout_ms / 1000 + 1)
        except (TimeoutError, OSError) as exc:
            client.close()
            raise NotConnected(f"{self.name}: cannot connect to {c.host}:{c.port}: {exc!r}") from exc
        if not ok:
            client.close()
            raise NotConnected(f"{self.name}: cannot connect to {c.host}:{c.port}")
        self.client = client

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # --- polling ---------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        now = time.monotonic()
        due = {g: now for g in self.intervals}
        while not self._stopping:
            if not self._resumed.is_set():
                await self._resumed.wait()
                now = time.monotonic()
                due = dict.fromkeys(due, now)
            group = min(due, key=due.__getitem__)
            delay = due[group] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Next due time from the schedule, not from now: no drift; skip missed slots.
            due[group] += self.intervals[group]
            if due[group] < time.monotonic():
                due[group] = time.monotonic() + self.intervals[group]
            try:
                values = await self._read_group(group)
            except ExceptionAnswer as exc:
                self._refused(group, exc)
                continue
            except DeviceError as exc:
                await self._failed(exc)
                continue
            self._succeeded(group)
            if not self._resumed.is_set():
                continue  # paused while this poll was on the wire: read it again at resume
            self.values.update(values)
            self.polls += 1
            self._watch(self.by_group.get(group, ()))

    async def _read_group(self, group: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for req in self.plan[group]:
            out.update(decode_request(req, await self._read(req)))
        return out

    async def _read(self, req: ReadRequest) -> list[int] | list[bool]:
        client = self.client
        if client is None or not client.connected:
            raise DeviceError(f"{self.name}: connection lost", recycle=True)
        unit = self.conn.unit_id
        fn: Callable[..., Any] = {
            "holding_register": client.read_holding_registers,
            "input_register": client.read_input_registers,
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
        }[req.table]
        what = f"{req.table} {req.start}..{req.start + req.count - 1}"
        async with self.lock:
            self.requests += 1
            try:
                rr = await asyncio.wait_for(
                    fn(req.start, count=req.count, device_id=unit), self.conn.timeout_ms / 1000 + 0.5
                )
            except (TimeoutError, ModbusIOException) as exc:
                # pymodbus reports its own timeout as an I/O error: say what it means.
                raise DeviceError(f"{self.name}: no answer reading {what} within "
                                  f"{self.conn.timeout_ms} ms", recycle=True) from exc
            except ModbusException as exc:
                raise DeviceError(f"{self.name}: reading {what}: {exc}", recycle=True) from exc
            except OSError as exc:
                raise DeviceError(f"{self.name}: reading {what}: {exc!r}", recycle=True) from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            name = EXCEPTION_NAMES.get(code or 0, "unknown")
            raise ExceptionAnswer(
                f"{self.name}: device answered exception {code} ({name}) reading {what}",
                exception_key(getattr(rr, "function_code", 0) or FUNCTION_CODES[req.table], code),
            )
        if req.table in BIT_TABLES:
            return list(rr.bits[: req.count])
        regs = list(rr.registers)
        if len(regs) != req.count:
            raise DeviceError(f"{self.name}: {len(regs)} registers for {req.count} asked ({what})",
                              recycle=True)
        return regs

    async def _failed(self, exc: DeviceError) -> None:
        self.failures += 1
        c = self.conn
        if self.failures >= c.offline_after_failures:
            raise NotConnected(f"{exc} ({self.failures} failed polls in a row)")
        if self.failures >= c.degraded_after_failures:
            if self.health.state != "degraded":
                log.warning("%s degraded: %s", self.name, exc)
            self.health.set("degraded", str(exc))
        else:
            self.health.last_error = str(exc)
        if exc.recycle:
            # A late reply may still come on this connection: never read it as the next one.
            await self._connect()

    def _count_exception(self, exc: ExceptionAnswer) -> None:
        n = self.exception_responses.get(exc.key, 0)
        if not n:
            log.warning("%s: %s (counted; polling goes on)", self.name, exc)
        self.exception_responses[exc.key] = n + 1

    def _refused(self, group: str, exc: ExceptionAnswer) -> None:
        """An exception response: the device answered, so the connection is fine."""
        self._count_exception(exc)
        self.failures = 0
        now = time.monotonic()
        since = self._refused_since.setdefault(group, now)
        if now - since >= max(REFUSED_SECS, 3 * self.intervals[group]):
            if self.health.state != "degraded":
                log.warning("%s degraded: only exception responses for %.1f s: %s",
                            self.name, now - since, exc)
            self.health.set("degraded", f"{exc} (only exception responses for "
                                        f"{now - since:.1f} s)")

    def _succeeded(self, group: str) -> None:
        self._refused_since.pop(group, None)
        if self.failures or self.health.state != "online":
            now = time.monotonic()
            if not any(now - t >= max(REFUSED_SECS, 3 * self.intervals[g])
                       for g, t in self._refused_since.items()):
                if self.health.state in ("degraded", "offline") or self.health.restarts:
                    log.info("%s online", self.name)
                self.health.set("online")
        self.failures = 0

    # --- events ----------------------------------------------------------------------------

    def _watch(self, watchers: Any) -> None:
        ingest = self.ingest
        assert ingest is not None
        for w in watchers:
            v = self.values.get(w.signal)
            if v is None:
                continue
            last = w.watch.last
            fire, missed = w.watch.observe(v, self.values.get(w.sequence) if w.sequence else None)
            if missed:
                ingest.bad_payload(
                    self.device, f"{w.name}:{w.signal}", "counter_gap",
                    f"{missed} event(s) missed: counter went from {last} to {v}", b"", None,
                )
            if fire:
                self._emit(w, self._acker(w) if w.ack else None)

    def _emit(self, w: _Watcher, ack: Callable[[], None] | None) -> None:
        now = self.clock.now()
        values = self.values
        fields = {f: values.get(s) for f, s in w.fields.items()}
        fields.update(w.constants)
        t = values.get(w.time) if w.time else None
        # The id is what the device said (sequence, its time, the data): the same occurrence
        # read again (a failed ack, an agent restart) has the same id and is deduplicated.
        ident = ",".join(f"{s}={values.get(s)!r}" for s in w.identity)
        assert self.ingest is not None
        self.ingest.device_event(
            DeviceEvent(self.device, w.name, fields, float(t) if t else now, now,
                        f"{self.device}/{w.name}/{ident}"),
            ack,
        )

    def _acker(self, w: _Watcher) -> Callable[[], None]:
        spec = w.ack
        assert spec is not None
        address = spec.address - self.profile.addressing

        def ack() -> None:
            # Runs after the durable commit; written on the serialized connection.
            task = asyncio.ensure_future(self._write_ack(spec.table, address, spec.value, w))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

        return ack

    async def _write_ack(self, table: str, address: int, value: int, w: _Watcher) -> None:
        client = self.client
        if client is None:
            w.watch.armed = True  # reconnecting: the flag is still set; read it again (same id)
            return
        async with self.lock:
            try:
                if table == "coil":
                    rr = await client.write_coil(address, bool(value), device_id=self.conn.unit_id)
                else:
                    rr = await client.write_register(address, value, device_id=self.conn.unit_id)
            except (ModbusException, OSError) as exc:
                self._ack_failed(w, f"could not write the acknowledge of {w.name}: {exc}")
                return
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            key = exception_key(getattr(rr, "function_code", 0) or (5 if table == "coil" else 6), code)
            self._count_exception(ExceptionAnswer(
                f"{self.name}: device answered exception {code} "
                f"({EXCEPTION_NAMES.get(code or 0, 'unknown')}) to the acknowledge of {w.name}", key))
            self._ack_failed(w, f"device refused the acknowledge of {w.name}: {rr}")
            return
        if w.ack_failing:
            log.info("%s: acknowledge of %s written again", self.name, w.name)
            w.ack_failing = False
        # Acknowledged: not re-armed until the flag is seen cleared (the device may show it
        # for a while). A new press before that is seen by the trigger's sequence.

    def _ack_failed(self, w: _Watcher, why: str) -> None:
        """The device still holds the data: the next poll makes the event again under the
        same id (dropped as a duplicate), and its ack is written again."""
        if not w.ack_failing:
            log.warning("%s: %s (retried)", self.name, why)
        w.ack_failing = True
        w.watch.armed = True

    def status(self) -> dict[str, Any]:
        return {
            "state": self.health.state, "since": self.health.since,
            "last_error": self.health.last_error, "restarts": self.health.restarts,
            "polls": self.polls, "requests": self.requests,
            "exception_responses": dict(self.exception_responses),
            "paused": not self._resumed.is_set(),
            "counter_gaps": {w.name: w.watch.missed_total for w in self.watchers
                             if w.kind == "counter"},
        }
