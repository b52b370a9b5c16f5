"""Interoperability: the OPC UA connector against a server we did not write (node-opcua),
subscribing and polling by namespace URI and browse path."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from edge_agent.config import OpcuaConnection
from edge_agent.connectors.opcua import OpcuaConnector
from edge_agent.profiles_opcua import OpcuaProfile
from edge_agent.runtime.clock import SystemClock
from edge_agent.runtime.supervisor import supervise
from edge_agent.testing.fakes import RecordingIngest
from simulators.broker import free_port

INTEROP = Path(__file__).parents[1] / "interop"

PROFILE = {
    "version": 1, "vendor": "node-opcua", "model": "interop sorter", "protocol": "opcua",
    "namespaces": {"ns": "urn:acme:node-sorter"},
    "poll_interval_ms": 200,
    "signals": {
        # Defaults: exception-based (sampling 0), a deep queue, StatusValueTimestamp.
        "count": {"node": "nsu=urn:acme:node-sorter;s=Sorter2.Count"},
        "tracking_id": {"node": "nsu=urn:acme:node-sorter;s=Sorter2.TrackingId"},
        "lane": {"path": "ns:Sorter2/ns:Lane"},
        "lane_polled": {"path": "ns:Sorter2/ns:Lane", "mode": "poll"},
    },
    "events": {"divert": {"trigger": {"kind": "counter", "signal": "count"},
                          "fields": {"tracking_id": "tracking_id", "lane": "lane"}}},
}


def test_connector_reads_and_subscribes_to_node_opcua():
    node = shutil.which("node")
    assert node, "node is not installed: `make test` installs nodejs and the interop server"
    assert (INTEROP / "node_modules" / "node-opcua-server").is_dir(), (
        "node-opcua is not installed: `make test` runs npm install in tests/interop")
    port = free_port()
    proc = subprocess.Popen([node, str(INTEROP / "opcua_server.js"), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("READY") or not line:
                break
        assert line.startswith("READY"), f"node-opcua server did not start: {line!r}"
        asyncio.run(_stream(port))
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


async def _stream(port: int) -> None:
    conn = OpcuaConnection(kind="opcua", endpoint=f"opc.tcp://127.0.0.1:{port}/", timeout_secs=5)
    c = OpcuaConnector("SORTER2", conn, OpcuaProfile.model_validate(PROFILE), SystemClock())
    ingest = RecordingIngest()
    task = asyncio.create_task(supervise(c.name, lambda: c.run(ingest), c.health))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(ingest.events) < 10:
            await asyncio.sleep(0.1)
        assert c.health.state == "online", c.health.last_error
        assert len(ingest.events) >= 10
        assert not [b for b in ingest.bad if b[2] != "counter_gap"], ingest.bad[:3]
        for ev in ingest.events:  # each divert's fields belong to its own count
            n = int(ev.msg_id.rsplit("/", 1)[1])
            assert ev.fields["tracking_id"] == f"N{n:07d}", (n, ev.fields)
            assert ev.fields["lane"] == 1 + n % 12, (n, ev.fields)
        assert isinstance(c.values.get("lane_polled"), int)  # the polled read works too
    finally:
        await c.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
