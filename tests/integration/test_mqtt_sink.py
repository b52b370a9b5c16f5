"""The MQTT sink passes the shared sink contract against a real mosquitto, and publishes
the retained agent status with a last will."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from edge_agent.config import BrokerConfig, MqttSinkConfig
from edge_agent.errors import NotConnected, RetriableError
from edge_agent.runtime.supervisor import Health, supervise
from edge_agent.sinks.base import SendIncomplete
from edge_agent.sinks.mqtt import MqttSink
from edge_agent.testing import ReceivedEvent, check_sink_contract, sample_items
from simulators.broker import Mosquitto, free_port
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


async def test_a_retry_after_a_puback_timeout_does_not_publish_again():
    """No PUBACK within the timeout (a broker that stalls) is a transient failure, not a lost
    message: paho still has the messages in flight on the same link. The retry of the same
    events must wait for those acknowledgements, not publish every event a second time."""
    with Mosquitto() as own:  # its own broker: this test stalls it
        assert own.proc is not None
        rec = BusRecorder(own.host, own.port, "edge/slow/events/#")
        sink = make(own.port, site="slow")
        sink.cfg = sink.cfg.model_copy(update={"publish_timeout_secs": 0.5})
        await sink.start()
        *items, marker = sample_items(201)
        try:
            own.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(RetriableError):
                    await sink.send(items)  # no PUBACK while the broker is stalled
            finally:
                own.proc.send_signal(signal.SIGCONT)
            results = None
            for _ in range(50):  # the dispatcher's retries, without its backoff
                try:
                    results = await sink.send(items)
                    break
                except SendIncomplete as exc:
                    items = items[len(exc.results):]
                except RetriableError:
                    pass
            assert results == [None] * len(items)
            # Published after everything else on one link: once it arrived, so did the rest.
            assert await sink.send([marker]) == [None]
            assert await asyncio.to_thread(rec.wait_unique, 201, 10) == 201
            with rec.lock:
                ids = [e["id"] for e in rec.events]
            assert len(ids) == 201, f"{len(ids) - 201} events published again"
        finally:
            await sink.close()
            rec.close()
