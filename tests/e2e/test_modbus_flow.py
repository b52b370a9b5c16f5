"""Modbus devices through the whole agent: a Modbus checkweigher feeds the spine's
carton_closed rule (unchanged) together with the MQTT scanner; pick-to-light presses become
pick_confirmed / pick_short; a conveyor jam becomes equipment_fault. Real TCP everywhere:
pymodbus simulators, mosquitto, HTTP receivers."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent
from edge_agent.config import load_site
from simulators.modbus_devices import CheckweigherSim, ConveyorSim, PickToLightSim
from simulators.procs import EXAMPLE_SITE, PROFILES
from simulators.receiver import Receiver

SITE = """
site: modbus-e2e
profiles_dir: {profiles}
brokers:
  local: {{host: 127.0.0.1, port: {broker}, protocol: "5"}}
devices:
  SCN1:
    profile: generic_json_scanner
    connection: {{kind: mqtt, broker: local, topic_base: site/close1/scanner/SCN1}}
  CW2:
    profile: acme_checkweigher_mb
    connection: {{kind: modbus, host: 127.0.0.1, port: {cw}, timeout_ms: 500}}
  PTL1:
    profile: acme_pick_to_light
    connection: {{kind: modbus, host: 127.0.0.1, port: {ptl}, timeout_ms: 500}}
  CONV3:
    profile: acme_conveyor_section
    connection: {{kind: modbus, host: 127.0.0.1, port: {conv}, timeout_ms: 500}}
rules:
{carton_rule}
  - name: picks-confirmed
    kind: map
    inputs:
      pick: {{device: PTL1, event: [confirm_1, confirm_2, confirm_3, confirm_4]}}
    emit:
      type: pick_confirmed
      subject: ${{pick.location}}
      data: {{location: "${{pick.location}}", position: "${{pick.position}}", qty: "${{pick.qty_picked}}", zone: PTL1}}
  - name: picks-short
    kind: map
    inputs:
      pick: {{device: PTL1, event: [short_1, short_2, short_3, short_4]}}
    emit:
      type: pick_short
      subject: ${{pick.location}}
      data: {{location: "${{pick.location}}", position: "${{pick.position}}", qty_picked: "${{pick.qty_picked}}", qty_expected: "${{pick.display_qty}}"}}
  - name: conveyor-faults
    kind: map
    inputs:
      jam: {{device: CONV3, event: jam}}
    emit:
      type: equipment_fault
      subject: CONV3
      data: {{equipment: CONV3, reason: "${{jam.fault_code}}", speed_m_min: "${{jam.speed_m_min}}"}}
sinks:
  wms:
    kind: http
    url: {wms}
    batch_linger_ms: 5
  bus:
    kind: mqtt
    broker: local
    event_types: [equipment_fault]
outbox:
  path: {db}
  commit_interval_ms: 2
"""


def carton_rule() -> str:
    """The spine's rule from the shipped example, with the checkweigher swapped for CW2."""
    text = EXAMPLE_SITE.read_text()
    start = text.index("  - name: close-station-1")
    end = text.index("\nsinks:")
    return text[start:end].replace("device: CW1", "device: CW2")


async def wait_for(pred, secs: float = 10.0) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def scan(port: int, tracking_id: str, barcode: str, seq: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
    body = {"seq": seq, "ts": ts, "tracking_id": tracking_id, "barcode": barcode}
    c.publish("site/close1/scanner/SCN1/read", json.dumps(body), qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def retained(port: int, topic: str) -> dict[str, dict]:
    """What a subscriber arriving now gets: the retained status of every device."""
    got: dict[str, dict] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic.split("/")[-2], json.loads(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    time.sleep(1.0)
    c.loop_stop()
    c.disconnect()
    return got


async def test_modbus_devices_make_business_events_end_to_end(broker, tmp_path: Path):
    async with CheckweigherSim() as cw, PickToLightSim() as ptl, ConveyorSim() as conv, \
            Receiver("wms") as wms:
        path = tmp_path / "site.yaml"
        path.write_text(SITE.format(
            profiles=PROFILES, broker=broker.port, cw=cw.port, ptl=ptl.port, conv=conv.port,
            carton_rule=carton_rule(), wms=f"http://127.0.0.1:{wms.events_port}/events",
            db=tmp_path / "outbox.db",
        ))
        site, profiles = load_site(path)
        agent = Agent(site, profiles, base_dir=tmp_path)
        task = asyncio.create_task(agent.run())
        try:
            assert await wait_for(lambda: agent.connectors and all(
                c.health.state == "online" for c in agent.connectors))
            await asyncio.sleep(0.3)  # the first polls learn the counters and flags
            # carton_closed: scan over MQTT, weight over Modbus, joined by tracking id.
            await asyncio.to_thread(scan, broker.port, "T0000501", "C0000501", 501)
            await cw.weigh("T0000501", 2345.5, True)
            # pick-to-light presses and a conveyor jam
            assert ptl.confirm(1, 3)
            assert ptl.short(4, 1)
            ptl.set("display_qty_4", 2)
            conv.jam(1)
            got = lambda t: [e for e in wms.events if e["type"] == t]  # noqa: E731
            assert await wait_for(lambda: got("carton_closed") and got("pick_confirmed")
                                  and got("pick_short") and got("equipment_fault"))
            closed = got("carton_closed")[0]["data"]
            assert closed["carton_id"] == "C0000501" and closed["tracking_id"] == "T0000501"
            assert abs(closed["weight_g"] - 2345.5) < 1e-3 and closed["in_tolerance"] is True
            confirmed = got("pick_confirmed")[0]
            assert confirmed["data"]["qty"] == 3 and confirmed["data"]["position"] == 1
            assert confirmed["subject"] == confirmed["data"]["location"] == "A12-03-1"
            short = got("pick_short")[0]["data"]
            assert short["position"] == 4 and short["qty_picked"] == 1
            fault = got("equipment_fault")[0]["data"]
            assert fault == {"equipment": "CONV3", "reason": "jam_at_photo_eye",
                             "speed_m_min": fault["speed_m_min"]}
            # The presses were acknowledged on the device after the events were durable.
            assert await wait_for(lambda: ptl.acknowledged("confirm_1") and ptl.acknowledged("short_4"))
            await asyncio.sleep(0.5)
            assert len(wms.events) == 4  # one business event per fact, nothing twice
            st = agent.status()
            assert all(c["state"] == "online" for c in st["connectors"].values())
            # Each device's status is retained on MQTT; a device that stops answering shows.
            conv.faults.blackhole = True
            assert await wait_for(lambda: agent.status()["connectors"]["modbus:CONV3"]["state"]
                                  in ("degraded", "offline"))
            await asyncio.sleep(1.5)
            status = await asyncio.to_thread(retained, broker.port, "edge/modbus-e2e/devices/+/status")
            assert set(status) == {"SCN1", "CW2", "PTL1", "CONV3"}
            assert status["CW2"]["state"] == "online"
            assert status["CONV3"]["state"] in ("degraded", "offline")
            assert "no answer" in status["CONV3"]["last_error"]
        finally:
            agent.stop()
            await asyncio.wait_for(task, 30)
