"""The fault suite's own devices: a scanner and a checkweigher publishing at QoS 1, with a
PUBACK ledger.

Owns the device side of a scenario and nothing else. Every message the broker acknowledged
(PUBACK) is an *obligation*: from that moment the broker, then the agent, must not lose it.
A message handed to paho but never acknowledged is only *sent*: the agent may or may not see
it. The ledger (``faults.ledger``) derives what the rules must produce from these records.

Each carton is a scan (``seq``, ``ts``, tracking id, barcode; a few are no-reads) followed a
little later by its weighing, from one MQTT client, so the broker keeps their order. A few
messages are published twice with the same bytes (a device retrying a send). Device clocks
can be set off and made to jump (``clock_offset``), without touching the machine's clock.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCANNER = "SCN1"
CHECKWEIGHER = "CW1"
SCAN_TOPIC = "site/faults/scanner/SCN1/read"
WEIGHT_TOPIC = "site/faults/checkweigher/CW1/weight"
# Bounded so a stalled broker stops the publisher instead of growing memory.
MAX_OUTSTANDING = 5000


def iso_ms(t: float) -> str:
    whole = int(t)
    ms = int(round((t - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


@dataclass
class Carton:
    """One carton as the devices reported it; filled in as its messages are sent and acked."""

    tracking_id: str
    barcode: str
    weight_g: float
    noread: bool
    scan_sent: bool = False
    weight_sent: bool = False
    scan_acked: bool = False
    weight_acked: bool = False
    scan_time: float = 0.0  # device time stamped in the scan (after any clock offset)


@dataclass
class _Msg:
    carton: Carton
    kind: str  # "scan" | "weight"
    sent_at: float


@dataclass
class PublisherStats:
    sent: int = 0
    acked: int = 0
    device_dups: int = 0
    waits_disconnected: int = 0
    waits_outstanding: int = 0
    ack_times: list[float] = field(default_factory=list)


class DevicePublisher:
    """Publishes cartons at ``rate`` per second from a thread until ``stop()``.

    ``clock_offset`` (device -> seconds, a callable of run time) lets a scenario skew or jump
    a device's clock. ``paused`` stops the line without stopping the thread.
    """

    def __init__(self, host: str, port: int, *, tag: str, rate: float, seed: int = 1,
                 noread_frac: float = 0.02, dup_frac: float = 0.01, weight_lag_s: float = 0.08,
                 clock_offset: Callable[[str, float], float] | None = None):
        self.tag = tag
        self.rate = rate
        self.rng = random.Random(seed)
        self.noread_frac = noread_frac
        self.dup_frac = dup_frac
        self.weight_lag_s = weight_lag_s
        self.clock_offset = clock_offset or (lambda _device, _t: 0.0)
        self.cartons: list[Carton] = []
        self.stats = PublisherStats()
        self._seq = {SCANNER: 0, CHECKWEIGHER: 0}
        self._pending: dict[int, _Msg] = {}
        self._acked_mids: collections.deque[int] = collections.deque()
        self._stop = threading.Event()
        self.paused = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        self.error: BaseException | None = None

        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fault-devices-{tag}",
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = lambda *_a: self._connected.set()
        self.client.on_disconnect = lambda *_a: self._connected.clear()
        # Called from paho's thread: only hand the mid over (a deque append is atomic).
        self.client.on_publish = lambda _c, _u, mid, *_a: self._acked_mids.append(mid)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._connected.wait(15):
            self.client.loop_stop()
            raise TimeoutError("device publisher did not connect to the broker")

    # --- the line ------------------------------------------------------------------------

    def start(self) -> DevicePublisher:
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._run_guarded, name="fault-devices",
                                        daemon=True)
        self._thread.start()
        return self

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by stop(), never swallowed
            self.error = exc

    def _device_time(self, device: str, now: float) -> float:
        return now + self.clock_offset(device, now - self.t0)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        lag = max(1, round(self.weight_lag_s * self.rate))
        waiting: collections.deque[Carton] = collections.deque()  # scanned, not yet weighed
        i = 0
        next_due = time.monotonic()
        while not self._stop.is_set():
            self._resolve()
            if self.paused.is_set() or not self._connected.is_set():
                if not self.paused.is_set():
                    self.stats.waits_disconnected += 1
                self._stop.wait(0.02)
                next_due = time.monotonic()
                continue
            if len(self._pending) >= MAX_OUTSTANDING:
                self.stats.waits_outstanding += 1
                self._stop.wait(0.01)
                next_due = time.monotonic()
                continue
            now_m = time.monotonic()
            if now_m < next_due:
                self._stop.wait(min(next_due - now_m, 0.05))
                continue
            # Whatever fell due since the last pass, at most a tenth of a second of cartons.
            due = min(int((now_m - next_due) / interval) + 1, max(1, int(self.rate / 10)))
            for _ in range(due):
                c = self._new_carton(i)
                i += 1
                self._publish(c, "scan")
                waiting.append(c)
                if len(waiting) > lag:
                    self._publish(waiting.popleft(), "weight")
            next_due += due * interval
        while waiting:  # every scanned carton is weighed before the line stops
            self._publish(waiting.popleft(), "weight")
        self._resolve()

    def _new_carton(self, i: int) -> Carton:
        noread = self.rng.random() < self.noread_frac
        c = Carton(
            tracking_id=f"T{self.tag}-{i:07d}",
            barcode="NOREAD" if noread else f"C{self.tag}-{i:07d}",
            weight_g=round(self.rng.uniform(200.0, 25000.0), 1),
            noread=noread,
        )
        self.cartons.append(c)
        return c

    def _publish(self, c: Carton, kind: str) -> None:
        now = time.time()
        if kind == "scan":
            device, topic = SCANNER, SCAN_TOPIC
            t = self._device_time(device, now)
            c.scan_time = t
            body = {"tracking_id": c.tracking_id, "barcode": c.barcode, "symbology": "code128"}
        else:
            device, topic = CHECKWEIGHER, WEIGHT_TOPIC
            t = self._device_time(device, now)
            body = {"tracking_id": c.tracking_id, "weight_g": c.weight_g, "in_tolerance": True}
        self._seq[device] += 1
        payload = json.dumps({"seq": self._seq[device], "ts": iso_ms(t), **body}).encode()
        copies = 2 if self.rng.random() < self.dup_frac else 1
        self.stats.device_dups += copies - 1
        for _ in range(copies):
            info = self.client.publish(topic, payload, qos=1)
            self._pending[info.mid] = _Msg(c, kind, now)
            self.stats.sent += 1
        if kind == "scan":
            c.scan_sent = True
        else:
            c.weight_sent = True

    def _resolve(self) -> None:
        """Move every acknowledged message into the obligations."""
        while self._acked_mids:
            mid = self._acked_mids.popleft()
            m = self._pending.pop(mid, None)
            if m is None:
                continue
            self.stats.acked += 1
            if m.kind == "scan":
                m.carton.scan_acked = True
            else:
                m.carton.weight_acked = True

    # --- control -------------------------------------------------------------------------

    def outstanding(self) -> int:
        return len(self._pending) - len(self._acked_mids)

    def acked_cartons(self) -> int:
        return sum(1 for c in self.cartons if c.scan_acked)

    def stop(self, drain_timeout_secs: float = 60) -> None:
        """Stop the line, then wait (bounded) until the broker acknowledged what was sent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        deadline = time.monotonic() + drain_timeout_secs
        while time.monotonic() < deadline:
            self._resolve()
            if not self._pending:
                break
            time.sleep(0.05)
        self._resolve()
        if self.error is not None:
            raise RuntimeError("device publisher failed") from self.error

    def close(self) -> None:
        self._stop.set()
        self.client.loop_stop()
        self.client.disconnect()
