"""One MQTT connection driven by the asyncio event loop (paho-mqtt 2, MQTT 5 or 3.1.1).

paho runs without its network thread: its socket is registered with the loop (reader,
writer) and ``loop_misc`` runs once a second for keep-alives, so every paho callback runs on
the loop thread and no message crosses threads. The link connects once; when the
connection drops, ``wait_closed()`` raises ``NotConnected`` and the owner's supervisor makes
a new link. It never reconnects by itself.

Only the blocking TCP connect runs in a worker thread, with a timeout.
"""

from __future__ import annotations

import asyncio
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
        c.max_inflight_messages_set(max_inflight)
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
        if on_message is not None:
            c.on_message = lambda _c, _u, msg: on_message(msg)
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
        rc = self.client.loop_read()
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            self._lost(f"read failed: {paho.error_string(rc)}")

    def _write(self) -> None:
        rc = self.client.loop_write()
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            self._lost(f"write failed: {paho.error_string(rc)}")

    def _on_socket_open(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.add_reader, sock, self._read)  # type: ignore[union-attr]

    def _on_socket_close(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.remove_reader, sock)  # type: ignore[union-attr]
        self._call(self.loop.remove_writer, sock)  # type: ignore[union-attr]

    def _on_register_write(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.add_writer, sock, self._write)  # type: ignore[union-attr]

    def _on_unregister_write(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self._call(self.loop.remove_writer, sock)  # type: ignore[union-attr]

    # --- protocol callbacks (on the loop) --------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        fut = self._connected
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(NotConnected(f"broker refused connection: {reason}"))
        else:
            self.session_present = bool(flags.session_present)
            fut.set_result(True)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._lost(f"disconnected: {reason}")

    def _lost(self, why: str) -> None:
        exc = NotConnected(f"MQTT {self.cfg.host}:{self.cfg.port} {why}")
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(exc)
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
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        cfg = self.cfg
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_secs if self.persistent else 0
            props.ReceiveMaximum = cfg.receive_maximum
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
            await asyncio.wait_for(self._connected, cfg.connect_timeout_secs)
        except (OSError, TimeoutError) as exc:
            self._teardown()
            raise NotConnected(f"cannot connect to MQTT {cfg.host}:{cfg.port}: {exc!r}") from exc
        except NotConnected:
            self._teardown()
            raise
        self._misc = asyncio.create_task(self._misc_loop(), name="mqtt-misc")

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            rc = self.client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost(f"keep-alive failed: {paho.error_string(rc)}")
                return

    async def wait_closed(self) -> None:
        """Return never while connected; raise NotConnected when the connection is lost."""
        assert self._closed is not None
        await self._closed

    async def subscribe(self, topics: list[tuple[str, int]], timeout: float = 10.0) -> None:
        if not topics:
            return
        rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
        fut = asyncio.get_running_loop().create_future()
        self._subs[mid] = fut
        reasons = await asyncio.wait_for(fut, timeout)
        bad = [t for (t, _), r in zip(topics, reasons, strict=False) if getattr(r, "is_failure", False)]
        if bad:
            raise RetriableError(f"broker refused subscriptions: {', '.join(bad)}")

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
        self.client.ack(mid, 1)

    def pause_reading(self) -> None:
        """Stop reading from the socket (backpressure, shutdown); the broker holds messages."""
        sock = self.client.socket()
        if sock is not None and self.loop is not None:
            self.loop.remove_reader(sock)

    def resume_reading(self) -> None:
        sock = self.client.socket()
        if sock is not None and self.loop is not None:
            self.loop.add_reader(sock, self._read)

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
            try:
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
            except (ValueError, OSError):
                pass
        try:
            self.client._sock_close()  # paho has no public "drop the socket" call
        except Exception:
            pass
        self._lost("closed")
