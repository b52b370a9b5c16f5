"""MQTT connector: subscribes to the topics the device profiles name, decodes JSON payloads.

One connector per broker, one persistent session (stable client id, clean start off, long
session expiry), QoS 1 with *manual* acknowledgement: a message is acked only after its
effects are in a durable group commit, so the broker redelivers whatever the agent had not
committed when it crashed. Malformed payloads are handed to ``ingest.bad_payload`` (set
aside, then acked), never raised.

Every failure of the connection raises ``NotConnected`` (a ``RetriableError``): the
supervisor reconnects this connector alone. At most ``receive_maximum`` messages are held
unacknowledged (the link stops reading when its window is full), and ``pause_reading()``
(ingest paused: outbox over quota, disk full) holds across reconnects until
``resume_reading()``: the devices' messages wait at the broker.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from ..config import BrokerConfig, DeviceConfig, MqttConnection
from ..errors import PayloadError
from ..events import DeviceEvent
from ..mqttlink import MqttLink
from ..profiles import Decoded, Profile, compile_json_decoder
from ..rules.engine import Ingest
from ..runtime.clock import Clock
from ..runtime.supervisor import Health

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Route:
    device: str
    event: str
    decode: Callable[[bytes], Decoded]


class MqttConnector:
    def __init__(
        self,
        name: str,
        broker: BrokerConfig,
        devices: dict[str, DeviceConfig],
        profiles: dict[str, Profile],
        clock: Clock,
        *,
        client_id: str,
    ):
        self.name = name
        self.broker = broker
        self.clock = clock
        self.client_id = client_id
        self.devices = sorted(devices)
        self.routes: dict[str, _Route] = {}
        self.qos: dict[str, int] = {}
        for dev_id, dev in devices.items():
            conn = dev.connection
            assert isinstance(conn, MqttConnection)
            for ev_name, spec in profiles[dev.profile].events.items():
                topic = f"{conn.topic_base}/{spec.topic}" if spec.topic else conn.topic_base
                self.routes[topic] = _Route(dev_id, ev_name, compile_json_decoder(spec))
                self.qos[topic] = conn.qos
        self.link: MqttLink | None = None
        self.ingest: Ingest | None = None
        self.received = 0
        self.health = Health()
        self.resumed = False  # the broker kept the session: nothing sent meanwhile was lost
        self.buffered = {d: devices[d].connection.qos > 0 for d in devices}  # type: ignore[union-attr]
        self._internal_errors = 0
        self.stopping = False
        self.paused = False  # ingest paused by the agent; holds across reconnects

    def pause_reading(self) -> None:
        """Read no more device messages until ``resume_reading()`` (also after a reconnect)."""
        self.paused = True
        if self.link is not None:
            self.link.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        if self.link is not None:
            self.link.resume_reading()

    def status(self) -> dict[str, Any]:
        link = self.link
        return {
            "state": self.health.state,
            "since": self.health.since,
            "last_error": self.health.last_error,
            "restarts": self.health.restarts,
            "received": self.received,
            "paused": self.paused,
            "unacked": len(link.unacked) if link is not None else 0,
        }

    async def run(self, ingest: Ingest) -> None:
        self.ingest = ingest
        link = MqttLink(
            self.broker, self.client_id, persistent=True, on_message=self._on_message, manual_ack=True
        )
        if self.paused:
            link.pause_reading()  # from CONNACK on: a resumed session's backlog stays unread
        self.link = link
        try:
            await link.connect()
            if not link.session_present:
                log.info("MQTT %s: new session on %s:%s", self.name, self.broker.host, self.broker.port)
            await link.subscribe(sorted(self.qos.items()))
            self.resumed = bool(link.session_present)
            if self.health.restarts:
                log.info("MQTT %s: back online, subscribed to %d topics", self.name, len(self.qos))
            self.health.set("online")
            await link.wait_closed()
        finally:
            await link.close()
            if self.link is link:
                self.link = None

    async def stop(self) -> None:
        self.stopping = True
        if self.link is not None:
            await self.link.close()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception as exc:
            # A bug in a rule or decoder: keep the message for inspection and go on.
            if not self._internal_errors:
                log.exception("internal error handling a message on %s; set aside", msg.topic)
            self._internal_errors += 1
            assert self.ingest is not None and self.link is not None
            link, mid = self.link, msg.mid
            self.ingest.bad_payload(
                "?", msg.topic, "internal_error", repr(exc)[:200], msg.payload,
                (lambda: link.ack(mid)) if msg.qos else None,
            )

    def _handle(self, msg: paho.MQTTMessage) -> None:
        self.received += 1
        ingest = self.ingest
        link = self.link
        assert ingest is not None and link is not None
        # After a reconnect, acking on the old link only settles it: the broker redelivers.
        ack = functools.partial(link.ack, msg.mid) if msg.qos > 0 else None
        topic = msg.topic
        route = self.routes.get(topic)
        payload = msg.payload
        if route is None:
            # Not ours (a broad ACL or a stale subscription of this session): note it, ack it.
            ingest.bad_payload("?", topic, "unknown_topic", "", payload, ack)
            return
        try:
            d = route.decode(payload)
        except PayloadError as exc:
            ingest.bad_payload(route.device, topic, exc.reason, exc.detail, payload, ack)
            return
        now = self.clock.now()
        ingest.device_event(
            DeviceEvent(
                route.device,
                route.event,
                d.fields,
                d.time if d.time is not None else now,
                now,
                f"{route.device}/{route.event}/{d.msg_key}",
            ),
            ack,
        )
