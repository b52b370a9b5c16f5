"""The OPC UA sorter (``simulators.opcua_sorter``) with an operator at its induct gate.

Like ``python -m simulators.opcua_sorter``, but driven over stdin so a demo can start the
sorter before the agent and send cartons only once the agent is subscribed, and stop the
induct and wait for the belt to empty before reading the ground truth:

    python -m simulators.sorter_operator --port 0 --rate 3 --seed 1 --ground-truth F [--wait-go]

prints ``READY sorter endpoint=opc.tcp://127.0.0.1:N/ ns=2``; then reads commands, one a
line:

- ``go`` opens the induct gate (with ``--wait-go`` it starts closed);
- ``pause`` closes it and prints ``DONE`` once every inducted carton reached its final
  disposition;
- ``truth`` writes the ground truth so far (to ``--ground-truth``) and prints ``TRUTH``;
- ``restart SECS`` restarts the OPC UA server (`SorterSim.restart`: down for SECS, same
  port; carton state and counters survive, the belt clock stands still while down) and
  prints ``RESTARTED``. A restart drops the notifications the server had queued but not
  yet published, so a caller that must lose nothing pauses first, waits for ``DONE`` and
  until its client has everything, restarts, and sends ``go`` once the client is back.

SIGTERM (or SIGINT, or stdin closing) stops the server and writes the ground truth (JSON
list). An unknown command is reported on stderr and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

from .opcua_sorter import SorterSim, add_realism_args, realism_kwargs

DONE_POLL_SECS = 0.05


def _secs(text: str) -> float | None:
    try:
        secs = float(text)
    except ValueError:
        return None
    return secs if secs >= 0 else None


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = SorterSim(
        port=args.port, rate=args.rate, seed=args.seed, travel_secs=args.travel_secs,
        ground_truth_path=args.ground_truth, **realism_kwargs(args),
    )
    if args.wait_go:
        sim.pause()
    async with sim:
        print(f"READY sorter endpoint={sim.endpoint} ns={sim.namespace_index}", flush=True)

        async def done_when_empty() -> None:
            while not all(c["done"] for c in sim.ground_truth()):
                await asyncio.sleep(DONE_POLL_SECS)
            print("DONE", flush=True)

        waiter: asyncio.Task[None] | None = None
        restarts: set[asyncio.Task[None]] = set()

        async def restart(down_secs: float) -> None:
            await sim.restart(down_secs=down_secs)
            print("RESTARTED", flush=True)

        def command(line: str) -> None:
            nonlocal waiter
            cmd, *rest = line.split() or [""]
            if not line:  # stdin closed
                stop.set()
            elif cmd == "go":
                sim.resume()
            elif cmd == "pause":
                sim.pause()
                if waiter is None or waiter.done():
                    waiter = asyncio.create_task(done_when_empty())
            elif cmd == "truth" and args.ground_truth is not None:
                sim.write_ground_truth(args.ground_truth)
                print("TRUTH", flush=True)
            elif cmd == "restart" and len(rest) == 1 and _secs(rest[0]) is not None:
                task = asyncio.create_task(restart(_secs(rest[0]) or 0.0))
                restarts.add(task)
                task.add_done_callback(restarts.discard)
            elif cmd:
                print(f"sorter_operator: unknown command {line.strip()!r}", file=sys.stderr,
                      flush=True)

        def read_stdin() -> None:  # a daemon thread: a blocked readline never holds up exit
            while True:
                line = sys.stdin.readline()
                loop.call_soon_threadsafe(command, line)
                if not line:
                    return

        threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
        await stop.wait()
        for task in (waiter, *restarts):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.sorter_operator",
                                description="OPC UA sorter with an operator at the induct.")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--rate", type=float, default=3.0, help="cartons per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--travel-secs", type=float, default=1.0, help="induct to divert")
    p.add_argument("--ground-truth", type=Path, help="write every carton here as JSON on exit")
    p.add_argument("--wait-go", action="store_true", help="keep the induct closed until `go`")
    p.add_argument("--log-level", default="WARNING")
    add_realism_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
