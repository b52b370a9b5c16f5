"""One MQTT connection driven by the asyncio event loop (paho-mqtt 2, MQTT 5 or 3.1.1).

paho runs without its network thread: its socket is registered with the loop (reader,
writer) and ``loop_misc`` runs once a second for keep-alives, so every paho callback runs on
the loop thread and no message crosses threads. The link connects once; when the
connection drops, ``wait_closed()`` raises ``NotConnected`` and the owner's supervisor makes
a new link. It never reconnects by itself.

Every failure of the connection (refused or slow CONNACK, slow SUBACK, socket errors, paho
error codes, an exception inside paho) is raised as ``NotConnected`` (a ``RetriableError``),
so it stays local to this connection.

Inbound flow control (manual-ack links): at most ``receive_maximum`` QoS 1 messages are
handed to ``on_message`` and not yet acknowledged. When the window is full, or the owner
called ``pause_reading()``, the link stops reading its socket: the broker's messages wait
unacknowledged at the broker (TCP holds back what it already sent), whatever the protocol
version (MQTT 5 brokers also honour the Receive Maximum sent in CONNECT; an MQTT 3.1.1
broker may send its whole queue at once). While it does not read, the link keeps the
broker's keep-alive fed itself.

Only the blocking TCP connect runs in a worker thread, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import BrokerConfig
from .errors import NotConnected, RetriableError

log = logging.getLogger(__name__)

OnMessage = Callable[[paho.MQTTMessage], None]


class MqttLink:
    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        *,
        persistent: bool,
        on_message: OnMessage | None = None,
        manual_ack: bool = False,
        will: tuple[str, bytes] | None = None,
        max_inflight: int = 1000,
    ):
        self.cfg = cfg
        self.where = f"MQTT {cfg.host}:{cfg.port}"
        self.v5 = cfg.protocol == "5"
        self.persistent = persistent
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=manual_ack,
        )
        c = self.client
        c.connect_timeout = cfg.connect_timeout_secs
        c.max_inflight_messages_set(max_inflight)  # outbound only: what we publish
        c.max_queued_messages_set(0)
        if cfg.username:
            password = None
            if cfg.password_file:
                password = cfg.password_file.read_text(encoding="utf-8").strip()
            c.username_pw_set(cfg.username, password)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        # Inbound window: QoS 1 messages handed over and not yet acknowledged, by packet id
        # (a manual-ack link only; paho acknowledges the others itself).
        self.window = cfg.receive_maximum if manual_ack else 0
        self.unacked: set[int] = set()
        self.delivered = 0  # messages handed to on_message
        if on_message is not None:
            c.on_message = self._windowed(on_message) if manual_ack else (
                lambda _c, _u, msg: on_message(msg)
            )
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self.loop: asyncio.AbstractEventLoop | None = None
        self._connected: asyncio.Future[bool] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._subs: dict[int, asyncio.Future[list[Any]]] = {}
        self._pubs: dict[int, asyncio.Future[None]] = {}
        self._misc: asyncio.Task[None] | None = None
        self.session_present = False
        self._paused = False  # the owner's pause (ingest paused, shutdown)
        self._established = False  # CONNACK received: from now on the gate applies
        self._reading = False  # our reader is registered with the loop

    # --- paho socket callbacks (may run on the connect thread: hop to the loop) -------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _read(self) -> None:
        try:
            rc = self.client.loop_read()
        except Exception as exc:  # a bug or a protocol error inside paho: lose this link only
            self._lost(f"read failed: {exc!r}")
            return
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            self._lost(f"read failed: {paho.error_string(rc)}")

    def _write(self) -> None:
        try:
            rc = self.client.loop_write()
        except Exception as exc:
            self._lost(f"write failed: {exc!r}")
            return
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            self._lost(f"write failed: {paho.error_string(rc)}")

    def _on_socket_open(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self._socket_opened, sock)

    def _socket_opened(self, sock: socket.socket) -> None:
        if self._closed is None or self._closed.done():
            # The connect thread finished after we gave up on it: drop what it opened.
            with contextlib.suppress(Exception):
                self.client._sock_close()
            return
        self._reading = False
        self._set_reading(True)  # the CONNACK must be read; the gate applies after it

    def _on_socket_close(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self._socket_closed, sock)

    def _socket_closed(self, sock: socket.socket) -> None:
        self._reading = False
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(sock)  # type: ignore[union-attr]
            self.loop.remove_writer(sock)  # type: ignore[union-attr]

    def _on_register_write(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.add_writer, sock, self._write)  # type: ignore[union-attr]

    def _on_unregister_write(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.remove_writer, sock)  # type: ignore[union-attr]

    # --- reading: the owner's pause and the inbound window ----------------------------------

    def _windowed(self, on_message: OnMessage) -> Callable[[Any, Any, paho.MQTTMessage], None]:
        unacked = self.unacked
        window = self.window

        def deliver(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            self.delivered += 1
            if msg.qos:
                unacked.add(msg.mid)
                if len(unacked) >= window:
                    self._set_reading(False)  # before on_message, which may ack at once
            on_message(msg)

        return deliver

    def _may_read(self) -> bool:
        if self._closed is None or self._closed.done():
            return False
        if not self._established:
            return True
        return not self._paused and not (self.window and len(self.unacked) >= self.window)

    def _set_reading(self, want: bool) -> None:
        if want == self._reading or self.loop is None:
            return
        sock = self.client.socket()
        if sock is None:
            self._reading = False
            return
        if want:
            self.loop.add_reader(sock, self._read)
            # A PINGRESP we could not read meanwhile is no sign of a dead broker: forget the
            # ping, so paho's keep-alive check starts afresh now that we read again.
            self.client._ping_t = 0
        else:
            self.loop.remove_reader(sock)
        self._reading = want

    def _gate(self) -> None:
        self._set_reading(self._may_read())

    # --- protocol callbacks (on the loop) --------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        fut = self._connected
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(NotConnected(f"{self.where}: broker refused connection: {reason}"))
        else:
            self.session_present = bool(flags.session_present)
            self._established = True
            self._gate()  # paused before CONNACK: the session's messages stay unread
            fut.set_result(True)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._lost(f"disconnected: {reason}")

    def _lost(self, why: str) -> None:
        exc = NotConnected(f"{self.where} {why}")
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(exc)
        self._set_reading(False)
        for futs in (self._pubs, self._subs):
            for f in futs.values():
                if not f.done():
                    f.set_exception(exc)
            futs.clear()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _props: Any) -> None:
        f = self._subs.pop(mid, None)
        if f is not None and not f.done():
            f.set_result(reasons)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        f = self._pubs.pop(mid, None)
        if f is not None and not f.done():
            if reason.is_failure:
                f.set_exception(RetriableError(f"broker did not accept publish: {reason}"))
            else:
                f.set_result(None)

    # --- public ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and wait for CONNACK; raises NotConnected."""
        self.loop = asyncio.get_running_loop()
        self._connected = self.loop.create_future()
        self._closed = self.loop.create_future()
        for f in (self._connected, self._closed):  # may fail with nobody waiting: no warning
            f.add_done_callback(_retrieve)
        cfg = self.cfg
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_secs if self.persistent else 0
            props.ReceiveMaximum = cfg.receive_maximum  # the broker's bound on what it sends us
        try:
            await asyncio.wait_for(
                self.loop.run_in_executor(
                    None,
                    lambda: self.client.connect(
                        cfg.host,
                        cfg.port,
                        keepalive=cfg.keepalive_secs,
                        clean_start=not self.persistent if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                        properties=props,
                    ),
                ),
                cfg.connect_timeout_secs,
            )
            try:
                await asyncio.wait_for(self._connected, cfg.connect_timeout_secs)
            except TimeoutError as exc:
                raise NotConnected(
                    f"{self.where}: no CONNACK within {cfg.connect_timeout_secs:g} s"
                ) from exc
        except NotConnected:
            self._teardown()
            raise
        except Exception as exc:  # socket errors, DNS, TLS, timeouts, errors inside paho
            self._teardown()
            raise NotConnected(f"cannot connect to {self.where}: {exc!r}") from exc
        self._misc = asyncio.create_task(self._misc_loop(), name="mqtt-misc")

    async def _misc_loop(self) -> None:
        c = self.client
        loop = asyncio.get_running_loop()
        # While we do not read, paho would take the PINGRESP waiting unread behind the broker's
        # messages for a dead broker and drop the connection: ping the broker ourselves (it
        # drops a client silent for 1.5 keep-alives), first at once, then every half period.
        every = self.cfg.keepalive_secs / 2
        last_ping = -every
        while True:
            await asyncio.sleep(1.0)
            if self._closed is None or self._closed.done():
                return  # lost: the owner tears the link down
            try:
                if self._reading:
                    last_ping = -every
                    rc = c.loop_misc()
                else:
                    now = loop.time()
                    if now - last_ping < every:
                        continue
                    last_ping = now
                    rc = c._send_pingreq()  # paho has no public "ping now"
                    c._ping_t = 0  # its answer is read, and ignored, once we read again
            except Exception as exc:
                self._lost(f"keep-alive failed: {exc!r}")
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost(f"keep-alive failed: {paho.error_string(rc)}")
                return

    async def wait_closed(self) -> None:
        """Return never while connected; raise NotConnected when the connection is lost."""
        assert self._closed is not None
        await self._closed

    async def subscribe(self, topics: list[tuple[str, int]], timeout: float | None = None) -> None:
        """Subscribe and wait for the SUBACK (``timeout``: default the connect timeout).

        Raises NotConnected when the broker does not answer in time or the connection is
        lost, RetriableError when it refuses a subscription. Time the broker spent sending
        us messages, or waiting for us to read, does not count against it.
        """
        if not topics:
            return
        if timeout is None:
            timeout = self.cfg.connect_timeout_secs
        try:
            rc, mid = self.client.subscribe(topics)
        except Exception as exc:
            raise NotConnected(f"{self.where}: subscribe failed: {exc!r}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"{self.where}: subscribe failed: {paho.error_string(rc)}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self._subs[mid] = fut
        left = timeout
        while not fut.done():
            seen, t0 = self.delivered, loop.time()
            await asyncio.wait((fut,), timeout=min(left, 0.5))
            if fut.done():
                break
            if self._reading and self.delivered == seen:
                left -= loop.time() - t0
                if left <= 0:
                    self._subs.pop(mid, None)
                    raise NotConnected(f"{self.where}: no SUBACK within {timeout:g} s")
        reasons = fut.result()
        bad = [t for (t, _), r in zip(topics, reasons, strict=False) if getattr(r, "is_failure", False)]
        if bad:
            raise RetriableError(f"{self.where}: broker refused subscriptions: {', '.join(bad)}")

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None] | None:
        """Queue a publish; for QoS 1 returns a future resolved on the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"publish failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return None
        assert self.loop is not None
        fut = self.loop.create_future()
        self._pubs[info.mid] = fut
        return fut

    def ack(self, mid: int) -> None:
        """Acknowledge a delivered QoS 1 message, once its effects are durable.

        On a connection already lost this only settles it (the broker redelivers it on the
        next connection). Frees a place in the inbound window.
        """
        self.unacked.discard(mid)
        closed = self._closed
        if closed is not None and not closed.done():
            self.client.ack(mid, 1)
            if not self._reading:
                self._gate()

    def pause_reading(self) -> None:
        """Stop reading from the socket (backpressure, shutdown); the broker holds messages.

        Holds until ``resume_reading()``; set before ``connect()``, it applies from CONNACK.
        The connection stays alive meanwhile.
        """
        self._paused = True
        self._gate()

    def resume_reading(self) -> None:
        self._paused = False
        self._gate()

    @property
    def reading(self) -> bool:
        """Whether the link is reading its socket now (not paused, window not full)."""
        return self._reading

    @property
    def connected(self) -> bool:
        return self._closed is not None and not self._closed.done() and self.client.is_connected()

    async def close(self) -> None:
        """Disconnect cleanly (a persistent session stays on the broker)."""
        if self.client.is_connected():
            self.client.disconnect()
            for _ in range(20):  # the DISCONNECT is written by the loop's writer
                if not self.client.is_connected() or self.client.socket() is None:
                    break
                await asyncio.sleep(0.01)
        self._teardown()

    def _teardown(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        sock = self.client.socket()
        if sock is not None and self.loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
        self._reading = False
        with contextlib.suppress(Exception):
            self.client._sock_close()  # paho has no public "drop the socket" call
        self._lost("closed")


def _retrieve(f: asyncio.Future[Any]) -> None:
    """A future that may fail with nobody waiting: mark its exception as seen."""
    if not f.cancelled():
        f.exception()
