"""The fault suite's devices other than the MQTT ones: a Modbus checkweigher and an OPC UA
sorter, the project's simulators (real pymodbus / asyncua servers) run on an event loop in a
thread of the suite's own process, driven by a scenario and recording the ground truth the
ledger judges them by (``FactBook``).

Owns their lifecycle (``SimLoop.close()`` stops every server and task it started), the site
fragments that point the agent at them (a device and the map rules that turn its events into
business events), and their obligations:

- checkweigher (CW2): a weighing every ``1/rate`` s, with a known tracking id and weight.
  A weighing is an *obligation* once the device answered a read of its sequence register
  while that weighing was the latest (the agent was told about it); a weighing overwritten
  before any answer (the device silent, or every read refused) may be missing: the agent
  cannot know it, it sees a counter gap.
- sorter (SORTER1): scripted cartons (known tracking id, barcode and lane, one confirmation
  each), inducted only while the agent's session is up; each gives a ``carton_inducted`` and,
  once the sorter confirmed its divert, a ``carton_sorted`` with its lane.

Never imported by the agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pymodbus.constants import ExcCodes

from simulators.modbus_devices import CheckweigherSim
from simulators.opcua_sorter import DispositionMix, SorterSim, generate_certificate

from .ledger import FactBook

T = TypeVar("T")

# Business event types of these devices, and the sinks that take them (the WMS and the bus).
WEIGHED = "carton_weighed"
INDUCTED = "carton_inducted"
SORTED = "carton_sorted"
DEVICE_TYPES = (WEIGHED, INDUCTED, SORTED)
DEVICE_SINKS = frozenset({"wms", "bus"})


# Loggers of the in-process servers: written to the scenario's sims.log, not the console.
SIM_LOGGERS = ("simulators", "asyncua", "pymodbus")


class SimLoop:
    """An asyncio event loop in a thread of its own, for servers the suite runs in-process;
    their logs go to ``log_path``."""

    def __init__(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(log_path)
        self._handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
        self._saved: list[tuple[logging.Logger, int, bool]] = []
        for name in SIM_LOGGERS:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.level, lg.propagate))
            lg.addHandler(self._handler)
            lg.setLevel(logging.INFO if name == "simulators" else logging.WARNING)
            lg.propagate = False
        self.loop = asyncio.new_event_loop()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.thread = threading.Thread(target=self._run, name="fault-sims", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout_secs: float = 60) -> T:
        """Run ``coro`` on the loop; its result (or its exception) here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_secs)

    def do(self, fn: Callable[[], T], timeout_secs: float = 30) -> T:
        """Run a plain function on the loop's thread (the simulators are not thread-safe)."""
        async def run() -> T:
            return fn()
        return self.call(run(), timeout_secs)

    def on_close(self, closer: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        errors: list[BaseException] = []
        for closer in reversed(self._closers):
            try:
                self.call(closer(), 30)
            except BaseException as exc:  # every server must still be stopped
                errors.append(exc)

        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(cancel_rest(), 15)
        except BaseException as exc:
            errors.append(exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)
        if not self.thread.is_alive():
            self.loop.close()
        for lg, level, propagate in self._saved:
            lg.removeHandler(self._handler)
            lg.setLevel(level)
            lg.propagate = propagate
        self._handler.close()
        if errors:
            raise errors[0]


# --- the Modbus checkweigher -----------------------------------------------------------------


@dataclass
class Weighing:
    tracking_id: str
    weight_g: float
    seq: int
    at: float  # wall clock
    served: bool = False  # the device answered a read of its sequence while it was the latest


class ModbusCheckweigher:
    """A CW-200 checkweigher (``simulators.modbus_devices.CheckweigherSim``, realism on)
    weighing at ``rate`` per second from ``start_line()`` on."""

    DEVICE = "CW2"
    CONNECTOR = "modbus:CW2"  # its name in the agent's status

    def __init__(self, sims: SimLoop, *, rate: float, seed: int = 7, timeout_ms: int = 500):
        self.sims = sims
        self.rate = rate
        self.timeout_ms = timeout_ms
        self.rng = random.Random(seed)
        self.sim = CheckweigherSim(port=0, rate=0, seed=seed)
        self.weighings: list[Weighing] = []
        self.down = False  # the device's Modbus server stopped (refusing connections)
        self._line: asyncio.Task[None] | None = None
        self._watch_reads()
        sims.call(self.sim.start())
        sims.on_close(self._close)

    def _watch_reads(self) -> None:
        """Mark the latest weighing served when the device answers a read of its sequence
        register (an exception response is no answer with data)."""
        mem = self.sim.memory
        original = mem.async_getValues
        seq = self.sim.signals["seq"]

        async def served(device_id: int, func_code: int, address: int,
                         count: int = 1) -> Any:
            values = await original(device_id, func_code, address, count)
            if func_code == 3 and isinstance(values, list) and \
                    address <= seq.address < address + count and self.weighings:
                self.weighings[-1].served = True
            return values

        mem.async_getValues = served  # type: ignore[method-assign]

    async def _close(self) -> None:
        if self._line is not None:
            self._line.cancel()
        if self.sim.running:
            await self.sim.stop()

    def site_device(self) -> str:
        return (f"  {self.DEVICE}:\n"
                f"    profile: acme_checkweigher_mb\n"
                f"    connection: {{kind: modbus, host: 127.0.0.1, port: {self.sim.port}, "
                f"timeout_ms: {self.timeout_ms}}}\n")

    def site_rules(self) -> str:
        return f"""\
  - name: weighed
    kind: map
    inputs:
      weight: {{device: {self.DEVICE}, event: weight}}
    emit:
      type: {WEIGHED}
      subject: ${{weight.tracking_id}}
      data: {{tracking_id: "${{weight.tracking_id}}", weight_g: "${{weight.weight_g}}", seq: "${{weight.seq}}"}}
"""

    # the line

    def start_line(self) -> None:
        async def start() -> None:
            self._line = asyncio.create_task(self._weigh_forever(), name="fault-checkweigher")
        self.sims.call(start())

    async def _weigh_forever(self) -> None:
        interval = 1.0 / self.rate
        i = 0
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            i += 1
            tid = f"W{i:07d}"
            # Multiples of 0.5 g: exact in the device's float32 register.
            weight = 500.0 + 0.5 * self.rng.randrange(0, 4000)
            seq = await self.sim.weigh(tid, weight, True)  # no await inside: atomic here
            self.weighings.append(Weighing(tid, weight, seq, time.time()))

    def stop_line(self) -> None:
        async def stop() -> None:
            if self._line is not None:
                self._line.cancel()
                await asyncio.gather(self._line, return_exceptions=True)
        self.sims.call(stop())

    # faults

    def exceptions(self, rate: float, code: ExcCodes = ExcCodes.DEVICE_BUSY,
                   seed: int = 8) -> None:
        """Answer ``rate`` of the reads with exception ``code`` (0: none)."""
        def set_faults() -> None:
            f = self.sim.faults
            if rate <= 0:
                f.exception = None
                return
            f.exception_rate = rate
            f.exception_seed = seed
            f._rng = None  # reseeded
            f.exception_on = "read"
            f.exception = code
        self.sims.do(set_faults)

    def exceptions_sent(self) -> int:
        return self.sims.do(lambda: self.sim.faults.exceptions_sent)

    def silent(self, on: bool) -> None:
        """Requests are read and never answered (connections still accepted)."""
        def set_blackhole() -> None:
            self.sim.faults.blackhole = on
        self.sims.do(set_blackhole)

    def server_down(self) -> None:
        """The device's Modbus server stops: connections refused (its weighing goes on)."""
        self.sims.call(self.sim.stop())
        self.down = True

    def server_up(self) -> None:
        self.sims.call(self.sim.start())  # the same port
        self.down = False

    # the ground truth

    def facts(self) -> FactBook:
        book = FactBook(sinks=dict.fromkeys((WEIGHED,), DEVICE_SINKS))
        for w in list(self.weighings):
            fact = (WEIGHED, w.tracking_id)
            book.allowed.add(fact)
            if w.served:
                book.required[fact] = {"weight_g": w.weight_g, "seq": w.seq}
        return book


# --- the OPC UA sorter -------------------------------------------------------------------------


@dataclass
class Scripted:
    tracking_id: str
    barcode: str
    lane: int
    at: float


class OpcuaSorter:
    """An SX-24 sorter (``simulators.opcua_sorter.SorterSim``) with security on
    (Basic256Sha256, SignAndEncrypt) that trusts only the client certificates in
    ``trusted`` (at first someone else's: the agent's is refused at CreateSession with
    BadCertificateUntrusted); ``trust_agent()`` adds the agent's, as an operator would."""

    DEVICE = "SORTER1"
    CONNECTOR = "opcua:SORTER1"
    LANES = 24

    def __init__(self, sims: SimLoop, workdir: Path, *, seed: int = 3):
        self.sims = sims
        self.workdir = workdir
        self.pki = workdir / "pki"  # the agent's certificate_dir
        self.agent_cert = self.pki / "edge-agent-cert.der"
        other = workdir / "sorter-trusted" / "someone-else.der"
        generate_certificate(other, other.with_suffix(".pem"), app_uri="urn:someone:else",
                             common_name="someone else")
        self.sim = SorterSim(
            rate=0, seed=seed, lanes=self.LANES, travel_secs=1.0, security="sign_encrypt",
            cert_dir=workdir / "sorter-server", trusted_client_certificates=[other],
            mix=DispositionMix(no_read=0, no_destination=0, lane_full=0, recirculated=0,
                               lost_mistrack=0))
        self.scripted: list[Scripted] = []
        self._line: asyncio.Task[None] | None = None
        self._stopping = False
        sims.call(self.sim.start())
        sims.on_close(self._close)

    async def _close(self) -> None:
        if self._line is not None:
            self._line.cancel()
        await self.sim.stop()

    def site_device(self) -> str:
        return (f"  {self.DEVICE}:\n"
                f"    profile: acme_sorter_opcua\n"
                f"    connection: {{kind: opcua, endpoint: \"{self.sim.endpoint}\", "
                f"keepalive_secs: 1, timeout_secs: 3, security_policy: Basic256Sha256, "
                f"security_mode: SignAndEncrypt, certificate_dir: {self.pki}, "
                f"server_certificate: {self.sim.server_certificate_path}}}\n")

    def site_rules(self) -> str:
        return f"""\
  - name: inducted
    kind: map
    inputs: {{induct: {{device: {self.DEVICE}, event: induct}}}}
    emit:
      type: {INDUCTED}
      subject: ${{induct.tracking_id}}
      data: {{tracking_id: "${{induct.tracking_id}}", barcode: "${{induct.barcode}}"}}
  - name: sorted
    kind: map
    inputs: {{divert: {{device: {self.DEVICE}, event: divert}}}}
    emit:
      type: {SORTED}
      subject: ${{divert.tracking_id}}
      data: {{tracking_id: "${{divert.tracking_id}}", lane: "${{divert.lane}}", disposition: "${{divert.disposition}}"}}
"""

    def refused(self) -> int:
        """Sessions the server refused (the agent's certificate not trusted)."""
        trust = self.sim.client_trust
        return 0 if trust is None else self.sims.do(lambda: trust.refused)

    def trust_agent(self) -> None:
        """The operator copies the agent's certificate into the server's trusted list (the
        server reads it at each session: no restart)."""
        self.sims.do(lambda: self.sim.trusted_client_certificates.append(self.agent_cert))

    # the line

    def start_line(self, rate: float) -> None:
        async def start() -> None:
            self._line = asyncio.create_task(self._induct_forever(rate), name="fault-sorter")
        self.sims.call(start())

    async def _induct_forever(self, rate: float) -> None:
        interval = 1.0 / rate
        i = len(self.scripted)
        next_at = time.monotonic()
        while not self._stopping:  # never cancelled inside an induct: each is whole
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            i += 1
            s = Scripted(f"S{i:07d}", f"B{i:09d}", 1 + i % self.LANES, time.time())
            await self.sim.induct(s.tracking_id, s.barcode, lane=s.lane)
            self.scripted.append(s)

    def stop_line(self, timeout_secs: float = 30) -> bool:
        """Stop inducting; wait until every carton inducted was confirmed at its divert."""
        async def stop() -> None:
            self._stopping = True
            if self._line is not None:
                await asyncio.gather(self._line, return_exceptions=True)
        self.sims.call(stop())
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            if self.sims.do(lambda: all(self.sim.carton(s.tracking_id).done
                                        for s in self.scripted)):
                return True
            time.sleep(0.1)
        return False

    # the ground truth

    def facts(self) -> FactBook:
        book = FactBook(sinks=dict.fromkeys((INDUCTED, SORTED), DEVICE_SINKS))
        diverted = {d["tracking_id"]: d for d in self.sims.do(self.sim.diverts)}
        for s in list(self.scripted):
            book.required[(INDUCTED, s.tracking_id)] = {"barcode": s.barcode}
            d = diverted.get(s.tracking_id)
            if d is not None:
                book.required[(SORTED, s.tracking_id)] = {"lane": s.lane,
                                                          "disposition": "sorted"}
        return book


def merge(books: list[FactBook]) -> FactBook:
    out = FactBook()
    for b in books:
        out.required.update(b.required)
        out.allowed |= b.allowed
        out.sinks.update(b.sinks)
    return out
