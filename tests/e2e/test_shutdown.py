"""SIGTERM always stops the real agent process within its drain time plus a small bound.

The agent runs as ``edge-agent run`` (a real process, as under systemd); its devices are a
real mosquitto, a pymodbus conveyor and an asyncua sorter, run here in the test's event
loop. Each test takes the devices away (or makes one hang) and sends SIGTERM: the agent
must exit within ``drain_secs + SHUTDOWN_MARGIN_SECS`` (systemd's TimeoutStopSec is 30 s)
with a log line saying how it stopped, and an exit code saying whether that was clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import DRAIN_SECS, SHUTDOWN_MARGIN_SECS
from edge_agent.cli import EXIT_NOT_CLEAN
from simulators.broker import Mosquitto
from simulators.modbus_devices import ConveyorSim
from simulators.opcua_sorter import SorterSim
from simulators.procs import AgentProc
from simulators.receiver import Receiver

SITE = """
site: shutdown-e2e
profiles_dir: {profiles}
brokers:
  devices: {{host: 127.0.0.1, port: {broker}, protocol: "5", connect_timeout_secs: 2}}
devices:
  SCN1:
    profile: generic_json_scanner
    connection: {{kind: mqtt, broker: devices, topic_base: site/close1/scanner/SCN1}}
  CONV3:
    profile: acme_conveyor_section
    connection: {{kind: modbus, host: 127.0.0.1, port: {conv}, timeout_ms: 500}}
  SORTER1:
    profile: acme_sorter_opcua
    connection: {{kind: opcua, endpoint: "{endpoint}", keepalive_secs: 0.5}}
rules:
  - name: no-reads
    kind: map
    inputs: {{scan: {{device: SCN1, event: read}}}}
    when: {{field: barcode, equals: NOREAD}}
    emit:
      type: scan_no_read
      subject: ${{scan.tracking_id}}
      data: {{tracking_id: "${{scan.tracking_id}}", station: CLOSE1, scanner: SCN1, scan_time: "${{scan.time}}"}}
  - name: conveyor-faults
    kind: map
    inputs: {{jam: {{device: CONV3, event: jam}}}}
    emit:
      type: equipment_fault
      subject: CONV3
      data: {{equipment: CONV3, reason: "${{jam.fault_code}}", speed_m_min: "${{jam.speed_m_min}}"}}
  - name: sorted
    kind: map
    inputs: {{divert: {{device: SORTER1, event: divert}}}}
    emit:
      type: carton_sorted
      subject: ${{divert.tracking_id}}
      data: {{tracking_id: "${{divert.tracking_id}}", lane: "${{divert.lane}}", disposition: "${{divert.disposition}}"}}
sinks:
  wms: {{kind: http, url: "{wms}", batch_linger_ms: 5}}
  bus: {{kind: mqtt, broker: devices}}
outbox: {{path: var/edge-agent.db}}
"""

# What SIGTERM may take at most: the drain, then every other step's timeout. Not a speed
# check: today's failure is "never" (systemd then SIGKILLs after TimeoutStopSec, and a
# process that hangs after a crash is never restarted).
EXIT_BOUND_SECS = DRAIN_SECS + SHUTDOWN_MARGIN_SECS


async def _until(pred: Callable[[], Any], secs: float, what: str) -> Any:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if got := pred():
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"not {what} within {secs} s")


async def _exited(proc: subprocess.Popen[bytes], secs: float) -> int | None:
    """The exit code, or None if it still runs after ``secs`` (waits without blocking)."""
    deadline = time.monotonic() + secs
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


def _states(agent: AgentProc) -> dict[str, str]:
    st = agent.status()
    if not st or st.get("pid") != agent.pid:
        return {}
    return {name: c["state"] for name, c in st["connectors"].items()}


class _SilentPeer:
    """A peer (Modbus device, MQTT broker, OPC UA server) that accepts TCP and reads what it
    is sent but never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.clients: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> _SilentPeer:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.clients.append(writer)
            while await reader.read(4096):
                pass

        self.server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.clients:
            w.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def _agent(tmp_path: Path, broker_port: int, conv_port: int,
                 endpoint: str) -> AsyncIterator[tuple[AgentProc, Receiver]]:
    from simulators.procs import PROFILES

    async with Receiver("wms") as wms:
        config = tmp_path / "site.yaml"
        config.write_text(SITE.format(
            profiles=PROFILES, broker=broker_port, conv=conv_port, endpoint=endpoint,
            wms=f"http://127.0.0.1:{wms.events_port}/events"))
        agent = AgentProc(config, tmp_path).start()
        try:
            yield agent, wms
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait()


def _assert_stopped(agent: AgentProc, rc: int | None, *, clean: bool) -> None:
    log = agent.log()
    assert rc is not None, f"the agent did not exit within {EXIT_BOUND_SECS} s of SIGTERM:\n" \
                           f"{log[-3000:]}"
    if clean:
        assert rc == 0, log[-3000:]
        assert "stopped cleanly" in log, log[-3000:]
    else:
        assert rc == EXIT_NOT_CLEAN, log[-3000:]
        assert "stopped, not cleanly" in log and "stopped cleanly" not in log, log[-3000:]


@pytest.mark.timeout(180)
async def test_sigterm_exits_in_bound_with_every_device_gone(tmp_path: Path):
    """The MQTT broker stopped (the connector reconnecting), the Modbus conveyor and the
    OPC UA sorter gone: SIGTERM still stops the agent, cleanly, within the bound."""
    broker = Mosquitto().start()
    conv = ConveyorSim(rate=0)
    sorter = SorterSim(rate=0)
    try:
        await conv.start()
        await sorter.start()
        async with _agent(tmp_path, broker.port, conv.port, sorter.endpoint) as (agent, _):
            await _until(lambda: (s := _states(agent)) and set(s.values()) == {"online"}, 60,
                         "every connector online")
            broker.stop()
            await conv.stop()
            await sorter.stop()
            await _until(lambda: (s := _states(agent)) and "online" not in s.values(), 60,
                         "every connector offline")
            agent.proc.send_signal(signal.SIGTERM)
            _assert_stopped(agent, await _exited(agent.proc, EXIT_BOUND_SECS), clean=True)
    finally:
        broker.stop()
        await conv.stop()
        await sorter.stop()


@pytest.mark.timeout(180)
async def test_sigterm_exits_in_bound_with_a_modbus_device_that_never_answers(tmp_path: Path):
    """A Modbus server that accepts TCP but never answers, with the broker and the sorter
    still there: SIGTERM stops the agent within the bound."""
    broker = Mosquitto().start()
    sorter = SorterSim(rate=0)
    try:
        await sorter.start()
        async with _SilentPeer() as silent, \
                _agent(tmp_path, broker.port, silent.port, sorter.endpoint) as (agent, _):
            await _until(lambda: _states(agent).get("opcua:SORTER1") == "online"
                         and _states(agent).get("mqtt:devices") == "online", 60,
                         "the MQTT and OPC UA connectors online")
            await _until(lambda: silent.clients, 30, "the agent connected to the silent device")
            agent.proc.send_signal(signal.SIGTERM)
            _assert_stopped(agent, await _exited(agent.proc, EXIT_BOUND_SECS), clean=True)
    finally:
        broker.stop()
        await sorter.stop()


@pytest.mark.timeout(180)
async def test_silent_peers_everywhere_cannot_hold_up_sigterm(tmp_path: Path):
    """An MQTT broker, a Modbus device and an OPC UA server that accept TCP and never
    answer: the connectors time out and reconnect over and over (the MQTT one turned the
    shutdown's cancel into one more reconnect, forever); SIGTERM stops the agent cleanly."""
    async with _SilentPeer() as mqtt, _SilentPeer() as modbus, _SilentPeer() as opcua, \
            _agent(tmp_path, mqtt.port, modbus.port, f"opc.tcp://127.0.0.1:{opcua.port}") as (agent, _):
        await _until(lambda: mqtt.clients and modbus.clients and opcua.clients, 30,
                     "the agent connected to every silent peer")
        await _until(lambda: "reconnecting" in agent.log(), 30, "a connector reconnecting")
        agent.proc.send_signal(signal.SIGTERM)
        _assert_stopped(agent, await _exited(agent.proc, EXIT_BOUND_SECS), clean=True)


@pytest.mark.timeout(180)
async def test_a_second_sigterm_exits_at_once_and_says_not_clean(tmp_path: Path):
    """A shutdown still draining (the WMS answers 503 to a pending event) ends at once on a
    second SIGTERM, with the exit code that says the shutdown was not clean."""
    broker = Mosquitto().start()
    conv = ConveyorSim(rate=0)
    sorter = SorterSim(rate=0, travel_secs=0.1)
    try:
        await conv.start()
        await sorter.start()
        async with _agent(tmp_path, broker.port, conv.port, sorter.endpoint) as (agent, wms):
            await wms.control({"mode": "status", "status": 503})
            await _until(lambda: _states(agent).get("opcua:SORTER1") == "online", 60,
                         "the OPC UA connector online")
            await sorter.induct("S0000001", "C0000001")
            await _until(lambda: wms.statuses[503], 60, "the WMS refused a delivery")
            agent.proc.send_signal(signal.SIGTERM)
            # The drain goes on while the WMS refuses (DRAIN_SECS): a second signal ends it.
            await _until(lambda: "SIGTERM: stopping" in agent.log(), 30, "stopping")
            agent.proc.send_signal(signal.SIGTERM)
            _assert_stopped(agent, await _exited(agent.proc, EXIT_BOUND_SECS), clean=False)
            assert "second signal (SIGTERM): exiting at once" in agent.log()
    finally:
        broker.stop()
        await conv.stop()
        await sorter.stop()
