"""MQTT sink: publishes each event's CloudEvents envelope on ``{prefix}/events/{type}``.

QoS 1, not retained; an event counts as delivered only when the broker has acknowledged it
(PUBACK). A send that fails transiently keeps the publishes still in flight on the link:
the dispatcher's retry of the same events waits for their PUBACKs instead of publishing
them again (a broker that is slow to acknowledge would otherwise get every event twice),
and an event the broker acknowledged after the failure is not published again either.
Only a new link (the old one's in-flight messages are gone with it) publishes anew. On MQTT 5 the CloudEvents attributes are also user properties and the content
type is set. The sink owns its link and publishes the retained agent status
(``{prefix}/agent/status``: online, with a last will ``offline``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import BrokerConfig, MqttSinkConfig
from ..errors import NotConnected, RetriableError
from ..events import iso_time
from ..mqttlink import MqttLink
from ..outbox.store import Pending
from ..runtime.supervisor import Health
from .base import Result, SendIncomplete

log = logging.getLogger(__name__)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class PackedProperties(Properties):
    """PUBLISH properties encoded once by us (MQTT 5 section 2.2.2).

    paho's ``Properties`` costs ~40 us per message to build and pack; this costs ~2 us.
    """

    CONTENT_TYPE, USER_PROPERTY = 0x03, 0x26

    def __init__(self, content_type: str, user: list[tuple[str, str]]):
        # Skip Properties.__init__/__setattr__ (they validate names per attribute, slowly).
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        body = bytes([self.CONTENT_TYPE]) + _utf8(content_type)
        for k, v in user:
            body += bytes([self.USER_PROPERTY]) + _utf8(k) + _utf8(v)
        object.__setattr__(self, "_packed", _varint(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed


def _failed(f: asyncio.Future[None]) -> bool:
    """A finished publish that did not end in a PUBACK (its exception is retrieved)."""
    return f.done() and (f.cancelled() or f.exception() is not None)


def status_payload(state: str, **extra: object) -> bytes:
    return json.dumps({"state": state, "since": iso_time(time.time()), **extra}).encode()


class MqttSink:
    def __init__(self, name: str, cfg: MqttSinkConfig, broker: BrokerConfig, *, site: str, client_id: str):
        self.name = name
        self.cfg = cfg
        self.broker = broker
        self.site = site
        self.batch_max_events = cfg.batch_max_events
        self.prefix = cfg.prefix.replace("{site}", site).rstrip("/")
        self.status_topic = f"{self.prefix}/agent/status"
        self.client_id = client_id
        self.link: MqttLink | None = None
        self.health = Health()
        self.v5 = broker.protocol == "5"
        self._ready = asyncio.Event()
        # After a transient failure: event id -> its publish, still pending or acknowledged,
        # on ``_inflight_link``; only for the failed send's unsettled events (bounded).
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._inflight_link: MqttLink | None = None

    async def start(self) -> None:
        """Nothing to do: ``run()`` (supervised) keeps the link up."""

    async def run(self) -> None:
        """Connect, announce the agent online, and hold the link until it drops."""
        link = MqttLink(
            self.broker,
            self.client_id,
            persistent=False,
            will=(self.status_topic, status_payload("offline", reason="connection lost")),
        )
        try:
            await link.connect()
            self.link = link
            link.publish(self.status_topic, status_payload("online"), qos=1, retain=True)
            self.health.set("online")
            self._ready.set()
            await link.wait_closed()
        finally:
            self._ready.clear()
            if self.link is link:
                self.link = None
            await link.close()

    def _props(self, it: Pending) -> Properties | None:
        if not self.v5:
            return None
        return PackedProperties(
            "application/cloudevents+json",
            [("specversion", "1.0"), ("id", it.id), ("type", it.type), ("subject", it.subject),
             ("site", self.site)],
        )

    async def send(self, items: list[Pending]) -> list[Result]:
        if not items:
            return []
        link = self.link
        if link is None or not link.connected:
            raise NotConnected(f"MQTT sink {self.name}: not connected")
        inflight, self._inflight = self._inflight, {}
        if self._inflight_link is not link:
            inflight = {}  # gone with the old connection: publish anew
        futs: list[asyncio.Future[None]] = []
        cause: BaseException
        try:
            for it in items:
                f = inflight.get(it.id) if inflight else None
                if f is None or _failed(f):
                    f = link.publish(
                        f"{self.prefix}/events/{it.type}", it.body.encode(), 1, False, self._props(it)
                    )
                    assert f is not None  # QoS 1
                futs.append(f)
        except NotConnected as exc:
            cause = exc
        else:
            # asyncio.wait, not wait_for: a timeout must not cancel the publishes.
            _, pending = await asyncio.wait(futs, timeout=self.cfg.publish_timeout_secs)
            failed = next((f for f in futs if _failed(f)), None)
            if not pending and failed is None:
                return [None] * len(items)
            if failed is not None:
                cause = failed.exception() or RetriableError(f"MQTT sink {self.name}: publish cancelled")
            else:
                cause = RetriableError(f"MQTT sink {self.name}: no PUBACK within timeout")
        # Whatever the broker acknowledged in order counts; the rest is retried.
        done = 0
        for f in futs:
            if not f.done() or _failed(f):
                break
            done += 1
        keep: dict[str, asyncio.Future[None]] = {}
        for it, f in zip(items[done:], futs[done:], strict=False):
            if _failed(f):
                continue  # publish again next time
            if not f.done():
                f.add_done_callback(_failed)  # its exception is retrieved whoever waits
            keep[it.id] = f  # pending, or acknowledged out of order: reused by the retry
        self._inflight, self._inflight_link = keep, link
        if not isinstance(cause, RetriableError):
            cause = RetriableError(f"MQTT sink {self.name}: {cause!r}")
        if done:
            raise SendIncomplete([None] * done, cause)
        raise cause

    def publish_device_status(self, device: str, status: dict[str, object]) -> bool:
        """Retained ``{prefix}/devices/{device}/status`` (contract 3.2); False if not connected."""
        link = self.link
        if link is None or not link.connected:
            return False
        link.publish(f"{self.prefix}/devices/{device}/status", json.dumps(status).encode(), 1, True)
        return True

    async def close(self) -> None:
        link = self.link
        if link is not None and link.connected:
            fut = link.publish(self.status_topic, status_payload("offline", reason="stopped"), qos=1, retain=True)
            if fut is not None:
                try:
                    await asyncio.wait_for(fut, 2.0)
                except (TimeoutError, RetriableError):
                    pass
            await link.close()
