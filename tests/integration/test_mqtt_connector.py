"""The MQTT connector against a real mosquitto: decoding, manual acks, persistent session."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import BrokerConfig, DeviceConfig
from edge_agent.connectors.mqtt import MqttConnector
from edge_agent.profiles import load_profiles
from edge_agent.runtime.clock import SystemClock

PROFILES = Path(__file__).parents[2] / "device_profiles"
TOPIC = "it/scanner/S1/read"


class HoldingIngest:
    """Records events and keeps their acks, to run them (or not) later."""

    def __init__(self) -> None:
        self.events: list = []
        self.acks: list = []
        self.bad: list = []

    def device_event(self, ev, ack) -> None:
        self.events.append(ev)
        self.acks.append(ack)

    def bad_payload(self, device, source, reason, detail, payload, ack) -> None:
        self.bad.append(reason)
        self.acks.append(ack)


def connector(port: int, protocol: str) -> MqttConnector:
    profiles, problems = load_profiles(PROFILES, ["generic_json_scanner"])
    assert not problems
    dev = DeviceConfig.model_validate(
        {"profile": "generic_json_scanner",
         "connection": {"kind": "mqtt", "broker": "b", "topic_base": "it/scanner/S1"}}
    )
    return MqttConnector(
        "mqtt:b", BrokerConfig(port=port, protocol=protocol), {"S1": dev}, profiles, SystemClock(),
        client_id=f"it-connector-{protocol}",
    )


def publish(port: int, payloads: list[bytes]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for p in payloads:
        c.publish(TOPIC, p, qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def scan(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": "2026-11-22T10:00:00.000Z", "tracking_id": f"T{seq}",
                       "barcode": f"C{seq}"}).encode()


async def run_until(conn: MqttConnector, ingest: HoldingIngest, n: int) -> asyncio.Task:
    task = asyncio.create_task(conn.run(ingest))
    for _ in range(200):
        if len(ingest.events) + len(ingest.bad) >= n:
            break
        await asyncio.sleep(0.02)
    return task


async def stop(conn: MqttConnector, task: asyncio.Task) -> None:
    await conn.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)


async def _roundtrip(broker, protocol: str) -> None:
    # First connection creates the persistent session (subscriptions), then goes away.
    conn = connector(broker.port, protocol)
    ing = HoldingIngest()
    task = await run_until(conn, ing, 0)
    await asyncio.sleep(0.3)
    await stop(conn, task)
    publish(broker.port, [scan(1), scan(2), b"not json"])  # queued while we are away
    conn = connector(broker.port, protocol)
    ing = HoldingIngest()
    task = await run_until(conn, ing, 3)
    assert [e.fields["tracking_id"] for e in ing.events] == ["T1", "T2"]
    assert ing.events[0].msg_id.startswith("S1/read/1@")
    assert ing.events[0].time == 1795341600.0  # the device's own timestamp
    assert ing.bad == ["not_json"]
    ing.acks[0]()  # only the first is "committed"
    await asyncio.sleep(0.2)
    await stop(conn, task)
    # Reconnect: the broker redelivers what was not acknowledged, and only that.
    conn = connector(broker.port, protocol)
    ing2 = HoldingIngest()
    task = await run_until(conn, ing2, 2)
    await asyncio.sleep(0.3)
    assert [e.fields["tracking_id"] for e in ing2.events] == ["T2"]
    assert ing2.bad == ["not_json"]
    for a in ing2.acks:
        a()
    await asyncio.sleep(0.2)
    await stop(conn, task)


async def test_unacked_messages_come_back_after_reconnect_mqtt5(broker):
    await _roundtrip(broker, "5")


async def test_unacked_messages_come_back_after_reconnect_mqtt311(broker):
    await _roundtrip(broker, "3.1.1")


class ExplodingIngest(HoldingIngest):
    def device_event(self, ev, ack) -> None:
        if ev.fields["tracking_id"] == "T66":
            raise RuntimeError("bug in a rule")
        super().device_event(ev, ack)


async def test_a_bug_while_handling_one_message_sets_it_aside_and_goes_on(broker):
    conn = connector(broker.port, "5")
    conn.client_id = "it-exploding"
    ing = ExplodingIngest()
    task = asyncio.create_task(conn.run(ing))
    await asyncio.sleep(0.5)
    publish(broker.port, [scan(65), scan(66), scan(67)])
    for _ in range(100):
        if len(ing.events) == 2:
            break
        await asyncio.sleep(0.02)
    assert [e.fields["tracking_id"] for e in ing.events] == ["T65", "T67"]
    assert ing.bad == ["internal_error"]
    assert not task.done()
    await stop(conn, task)
