"""A subscriber to the agent's MQTT events, recording envelopes and their arrival times.

Every message is kept, a redelivery of an id included (QoS 1 is at least once): the ledger
(``simulators.ledger``) tells redeliveries from duplicate facts, so nothing is dropped here.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class BusRecorder:
    """``client_id`` given: a persistent session (the broker keeps what is published while
    the recorder is away, e.g. across a broker restart with persistence), and paho
    reconnects by itself."""

    def __init__(self, host: str, port: int, topic: str = "edge/+/events/#", protocol: str = "5",
                 client_id: str | None = None):
        self.topic = topic
        self.events: list[dict[str, Any]] = []
        self.meta: list[dict[str, Any]] = []  # topic, user properties, content type, arrival
        self.lock = threading.Lock()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        persistent = client_id is not None
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            client_id=client_id or "", clean_session=None if v5 else not persistent,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 2)
        if v5 and persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect(host, port, clean_start=False, properties=props)
        else:
            self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("bus recorder did not subscribe")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        ev = json.loads(msg.payload)
        props = getattr(msg, "properties", None)
        meta = {
            "topic": msg.topic,
            "arrival": now,
            "user_properties": dict(getattr(props, "UserProperty", []) or []),
            "content_type": getattr(props, "ContentType", None),
        }
        with self.lock:
            self.events.append(ev)
            self.meta.append(meta)

    def deliveries(self) -> list[dict[str, Any]]:
        """Every event received so far, in arrival order, repeats of an id included."""
        with self.lock:
            return list(self.events)

    def unique(self) -> int:
        with self.lock:
            return len({e["id"] for e in self.events})

    def wait_unique(self, count: int, timeout_secs: float) -> int:
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline and self.unique() < count:
            time.sleep(0.1)
        return self.unique()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
