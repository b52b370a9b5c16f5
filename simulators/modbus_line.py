"""The carton-closing station with a Modbus checkweigher: scans over MQTT, weights over Modbus.

The same seeded plan and ground truth as `simulators.carton_line` (it runs `run_line`), but
each carton's weight is not published: it is weighed, at the planned time, on an in-process
`CheckweigherSim` (ACME CW-200, profile ``acme_checkweigher_mb``) that the agent polls. A
missing-weight carton is not weighed; a duplicate weight message does not apply (a carton is
weighed once).

A Modbus counter trigger sees only the latest state at each poll, so two weighings closer
together than a poll would look like one weighing and a counter gap. The checkweigher
therefore weighs one carton at a time, at least `MIN_WEIGH_GAP_S` (several polls of the
profile's 50 ms group) after the previous one; a weighing due sooner waits. That holds the
rate of this line to at most `MAX_RATE_PER_S` cartons a second (above it the queue would
grow without bound).

Process protocol (used by ``edge-agent demo --checkweigher modbus``): prints
``READY checkweigher port=N`` once the Modbus server listens; with ``--wait-go`` starts the
line only when a line arrives on stdin (the agent is polling by then). SIGINT/SIGTERM stop
the line as in `carton_line` (started cartons are finished); the checkweigher keeps
answering for ``--linger-secs`` after its last weighing, so the agent polls it, then exits.
With ``--hold`` it prints ``DONE`` instead and keeps answering (the agent's view of the
device stays online) until a second SIGINT/SIGTERM or the end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import struct
import sys
import threading
import time

from .carton_line import add_plan_arguments, run_line
from .modbus_devices import CheckweigherSim

log = logging.getLogger("simulators.modbus_line")

MIN_WEIGH_GAP_S = 0.12  # > 2 polls of the checkweigher profile's 'fast' group (50 ms)
MAX_RATE_PER_S = 5.0  # one weighing per carton: keeps the gap's queue short


class ModbusWeigher:
    """A `carton_line.Weigher`: a CheckweigherSim served from its own event-loop thread.

    `weigh` queues a weighing (thread-safe, never blocks); the loop performs them in order,
    each at least `min_gap_s` after the previous one.
    """

    def __init__(self, *, port: int = 0, min_gap_s: float = MIN_WEIGH_GAP_S):
        self.min_gap_s = min_gap_s
        self.sim = CheckweigherSim(port=port)
        self.delayed = 0  # weighings that waited for the gap
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[tuple[str, float, bool]] | None = None
        self._pending = 0
        self._idle = threading.Condition()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkweigher", daemon=True)

    @property
    def port(self) -> int:
        return self.sim.port

    def start(self, timeout_s: float = 10.0) -> ModbusWeigher:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"the Modbus checkweigher did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by start(), or logged
            self._error = exc
            self._ready.set()
            log.exception("checkweigher loop failed")
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        async with self.sim:
            self._ready.set()
            worker = asyncio.create_task(self._work())
            await self._stop.wait()
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _work(self) -> None:
        assert self._queue is not None
        last = -1e9
        while True:
            tracking_id, weight_g, in_tolerance = await self._queue.get()
            wait = last + self.min_gap_s - time.monotonic()
            if wait > 0:
                self.delayed += 1
                await asyncio.sleep(wait)
            await self.sim.weigh(tracking_id, weight_g, in_tolerance)
            last = time.monotonic()
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def weigh(self, tracking_id: str, weight_g: float, in_tolerance: bool) -> None:
        assert self._queue is not None
        with self._idle:
            self._pending += 1
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (tracking_id, weight_g, in_tolerance))

    def reading(self, weight_g: float) -> float:
        """The CW-200 reports float32 grams: what the agent reads for `weight_g`."""
        return float(struct.unpack("<f", struct.pack("<f", weight_g))[0])

    def drain(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    @property
    def weighings(self) -> int:
        return int(self.sim.weighings)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulators.modbus_line",
        description="The seeded carton line with its checkweigher on Modbus TCP "
                    "(scanner on MQTT).",
    )
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker host")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument("--modbus-port", type=int, default=0, help="checkweigher port (0: any free)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--count", type=int, default=100, help="cartons to run")
    runs.add_argument("--forever", action="store_true",
                      help="run until SIGINT/SIGTERM; ground truth appended as JSON lines")
    p.add_argument("--rate", type=float, default=MAX_RATE_PER_S,
                   help=f"cartons per second (at most {MAX_RATE_PER_S:g})")
    add_plan_arguments(p)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--client-id", default=None)
    p.add_argument("--ack-timeout-secs", type=float, default=30.0)
    p.add_argument("--ground-truth", default=None, help="path of the ground-truth file")
    p.add_argument("--wait-go", action="store_true",
                   help="start the line only when a line arrives on stdin")
    p.add_argument("--linger-secs", type=float, default=1.0,
                   help="keep the checkweigher answering this long after the last weighing")
    p.add_argument("--hold", action="store_true",
                   help="after the line: print DONE, answer until a second signal or stdin EOF")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not 0 < args.rate <= MAX_RATE_PER_S:
        print(f"--rate must be within 0..{MAX_RATE_PER_S:g} with a Modbus checkweigher, "
              f"got {args.rate:g}", file=sys.stderr)
        return 2
    stop = threading.Event()
    go = threading.Event()
    leave = threading.Event()  # --hold: the checkweigher may stop answering

    def request_stop(_signum: int, _frame: object) -> None:
        if stop.is_set():
            leave.set()
        stop.set()
        go.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    weigher = ModbusWeigher(port=args.modbus_port).start()
    try:
        print(f"READY checkweigher port={weigher.port}", flush=True)
        if args.wait_go or args.hold:
            def wait_stdin() -> None:
                if args.wait_go and not sys.stdin.readline():  # EOF: whoever started us left
                    stop.set()
                go.set()
                while sys.stdin.readline():
                    pass
                stop.set()
                leave.set()

            threading.Thread(target=wait_stdin, daemon=True).start()
        if args.wait_go:
            go.wait()
        if stop.is_set():
            return 0
        summary = run_line(
            args.host, args.port,
            count=None if args.forever else args.count,
            rate_per_s=args.rate, seed=args.seed,
            noread_frac=args.noread_frac, missing_weight_frac=args.missing_weight_frac,
            missing_scan_frac=args.missing_scan_frac, dup_frac=args.dup_frac,
            reorder_frac=args.reorder_frac, station=args.station,
            start_index=args.start_index, base=args.base, scanner_id=args.scanner_id,
            protocol=args.protocol, client_id=args.client_id,
            ground_truth_path=args.ground_truth, ack_timeout_secs=args.ack_timeout_secs,
            stop=stop, weigher=weigher,
        )
        log.info("checkweigher: %d weighings (%d waited for the previous one)",
                 weigher.weighings, weigher.delayed)
        time.sleep(args.linger_secs)
        if args.hold:
            print("DONE", flush=True)
            leave.wait()
        return 1 if summary.unacked or summary.rejected else 0
    finally:
        weigher.close()


if __name__ == "__main__":
    sys.exit(main())
