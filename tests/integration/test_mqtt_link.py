"""Survival of the MQTT input connection against a real mosquitto (issue 8, item 2).

Every failure of one connection (slow SUBACK, dropped socket...) is a ``RetriableError``:
the connector goes offline and the supervisor reconnects it. The agent never holds more
than ``receive_maximum`` delivered, unacknowledged messages, whatever the broker does; an
ingest pause holds across reconnects and keeps the connection alive.

Faults are injected by a small MQTT-aware TCP proxy between the connector and mosquitto
(it holds SUBACKs, drops connections, counts packets); paho itself is never mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import BrokerConfig, DeviceConfig
from edge_agent.connectors.mqtt import MqttConnector
from edge_agent.errors import RetriableError
from edge_agent.profiles import load_profiles
from edge_agent.runtime.clock import SystemClock
from edge_agent.runtime.supervisor import supervise
from simulators.broker import Mosquitto

PROFILES = Path(__file__).parents[2] / "device_profiles"
TOPIC = "it/link/S1/read"

CONNACK, PUBLISH, SUBACK, PINGREQ = 2, 3, 9, 12


# --- helpers ---------------------------------------------------------------------------------


async def until(pred, secs: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + secs
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return bool(pred())


class MqttProxy:
    """TCP proxy that splits both directions into MQTT packets, so a test can hold the
    broker's SUBACKs, drop every connection, and count packets per connection."""

    def __init__(self, broker_port: int):
        self.broker_port = broker_port
        self.release_suback = asyncio.Event()
        self.release_suback.set()
        self.hold_connack = False  # never forward a CONNACK
        self.refuse = False  # accept, then close at once
        self.connections: list[dict[int, int]] = []  # per connection: packet type -> count
        self.to_broker: list[dict[int, int]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> MqttProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.drop_connections()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def hold_subacks(self) -> None:
        self.release_suback.clear()

    def drop_connections(self) -> None:
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.refuse:
            cw.transport.abort()
            return
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            cw.transport.abort()
            return
        self._writers += [cw, bw]
        down: dict[int, int] = {}
        up: dict[int, int] = {}
        self.connections.append(down)
        self.to_broker.append(up)
        tasks = [asyncio.create_task(self._pump(cr, bw, up, False)),
                 asyncio.create_task(self._pump(br, cw, down, True))]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
        cw.transport.abort()
        bw.transport.abort()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    counts: dict[int, int], from_broker: bool) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await r.readexactly(1)
                length, mult, raw = 0, 1, b""
                while True:
                    b = await r.readexactly(1)
                    raw += b
                    length += (b[0] & 0x7F) * mult
                    mult *= 128
                    if not b[0] & 0x80:
                        break
                body = await r.readexactly(length)
                kind = head[0] >> 4
                if from_broker and kind == SUBACK:
                    await self.release_suback.wait()
                if from_broker and kind == CONNACK and self.hold_connack:
                    await asyncio.Event().wait()
                counts[kind] = counts.get(kind, 0) + 1
                w.write(head + raw + body)
                await w.drain()


class RecordingIngest:
    """Keeps every message with its ack; ``settle()`` acks what is held, like the committer.

    ``max_open`` is the most messages ever delivered and not yet acknowledged."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.bad: list[str] = []
        self.held: list = []
        self.open = 0
        self.max_open = 0

    def _take(self, ack) -> None:
        if ack is not None:
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            self.held.append(ack)

    def device_event(self, ev, ack) -> None:
        self.seqs.append(int(ev.fields["tracking_id"][1:]))
        self._take(ack)

    def bad_payload(self, device, source, reason, detail, payload, ack) -> None:
        self.bad.append(reason)
        self._take(ack)

    def settle(self) -> None:
        held, self.held = self.held, []
        self.open -= len(held)
        for ack in held:
            ack()


async def committer(ing: RecordingIngest, every_secs: float = 0.005) -> None:
    """Acknowledges what was delivered a few milliseconds later, as group commits do."""
    while True:
        await asyncio.sleep(every_secs)
        ing.settle()


def make_connector(port: int, protocol: str = "5", client_id: str = "it-link", **broker) -> MqttConnector:
    profiles, problems = load_profiles(PROFILES, ["generic_json_scanner"])
    assert not problems
    dev = DeviceConfig.model_validate(
        {"profile": "generic_json_scanner",
         "connection": {"kind": "mqtt", "broker": "b", "topic_base": "it/link/S1"}}
    )
    return MqttConnector(
        "mqtt:b", BrokerConfig(port=port, protocol=protocol, **broker), {"S1": dev}, profiles,
        SystemClock(), client_id=client_id,
    )


def scan(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": "2026-11-22T10:00:00.000Z", "tracking_id": f"T{seq}",
                       "barcode": f"C{seq}"}).encode()


def publish(port: int, seqs: range) -> None:
    """Publish QoS 1 scans and wait for every PUBACK (the broker then holds them for us)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(TOPIC, scan(i), qos=1) for i in seqs]
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


async def stop(conn: MqttConnector, *tasks: asyncio.Task) -> None:
    await conn.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class UnboundedMosquitto(Mosquitto):
    """A mosquitto that sends MQTT 3.1.1 clients their whole queue at once
    (``max_inflight_messages 0``): only the agent can bound what it takes in."""

    def _conf(self) -> Path:
        conf = super()._conf()
        text = conf.read_text()
        assert "max_inflight_messages 1000" in text
        conf.write_text(text.replace("max_inflight_messages 1000", "max_inflight_messages 0"))
        return conf


# --- tests -----------------------------------------------------------------------------------


async def test_a_slow_suback_is_retriable_and_the_supervisor_reconnects(broker):
    async with MqttProxy(broker.port) as proxy:
        proxy.hold_subacks()
        conn = make_connector(proxy.port, client_id="it-link-suback", connect_timeout_secs=1)
        ing = RecordingIngest()
        with pytest.raises(RetriableError, match="SUBACK"):
            await asyncio.wait_for(conn.run(ing), 30)
        assert conn.link is None

        # Under the supervisor: offline, retried with backoff, online once the broker answers.
        task = asyncio.create_task(supervise(conn.name, lambda: conn.run(ing), conn.health))
        try:
            assert await until(lambda: conn.health.restarts >= 2 or task.done())
            assert not task.done(), task.exception()
            assert conn.health.state == "offline" and "SUBACK" in (conn.health.last_error or "")
            proxy.release_suback.set()
            assert await until(lambda: conn.health.state == "online" or task.done())
            await asyncio.to_thread(publish, broker.port, range(1, 4))
            assert await until(lambda: len(ing.seqs) == 3)
            assert ing.seqs == [1, 2, 3]
            ing.settle()
            assert not task.done()
        finally:
            await stop(conn, task)


@pytest.mark.parametrize("fault", ["refused", "closed_at_once", "no_connack", "dropped_online"])
async def test_every_failure_of_the_connection_is_retriable(broker, fault):
    async with MqttProxy(broker.port) as proxy:
        port = proxy.port
        if fault == "refused":
            await proxy.__aexit__()  # nothing listens there any more
        proxy.refuse = fault == "closed_at_once"
        proxy.hold_connack = fault == "no_connack"
        conn = make_connector(port, client_id=f"it-link-{fault}", connect_timeout_secs=1)
        ing = RecordingIngest()
        run = asyncio.create_task(conn.run(ing))
        try:
            if fault == "dropped_online":
                assert await until(lambda: conn.health.state == "online" or run.done())
                proxy.drop_connections()
            with pytest.raises(RetriableError):
                await asyncio.wait_for(run, 30)
            assert conn.link is None
        finally:
            await stop(conn, run)


async def test_a_suback_behind_a_full_window_waits_for_the_committer():
    """A resumed session sends its backlog before the SUBACK; with the window full and the
    committer stalled the SUBACK stays unread: that is not the broker being slow."""
    window, backlog, timeout = 50, 500, 1
    with UnboundedMosquitto() as b:
        conn = make_connector(b.port, client_id="it-link-stalled", receive_maximum=window,
                              connect_timeout_secs=timeout)
        ing = RecordingIngest()
        task = asyncio.create_task(supervise(conn.name, lambda: conn.run(ing), conn.health))
        try:
            assert await until(lambda: conn.health.state == "online")
        finally:
            await stop(conn, task)
        await asyncio.to_thread(publish, b.port, range(backlog))

        conn = make_connector(b.port, client_id="it-link-stalled", receive_maximum=window,
                              connect_timeout_secs=timeout)
        ing = RecordingIngest()
        task = asyncio.create_task(supervise(conn.name, lambda: conn.run(ing), conn.health))
        acker = None
        try:
            assert await until(lambda: len(ing.seqs) >= window)
            # Stalled for 3 SUBACK timeouts: no reconnect, nothing more read.
            assert not await until(lambda: conn.health.restarts > 0 or len(ing.seqs) > window,
                                   3 * timeout)
            assert conn.health.state != "online"  # not subscribed yet
            acker = asyncio.create_task(committer(ing))
            assert await until(lambda: len(ing.seqs) >= backlog)
            assert await until(lambda: conn.health.state == "online")
            assert conn.health.restarts == 0 and ing.max_open <= window
            assert sorted(ing.seqs) == list(range(backlog))
        finally:
            await stop(conn, task, *([acker] if acker else []))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_resumed_session_with_a_large_backlog_stays_within_the_receive_window(protocol):
    window, backlog = 1000, 20_000
    with UnboundedMosquitto() as b:
        conn = make_connector(b.port, protocol, client_id=f"it-link-window-{protocol}")
        ing = RecordingIngest()
        task = asyncio.create_task(conn.run(ing))
        try:
            assert await until(lambda: conn.health.state == "online" or task.done())
            assert not task.done(), task.exception()
        finally:
            await stop(conn, task)
        # Queued in the persistent session while the agent is away.
        await asyncio.to_thread(publish, b.port, range(backlog))

        conn = make_connector(b.port, protocol, client_id=f"it-link-window-{protocol}")
        assert conn.broker.receive_maximum == window
        ing = RecordingIngest()
        task = asyncio.create_task(conn.run(ing))
        acker = None
        try:
            # A stalled committer: nothing is acknowledged. The agent takes a full window...
            assert await until(lambda: len(ing.seqs) >= window or task.done())
            assert not task.done(), task.exception()
            # ...and no more (it would read thousands in this half second if it kept reading).
            await asyncio.sleep(0.5)
            assert ing.max_open == window, f"{ing.max_open} delivered and not acknowledged"
            # A slow committer: the window refills as acks come, never beyond its size.
            acker = asyncio.create_task(committer(ing, every_secs=0.02))
            assert await until(lambda: len(ing.seqs) >= backlog or task.done(), 120)
            assert not task.done(), task.exception()
            assert sorted(set(ing.seqs)) == list(range(backlog))
            assert ing.max_open <= window, f"{ing.max_open} delivered and not acknowledged"
            assert await until(lambda: conn.health.state == "online")
        finally:
            await stop(conn, task, *([acker] if acker else []))


async def test_an_ingest_pause_holds_across_a_reconnect(broker):
    async with MqttProxy(broker.port) as proxy:
        # A short keep-alive: a link that does not read notices a dropped connection when its
        # next ping fails.
        conn = make_connector(proxy.port, client_id="it-link-pause", keepalive_secs=5)
        ing = RecordingIngest()
        task = asyncio.create_task(supervise(conn.name, lambda: conn.run(ing), conn.health))
        acker = asyncio.create_task(committer(ing))
        try:
            assert await until(lambda: conn.health.state == "online")
            await asyncio.to_thread(publish, broker.port, range(1, 3))
            assert await until(lambda: len(ing.seqs) == 2)

            conn.pause_reading()  # what the agent calls when the outbox is over its quota
            first = conn.link
            await asyncio.to_thread(publish, broker.port, range(3, 8))
            proxy.drop_connections()
            # A new connection, and the broker has sent it the queued messages...
            assert await until(
                lambda: conn.link is not None and conn.link is not first
                and len(proxy.connections) == 2 and proxy.connections[1].get(PUBLISH, 0) >= 5
            )
            link = conn.link
            sock = link.client.socket()
            assert sock is not None
            # ...which stay unread in our socket while ingest is paused (a reader would drain
            # them within a loop iteration: half a second is a wide window to see it).
            await asyncio.sleep(0.5)
            assert ing.seqs == [1, 2]
            assert select.select([sock], [], [], 0)[0], "the socket was read while paused"
            assert conn.link is link

            conn.resume_reading()
            # 1 and 2 may come again: their acks can be lost with the connection (QoS 1 is at
            # least once; the engine drops repeats by id). Nothing is missing or out of order.
            assert await until(lambda: set(ing.seqs) >= {1, 2, 3, 4, 5, 6, 7})
            assert list(dict.fromkeys(ing.seqs)) == [1, 2, 3, 4, 5, 6, 7]
            assert await until(lambda: conn.health.state == "online")
            assert not task.done()
        finally:
            await stop(conn, task, acker)


async def test_a_long_pause_keeps_the_connection_alive(broker):
    keepalive = 5  # the smallest the config allows; the pause lasts 3 keep-alive periods
    async with MqttProxy(broker.port) as proxy:
        conn = make_connector(proxy.port, client_id="it-link-keepalive", keepalive_secs=keepalive)
        ing = RecordingIngest()
        task = asyncio.create_task(supervise(conn.name, lambda: conn.run(ing), conn.health))
        try:
            assert await until(lambda: conn.health.state == "online")
            link = conn.link
            conn.pause_reading()
            await asyncio.to_thread(publish, broker.port, range(1, 3))
            pings = proxy.to_broker[0].get(PINGREQ, 0)
            # paho alone would drop the connection after 2 keep-alive periods (it cannot see
            # the PINGRESP behind the unread messages) and the broker after 1.5 without a
            # ping: the connection must outlive a pause of 3 periods.
            dropped = await until(
                lambda: len(proxy.connections) > 1 or conn.link is not link or not link.connected,
                3 * keepalive,
            )
            assert not dropped, "the connection was dropped while paused"
            assert proxy.to_broker[0].get(PINGREQ, 0) >= pings + 2  # the broker was pinged
            assert conn.link is link and link.connected
            assert conn.health.state == "online" and conn.health.restarts == 0
            assert ing.seqs == []
            conn.resume_reading()
            assert await until(lambda: len(ing.seqs) == 2)
            ing.settle()
            assert len(proxy.connections) == 1
        finally:
            await stop(conn, task)
