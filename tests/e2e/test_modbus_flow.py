"""Modbus devices through the whole agent: a Modbus checkweigher feeds the spine's
carton_closed rule (unchanged) together with the MQTT scanner; pick-to-light presses become
pick_confirmed / pick_short; a conveyor jam becomes equipment_fault. Real TCP everywhere:
pymodbus simulators (realistic: flags cleared late after the acknowledge, presses in
between, a device restart mid-flow), mosquitto, HTTP receivers. Every press is exactly one
business event, matched to the simulator's ground truth by position and key sequence."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
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
      data: {{location: "${{pick.location}}", position: "${{pick.position}}", qty: "${{pick.qty_picked}}", zone: PTL1, press_seq: "${{pick.press_seq}}"}}
  - name: picks-short
    kind: map
    inputs:
      pick: {{device: PTL1, event: [short_1, short_2, short_3, short_4]}}
    emit:
      type: pick_short
      subject: ${{pick.location}}
      data: {{location: "${{pick.location}}", position: "${{pick.position}}", qty_picked: "${{pick.qty_picked}}", qty_expected: "${{pick.display_qty}}", press_seq: "${{pick.press_seq}}"}}
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


def retained(port: int, topic: str, done, secs: float = 15.0) -> dict[str, dict]:
    """What a subscriber arriving now gets: the retained status of every device (and its
    updates), once `done(got)` holds or after `secs`."""
    got: dict[str, dict] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic.split("/")[-2], json.loads(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline and not done(dict(got)):
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return got


async def polled(agent: Agent, n: int = 3) -> bool:
    """Every Modbus device polled `n` more times (the first polls learn counters and flags)."""
    start = {c.name: c.polls for c in agent.connectors if hasattr(c, "polls")}
    return await wait_for(lambda: all(c.polls >= start[c.name] + n for c in agent.connectors
                                      if c.name in start))


async def picker(ptl: PickToLightSim, presses: int, seed: int) -> None:
    """A picker at four positions: presses as soon as the module takes one (often while
    the last flag is still shown), one in ten a SHORT."""
    rng = random.Random(seed)
    for _ in range(presses):
        n, qty = rng.randint(1, 4), rng.randint(1, 6)
        ptl.set(f"display_qty_{n}", qty)
        press = ptl.short if rng.random() < 0.1 else ptl.confirm
        assert await wait_for(lambda n=n, qty=qty, press=press: press(n, qty), 15)
        await asyncio.sleep(rng.uniform(0, 0.08))  # the picker's pace (not synchronisation)


def match_presses(ptl: PickToLightSim, events: list[dict]) -> None:
    """One business event per press, one press per business event: by (position, key
    sequence), with the press's kind and quantity."""
    picks = [e for e in events if e["type"] in ("pick_confirmed", "pick_short")]
    by_press = Counter((e["data"]["position"], e["data"]["press_seq"]) for e in picks)
    dup = {k: n for k, n in by_press.items() if n > 1}
    assert not dup, f"the same press under several ids: {dup}"
    truth = {(p.position, p.seq): p for p in ptl.presses}
    assert set(by_press) == set(truth), (sorted(set(truth) - set(by_press)),
                                         sorted(set(by_press) - set(truth)))
    for e in picks:
        p = truth[(e["data"]["position"], e["data"]["press_seq"])]
        if e["type"] == "pick_confirmed":
            assert (p.kind, p.qty) == ("confirm", e["data"]["qty"]), (p, e["data"])
        else:
            assert (p.kind, p.qty) == ("short", e["data"]["qty_picked"]), (p, e["data"])
    assert len(picks) == len(ptl.presses)


async def test_modbus_devices_make_business_events_end_to_end(broker, tmp_path: Path):
    async with CheckweigherSim() as cw, PickToLightSim(seed=5) as ptl, ConveyorSim() as conv, \
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
            assert await polled(agent)
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
            assert await polled(agent)  # the flags, shown a while after the ack, read again
            assert len(wms.events) == 4  # one business event per fact, nothing twice

            # A picker at full pace, the zone controller restarting mid-flow (registers
            # kept), the belt jamming again: every press and every jam exactly once.
            conv.clear()
            work = asyncio.create_task(picker(ptl, 40, seed=7))
            assert await wait_for(lambda: len(ptl.presses) >= 20, 30)
            await ptl.restart(0.3)
            assert await wait_for(lambda: conv.get("jam") is False and agent.status()[
                "connectors"]["modbus:CONV3"]["state"] == "online")
            assert await polled(agent)
            conv.jam(1)
            await asyncio.wait_for(work, 60)
            assert await wait_for(lambda: all(p.acked for p in ptl.presses), 30)
            assert await polled(agent, 5)
            assert await wait_for(lambda: len(got("pick_confirmed")) + len(got("pick_short"))
                                  >= len(ptl.presses), 30)
            assert await wait_for(lambda: len(got("equipment_fault")) >= 2)
            assert await polled(agent, 5)
            match_presses(ptl, wms.events)
            assert len(got("equipment_fault")) == len(conv.faults_log) == 2
            assert ptl.restarts == 1 and ptl.counts()["confirm"] + ptl.counts()["short"] == 42
            st = agent.status()
            assert all(c["state"] == "online" for c in st["connectors"].values())
            # Each device's status is retained on MQTT; a device that stops answering shows.
            conv.faults.blackhole = True
            assert await wait_for(lambda: agent.status()["connectors"]["modbus:CONV3"]["state"]
                                  in ("degraded", "offline"))
            status = await asyncio.to_thread(
                retained, broker.port, "edge/modbus-e2e/devices/+/status",
                lambda g: set(g) == {"SCN1", "CW2", "PTL1", "CONV3"}
                and g["CONV3"]["state"] in ("degraded", "offline"))
            assert set(status) == {"SCN1", "CW2", "PTL1", "CONV3"}
            assert status["CW2"]["state"] == "online"
            assert status["CONV3"]["state"] in ("degraded", "offline")
            assert "no answer" in status["CONV3"]["last_error"]
        finally:
            agent.stop()
            await asyncio.wait_for(task, 30)
