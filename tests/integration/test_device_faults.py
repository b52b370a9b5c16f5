"""Device faults that must stay local to the device (issue 8 items 6 and 7), against real
servers: an OPC UA server that does not trust our application certificate, and a Modbus
device that answers a fraction of its requests with exception responses."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.ua.ua_binary import uatcp_to_binary
from pymodbus.constants import ExcCodes

from edge_agent.config import ModbusConnection, OpcuaConnection
from edge_agent.connectors.modbus import ModbusConnector
from edge_agent.connectors.opcua import OpcuaConnector
from edge_agent.profiles import load_profile
from edge_agent.profiles_opcua import OpcuaProfile
from edge_agent.runtime.clock import SystemClock
from edge_agent.runtime.supervisor import supervise
from edge_agent.testing.fakes import RecordingIngest
from simulators.modbus_devices import CheckweigherSim
from simulators.opcua_sorter import SorterSim, generate_certificate

PROFILES = Path(__file__).parents[2] / "device_profiles"
NONE_POLICY = "http://opcfoundation.org/UA/SecurityPolicy#None"


async def until(pred, secs: float = 15.0) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


@contextlib.asynccontextmanager
async def supervised(*connectors, ingest=None):
    ingest = ingest or RecordingIngest()
    tasks = [asyncio.create_task(supervise(c.name, lambda c=c: c.run(ingest), c.health,
                                           initial_backoff_secs=0.2, max_backoff_secs=1.0))
             for c in connectors]
    try:
        yield ingest, tasks
    finally:
        for c in connectors:
            await c.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sorter_profile() -> OpcuaProfile:
    prof = load_profile(PROFILES / "acme_sorter_opcua.yaml")
    assert isinstance(prof, OpcuaProfile)
    return prof


def secure_sorter_connector(device: str, endpoint: str, pki: Path, server_cert: Path) -> OpcuaConnector:
    conn = OpcuaConnection(
        kind="opcua", endpoint=endpoint, timeout_secs=3, keepalive_secs=1,
        security_policy="Basic256Sha256", security_mode="SignAndEncrypt", certificate_dir=pki,
        server_certificate=server_cert,
    )
    return OpcuaConnector(device, conn, sorter_profile(), SystemClock())


# --- 6. an OPC UA server that does not trust our certificate -------------------------------

async def test_a_server_that_does_not_trust_our_certificate_is_a_clear_local_error(tmp_path):
    """asyncua server with security on that trusts only another client's certificate: it
    refuses ours at CreateSession (BadCertificateUntrusted). The device is offline with an
    error naming our certificate file, it keeps retrying, the other device streams on, and
    once the server trusts our certificate the device comes online by itself."""
    other, other_key = tmp_path / "other.der", tmp_path / "other.pem"
    generate_certificate(other, other_key, app_uri="urn:someone:else", common_name="else")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "other.der").write_bytes(other.read_bytes())
    pki = tmp_path / "pki"
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "srv",
                         trusted_client_certificates=[trusted / "other.der"]) as strict, \
            SorterSim(rate=0, travel_secs=0.2) as fine:
        bad = secure_sorter_connector("SORTER1", strict.endpoint, pki, strict.server_certificate_path)
        good = OpcuaConnector("SORTER2", OpcuaConnection(kind="opcua", endpoint=fine.endpoint,
                                                         timeout_secs=3, keepalive_secs=1),
                              sorter_profile(), SystemClock())
        async with supervised(bad, good) as (ing, tasks):
            assert await until(lambda: bad.health.restarts >= 2 and good.health.state == "online"), (
                bad.health, good.health)
            assert not any(t.done() for t in tasks)  # nothing stopped
            err = bad.health.last_error or ""
            assert bad.health.state == "offline"
            assert str(pki / "edge-agent-cert.der") in err, err
            assert "must trust" in err and "BadCertificateUntrusted" in err, err
            assert strict.client_trust is not None and strict.client_trust.refused >= 2
            await asyncio.sleep(0.3)
            await fine.induct("S0000001", "C0000001", lane=4)
            assert await until(lambda: any(e.device == "SORTER2" and e.event == "divert"
                                           for e in ing.events))
            # The operator makes the server trust our certificate: back without a restart.
            strict.trusted_client_certificates.append(pki / "edge-agent-cert.der")
            assert await until(lambda: bad.health.state == "online", 20), bad.health


class ChannelRefusingProxy:
    """A TCP proxy in front of a real asyncua server that refuses every *secure*
    OpenSecureChannel, as servers that check the client certificate at the channel do
    (open62541, many PLCs): ``mode="error"`` answers an ERR message with
    BadSecurityChecksFailed and closes; ``mode="close"`` just closes. Everything else
    (the None channel for GetEndpoints) is passed through."""

    def __init__(self, backend_port: int, mode: str):
        self.backend_port = backend_port
        self.mode = mode
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"opc.tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def __aenter__(self) -> ChannelRefusingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        back = asyncio.create_task(self._pump(b_reader, writer))
        self.tasks.add(back)
        try:
            while True:
                header = await reader.readexactly(8)
                size = struct.unpack("<I", header[4:8])[0]
                body = await reader.readexactly(size - 8)
                if header[:3] == b"OPN":
                    (n,) = struct.unpack("<i", body[4:8])
                    policy = body[8 : 8 + n].decode()
                    if policy != NONE_POLICY:
                        self.refused += 1
                        if self.mode == "error":
                            writer.write(uatcp_to_binary(ua.MessageType.Error, ua.ErrorMessage(
                                ua.StatusCode(ua.StatusCodes.BadSecurityChecksFailed),
                                "certificate not trusted")))
                            await writer.drain()
                        break
                b_writer.write(header + body)
                await b_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            back.cancel()
            for w in (writer, b_writer):
                w.close()
            self.tasks.discard(back)
            self.tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


@pytest.mark.parametrize("mode", ["error", "close"])
async def test_a_secure_channel_refused_for_our_certificate_is_a_clear_local_error(tmp_path, mode):
    pki = tmp_path / "pki"
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "srv") as sim, \
            ChannelRefusingProxy(sim.port, mode) as proxy:
        c = secure_sorter_connector("SORTER1", proxy.endpoint, pki, sim.server_certificate_path)
        async with supervised(c) as (_, tasks):
            assert await until(lambda: c.health.restarts >= 2), c.health
            assert not tasks[0].done()
            err = c.health.last_error or ""
            assert c.health.state == "offline"
            assert str(pki / "edge-agent-cert.der") in err, err
            assert "must trust" in err, err
            assert "internal error" not in err, err
            if mode == "error":
                assert "BadSecurityChecksFailed" in err, err
            assert proxy.refused >= 2


# --- 7. a Modbus device answering exception responses --------------------------------------

def checkweigher_connector(sim: CheckweigherSim, device: str = "CW2", **conn) -> ModbusConnector:
    conn.setdefault("timeout_ms", 300)
    c = ModbusConnection(kind="modbus", host="127.0.0.1", port=sim.port, **conn)
    return ModbusConnector(device, c, load_profile(PROFILES / "acme_checkweigher_mb.yaml"),
                           SystemClock())


async def test_exception_responses_are_answers_the_device_stays_online_and_nothing_is_lost():
    """A checkweigher answering 20% of its reads with SERVER DEVICE BUSY (default thresholds):
    every weighing arrives, the device never leaves "online", and the exception responses are
    counted per function and exception code, exactly as many as the device sent."""
    async with CheckweigherSim() as sim:
        c = checkweigher_connector(sim)
        states: list[str] = []
        async with supervised(c) as (ing, _):
            assert await until(lambda: c.health.state == "online")
            start = c.polls
            assert await until(lambda: c.polls >= start + 3)  # the counter's baseline is known
            c.health.on_change = states.append
            sim.faults.exception_rate = 0.2
            sim.faults.exception_seed = 8
            sim.faults.exception = ExcCodes.DEVICE_BUSY
            n = 25
            for i in range(n):
                # The device weighs at its own pace, never waiting for the agent: the next
                # weighing comes after 8 more requests, whatever they were answered.
                reads = sim.memory.reads
                await sim.weigh(f"T{i:07d}", 1000.0 + i, True)
                assert await until(lambda reads=reads: sim.memory.reads >= reads + 8)
            assert await until(lambda: len(ing.events) >= n), (len(ing.events), c.health)
            sim.faults.exception = None
            assert sim.faults.exceptions_sent > 0
            key = "fc3 exception 6 (SERVER DEVICE BUSY)"
            assert await until(lambda: c.status()["exception_responses"].get(key)
                               == sim.faults.exceptions_sent), c.status()
            assert [e.fields["tracking_id"] for e in ing.events] == [f"T{i:07d}" for i in range(n)]
            assert not [b for b in ing.bad if b[2] == "counter_gap"], ing.bad
            assert states == [], states  # never degraded, never offline
            assert c.health.state == "online" and c.health.restarts == 0


async def test_a_device_refusing_every_read_is_degraded_not_offline_and_recovers():
    """Only exception responses for a while: the device answers but gives no data, so it is
    degraded (with the reason), never offline; it is online again at its next good read."""
    async with CheckweigherSim() as sim:
        c = checkweigher_connector(sim)
        states: list[str] = []
        async with supervised(c):
            assert await until(lambda: c.health.state == "online")
            c.health.on_change = states.append
            sim.faults.exception = ExcCodes.ILLEGAL_ADDRESS
            assert await until(lambda: c.health.state == "degraded")
            assert "exception 2 (ILLEGAL DATA ADDRESS)" in (c.health.last_error or "")
            requests = c.requests
            assert await until(lambda: c.requests >= requests + 20)  # it keeps polling
            sim.faults.exception = None
            assert await until(lambda: c.health.state == "online")
            assert states == ["degraded", "online"], states
            assert c.health.restarts == 0
