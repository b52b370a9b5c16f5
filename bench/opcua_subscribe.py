"""Benchmark: 10,000 OPC UA monitored items subscribed and streaming into the connector.

An asyncua server in its own process holds N variables and changes every one of them once a
second; the agent's OPC UA connector (this process) resolves the nodes, creates the
monitored items in batches and receives the notifications. Measures the time to subscribe,
notifications per second, and this process's CPU per notification. Writes
bench/results-opcua.md with the machine noted.

    python -m bench.opcua_subscribe [--items 10000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.config import OpcuaConnection
from edge_agent.connectors.opcua import OpcuaConnector
from edge_agent.profiles_opcua import OpcuaProfile
from edge_agent.runtime.clock import SystemClock
from edge_agent.testing.fakes import RecordingIngest
from simulators.broker import free_port

OUT = Path(__file__).parent / "results-opcua.md"
NS = "urn:edge-agent:bench"


async def serve(port: int, items: int) -> None:
    """The server process: N UInt32 variables, each changed once a second."""
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    idx = await server.register_namespace(NS)
    folder = await server.nodes.objects.add_folder(idx, "Bench")
    nodes = [await folder.add_variable(ua.NodeId(f"v{i:05d}", idx), f"v{i:05d}",
                                       ua.Variant(0, ua.VariantType.UInt32)) for i in range(items)]
    async with server:
        print("READY", flush=True)
        tick = 0
        while True:
            tick += 1
            t0 = time.monotonic()
            for n in nodes:  # spread over the second, like a PLC's scan would
                await server.write_attribute_value(n.nodeid, ua.DataValue(ua.Variant(tick, ua.VariantType.UInt32)))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


def profile(items: int) -> OpcuaProfile:
    signals = {f"v{i:05d}": {"node": f"nsu={NS};s=v{i:05d}", "sampling_interval_ms": 0,
                             "queue_size": 1} for i in range(items)}
    return OpcuaProfile.model_validate({
        "version": 1, "vendor": "bench", "model": f"{items} variables", "protocol": "opcua",
        "publishing_interval_ms": 100, "items_per_call": 1000, "signals": signals,
    })


async def measure(port: int, items: int, seconds: float) -> dict[str, Any]:
    conn = OpcuaConnection(kind="opcua", endpoint=f"opc.tcp://127.0.0.1:{port}/", timeout_secs=30,
                           keepalive_secs=5)
    c = OpcuaConnector("BENCH", conn, profile(items), SystemClock())
    ingest = RecordingIngest()
    t0 = time.monotonic()
    task = asyncio.create_task(c.run(ingest))
    while c.health.state != "online":
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    subscribed = time.monotonic() - t0
    await asyncio.sleep(2.0)  # initial values and warm-up
    n0, r0, w0 = c.notifications, resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await asyncio.sleep(seconds)
    n1, r1, w1 = c.notifications, resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await c.stop()
    await asyncio.wait_for(task, 10)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    n = n1 - n0
    return {"items": items, "subscribe_s": subscribed, "notifications_per_s": n / (w1 - w0),
            "cpu_us_per_notification": cpu / n * 1e6 if n else float("nan"),
            "cpu_pct_of_core": cpu / (w1 - w0) * 100}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.items))
        return 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.opcua_subscribe", "--serve", str(port),
                             "--items", str(args.items)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("bench server did not start")
        r = asyncio.run(measure(port, args.items, args.seconds))
    finally:
        proc.terminate()
        proc.wait(10)
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import asyncua

    text = f"""# Benchmark: {r['items']:,} OPC UA monitored items

Written by `python -m bench.opcua_subscribe` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.
Machine: {cpu}; Python {platform.python_version()}; asyncua {asyncua.__version__ if hasattr(asyncua, '__version__') else '2.x'}.
The server (asyncua, its own process on 127.0.0.1) changes each of the {r['items']:,} variables
once a second; the agent's OPC UA connector subscribes to all of them (monitored items created
1,000 per call, publishing interval 100 ms) and receives every change.

| Measure | Value |
|---|---:|
| time to connect, resolve and subscribe all items | {r['subscribe_s']:.1f} s |
| notifications received per second | {r['notifications_per_s']:,.0f} |
| connector CPU per notification | {r['cpu_us_per_notification']:.1f} us |
| connector CPU, % of one core | {r['cpu_pct_of_core']:.0f} % |

Measured over {args.seconds:g} s after a 2 s warm-up, one run.
"""
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
