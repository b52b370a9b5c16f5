"""The MQTT sink passes the shared sink contract against a real mosquitto, and publishes
the retained agent status with a last will."""

from __future__ import annotations

import asyncio
import contextlib
import time

from edge_agent.config import BrokerConfig, MqttSinkConfig
from edge_agent.errors import NotConnected
from edge_agent.runtime.supervisor import Health, supervise
from edge_agent.sinks.mqtt import MqttSink
from edge_agent.testing import ReceivedEvent, check_sink_contract, sample_items
from simulators.broker import free_port
from simulators.bus_recorder import BusRecorder


class SupervisedMqttSink(MqttSink):
    """The sink as the agent runs it: its link kept up by the supervisor."""

    async def start(self) -> None:
        self._task = asyncio.create_task(supervise(self.name, self.run, Health()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 2.0)

    async def close(self) -> None:
        await super().close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def make(port: int, site: str = "contract") -> SupervisedMqttSink:
    cfg = MqttSinkConfig(kind="mqtt", broker="b", prefix="edge/{site}")
    broker = BrokerConfig(port=port, connect_timeout_secs=1)
    return SupervisedMqttSink("bus", cfg, broker, site=site, client_id=f"sink-test-{port}-{time.time()}")


async def test_mqtt_sink_passes_the_sink_contract(broker):
    rec = BusRecorder(broker.host, broker.port, "edge/contract/events/#")
    base = 0

    async def received() -> list[ReceivedEvent]:
        await asyncio.sleep(0.3)  # the recorder's thread gets the last messages
        with rec.lock:
            return [
                ReceivedEvent(e, m["user_properties"].get("id"))
                for e, m in zip(rec.events[base:], rec.meta[base:], strict=True)
            ]

    try:
        await check_sink_contract(
            lambda: make(broker.port), received, make_unreachable_sink=lambda: make(free_port())
        )
        with rec.lock:
            topics = {m["topic"] for m in rec.meta}
        assert topics == {"edge/contract/events/carton_closed"}
    finally:
        rec.close()


async def test_mqtt_sink_status_retained_and_not_connected_when_down(broker):
    sink = make(broker.port, site="st")
    await sink.start()
    await sink.send(sample_items(1))
    status = BusRecorder(broker.host, broker.port, "edge/st/agent/status")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not status.events:
            await asyncio.sleep(0.05)
        assert status.events[0]["state"] == "online"  # retained: seen by a late subscriber
        await sink.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(status.events) < 2:
            await asyncio.sleep(0.05)
        assert status.events[-1]["state"] == "offline"
    finally:
        status.close()
    down = make(free_port())
    await down.start()
    try:
        try:
            await down.send(sample_items(1))
        except NotConnected as exc:
            assert "not connected" in str(exc)
        else:
            raise AssertionError("send to a missing broker must raise NotConnected")
    finally:
        await down.close()
