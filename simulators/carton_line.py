"""Carton-closing station simulator: a barcode scanner and a checkweigher on MQTT.

Owns the seeded plan of cartons (the ground truth and the device messages that produce it)
and publishing that plan to a broker at a carton rate. It never imports `edge_agent`: it is
the yardstick the agent is measured against.

The plan is a pure function of its arguments. Each carton's randomness comes from
`Random(f"{seed}:{index}")`, so a plan starting at `start_index` equals the same slice of a
longer plan, and a `--forever` run can be resumed with the same cartons.

Timing model: a carton reaches the station every `1000 / rate` ms. Each device message has
an `offset_ms` after that arrival (scan at 0, weight 50-300 ms later; for a reordered carton
the weight at 0 and the scan 20-150 ms later; a duplicate 5-100 ms after its original).
Messages are published in due-time order, so messages of neighbouring cartons interleave as
they would on a fast line.

Timestamps and sequence numbers: a real device stamps `ts` and `seq` when it reads, so
`run_line` stamps them when it publishes (wall clock, UTC, ms) and counts `seq` per device
in publication order. Only these two fields vary between runs; everything else is fixed by
the seed. A duplicate repeats its original's bytes exactly (same `seq`, same `ts`), as a
device retrying a send would. For byte-exact fixtures without a broker, `render_plan`
stamps the same schedule from a fixed `start_time` instead of the wall clock.

Device clocks: each device stamps `ts` from its own clock, which is off the true time by an
offset and drifts (`DeviceClock`), as real PLC and scanner clocks do. By default both are a
little off and drifting (`REALISTIC_CLOCKS`, well within a second); `--clock DEVICE=SECS`
sets a device's offset (e.g. `--clock checkweigher=-10800` for a clock 3 h behind) and
`--ideal-clocks` makes both exact. `ts` has millisecond resolution, so at a few hundred
cartons a second several messages share one.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import logging
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from itertools import count as count_from
from itertools import islice, takewhile
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("simulators.carton_line")

WEIGHT_MIN_G = 200.0
WEIGHT_MAX_G = 25000.0
# Share of no-reads whose barcode is empty instead of "NOREAD": scanners differ.
EMPTY_NOREAD_SHARE = 0.25
# Bounded so a stalled broker stops the publisher instead of growing memory; well below
# the 65,535 packet ids paho can have outstanding.
MAX_UNACKED = 10_000
# Shortest sleep between publish batches: at high rates we publish whatever fell due in
# this window at once instead of sleeping per message.
BATCH_TICK_S = 0.005
# Longest sleep, so a stop request is seen promptly at low rates.
MAX_SLEEP_S = 0.05
# Largest batch, so a publisher that falls behind still prunes acks and applies backpressure.
MAX_BATCH = 1000
MAX_INFLIGHT = 20


class Outcome(StrEnum):
    """What happens to a carton at the station (mutually exclusive)."""

    NORMAL = "normal"
    NO_READ = "no_read"
    MISSING_WEIGHT = "missing_weight"
    MISSING_SCAN = "missing_scan"


class Device(StrEnum):
    SCANNER = "scanner"
    CHECKWEIGHER = "checkweigher"


@dataclass(frozen=True, slots=True)
class DeviceClock:
    """How far a device's clock is off the true time: ``offset_s`` now, plus ``drift_ppm``
    microseconds per second of run time."""

    offset_s: float = 0.0
    drift_ppm: float = 0.0


# A scanner a quarter second ahead and a checkweigher a little behind, both drifting: what
# NTP-less devices on a line look like after a few days (well within a second).
REALISTIC_CLOCKS: dict[Device, DeviceClock] = {
    Device.SCANNER: DeviceClock(offset_s=0.25, drift_ppm=40.0),
    Device.CHECKWEIGHER: DeviceClock(offset_s=-0.15, drift_ppm=-25.0),
}
IDEAL_CLOCKS: dict[Device, DeviceClock] = {d: DeviceClock() for d in Device}


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """One MQTT publication, without the `seq` and `ts` a device stamps when it sends."""

    device: Device
    topic: str
    tracking_id: str
    offset_ms: float
    # The JSON object after `"seq"` and `"ts"`, pre-serialized: `"tracking_id": ...}`.
    body: bytes
    duplicate: bool = False

    def render(self, seq: int, ts: str) -> bytes:
        """The payload bytes as the device sends them."""
        return b'{"seq": %d, "ts": "%s", %s' % (seq, ts.encode("ascii"), self.body)


@dataclass(frozen=True, slots=True)
class ExpectedEvent:
    """A business event a correct agent emits; `data` is a subset of the event's data."""

    type: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data}


@dataclass(frozen=True, slots=True)
class Carton:
    """Ground truth for one carton and the messages the devices publish about it."""

    index: int
    tracking_id: str
    carton_id: str
    weight_g: float
    station: str
    outcome: Outcome
    reordered: bool
    # In publication order, duplicates included.
    messages: tuple[DeviceMessage, ...]
    expected: tuple[ExpectedEvent, ...]

    def ground_truth(self) -> dict[str, Any]:
        return {
            "tracking_id": self.tracking_id,
            "carton_id": self.carton_id,
            "weight_g": self.weight_g,
            "station": self.station,
            "outcome": str(self.outcome),
            "reordered": self.reordered,
            "messages": len(self.messages),
            "expected": [e.to_json() for e in self.expected],
        }


def _check_fractions(**fractions: float) -> None:
    bad = [f"{k}={v}" for k, v in fractions.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"fractions must be within 0..1: {', '.join(bad)}")
    outcome_sum = (
        fractions["noread_frac"] + fractions["missing_weight_frac"] + fractions["missing_scan_frac"]
    )
    if outcome_sum > 1.0:
        raise ValueError(f"outcome fractions add up to {outcome_sum} > 1")


def _body(**fields: Any) -> bytes:
    # Drop the opening brace: `render` writes it together with seq and ts.
    return json.dumps(fields).encode("utf-8")[1:]


def _expected(
    outcome: Outcome, tracking_id: str, carton_id: str, weight_g: float, station: str
) -> tuple[ExpectedEvent, ...]:
    common = {"tracking_id": tracking_id, "station": station}
    if outcome is Outcome.NORMAL:
        data = {"carton_id": carton_id, "weight_g": weight_g, **common}
        return (ExpectedEvent("carton_closed", data),)
    if outcome is Outcome.MISSING_WEIGHT:
        data = {"reason": "no_weight", "carton_id": carton_id, **common}
        return (ExpectedEvent("carton_exception", data),)
    if outcome is Outcome.MISSING_SCAN:
        data = {"reason": "no_scan", "weight_g": weight_g, **common}
        return (ExpectedEvent("carton_exception", data),)
    return (ExpectedEvent("scan_no_read", common),)


def iter_cartons(
    *,
    seed: int,
    noread_frac: float = 0.0,
    missing_weight_frac: float = 0.0,
    missing_scan_frac: float = 0.0,
    dup_frac: float = 0.0,
    reorder_frac: float = 0.0,
    station: str = "CLOSE1",
    start_index: int = 0,
    base: str = "site/close1",
    scanner_id: str = "SCN1",
    cw_id: str = "CW1",
) -> Iterator[Carton]:
    """Endless plan of cartons from `start_index` on; see `plan_cartons`."""
    _check_fractions(
        noread_frac=noread_frac,
        missing_weight_frac=missing_weight_frac,
        missing_scan_frac=missing_scan_frac,
        dup_frac=dup_frac,
        reorder_frac=reorder_frac,
    )
    scan_topic = f"{base}/scanner/{scanner_id}/read"
    weight_topic = f"{base}/checkweigher/{cw_id}/weight"
    noread_until = noread_frac
    missing_weight_until = noread_until + missing_weight_frac
    missing_scan_until = missing_weight_until + missing_scan_frac
    for index in count_from(start_index):
        # Draw every value every time, in a fixed order, so changing one fraction does not
        # shift the other draws of the same carton.
        rng = random.Random(f"{seed}:{index}")
        u_outcome = rng.random()
        weight_g = round(rng.uniform(WEIGHT_MIN_G, WEIGHT_MAX_G), 1)
        empty_noread = rng.random() < EMPTY_NOREAD_SHARE
        u_reorder = rng.random()
        weight_delay_ms = round(rng.uniform(50.0, 300.0), 1)
        scan_delay_ms = round(rng.uniform(20.0, 150.0), 1)
        u_dups = (rng.random(), rng.random())
        dup_delays_ms = (round(rng.uniform(5.0, 100.0), 1), round(rng.uniform(5.0, 100.0), 1))

        if u_outcome < noread_until:
            outcome = Outcome.NO_READ
        elif u_outcome < missing_weight_until:
            outcome = Outcome.MISSING_WEIGHT
        elif u_outcome < missing_scan_until:
            outcome = Outcome.MISSING_SCAN
        else:
            outcome = Outcome.NORMAL
        has_scan = outcome is not Outcome.MISSING_SCAN
        has_weight = outcome is not Outcome.MISSING_WEIGHT
        reordered = has_scan and has_weight and u_reorder < reorder_frac

        tracking_id = f"T{index:07d}"
        carton_id = f"C{index:07d}"
        originals: list[DeviceMessage] = []
        if has_scan:
            barcode = (
                ("" if empty_noread else "NOREAD") if outcome is Outcome.NO_READ else carton_id
            )
            body = _body(tracking_id=tracking_id, barcode=barcode, symbology="code128")
            offset = scan_delay_ms if reordered else 0.0
            originals.append(DeviceMessage(Device.SCANNER, scan_topic, tracking_id, offset, body))
        if has_weight:
            body = _body(tracking_id=tracking_id, weight_g=weight_g, in_tolerance=True)
            offset = 0.0 if reordered else weight_delay_ms
            originals.append(
                DeviceMessage(Device.CHECKWEIGHER, weight_topic, tracking_id, offset, body)
            )
        messages = list(originals)
        for original, u_dup, dup_delay in zip(originals, u_dups, dup_delays_ms, strict=False):
            if u_dup < dup_frac:
                messages.append(
                    DeviceMessage(
                        original.device,
                        original.topic,
                        tracking_id,
                        original.offset_ms + dup_delay,
                        original.body,
                        duplicate=True,
                    )
                )
        # Stable sort: on a tie the original stays ahead of anything added after it.
        messages.sort(key=lambda m: m.offset_ms)
        yield Carton(
            index=index,
            tracking_id=tracking_id,
            carton_id=carton_id,
            weight_g=weight_g,
            station=station,
            outcome=outcome,
            reordered=reordered,
            messages=tuple(messages),
            expected=_expected(outcome, tracking_id, carton_id, weight_g, station),
        )


def plan_cartons(
    count: int,
    *,
    seed: int,
    noread_frac: float,
    missing_weight_frac: float,
    missing_scan_frac: float,
    dup_frac: float,
    reorder_frac: float,
    station: str = "CLOSE1",
    start_index: int = 0,
    base: str = "site/close1",
    scanner_id: str = "SCN1",
    cw_id: str = "CW1",
) -> list[Carton]:
    """The ground truth and device messages of `count` cartons; pure and seeded.

    Outcomes (no-read, missing weight, missing scan, normal) are exclusive and drawn per
    carton; `dup_frac` is per message; `reorder_frac` applies to cartons with both messages.
    """
    cartons = iter_cartons(
        seed=seed,
        noread_frac=noread_frac,
        missing_weight_frac=missing_weight_frac,
        missing_scan_frac=missing_scan_frac,
        dup_frac=dup_frac,
        reorder_frac=reorder_frac,
        station=station,
        start_index=start_index,
        base=base,
        scanner_id=scanner_id,
        cw_id=cw_id,
    )
    return list(islice(cartons, count))


class Scheduled(NamedTuple):
    due_ms: float
    carton: Carton
    message: DeviceMessage
    # True on the carton's final message: after it, the carton is fully published.
    carton_done: bool


def schedule(cartons: Iterable[Carton], *, interval_ms: float) -> Iterator[Scheduled]:
    """Messages in due-time order; carton k of the stream arrives at k * interval_ms.

    Streams with bounded memory (about 300 ms of cartons), so it works on an endless plan.
    """
    heap: list[tuple[float, int, Carton, DeviceMessage, bool]] = []
    tie = 0  # keeps heap order stable and never compares Cartons
    for k, carton in enumerate(cartons):
        arrival_ms = k * interval_ms
        # Offsets are >= 0, so nothing of this or later cartons is due before its arrival.
        while heap and heap[0][0] <= arrival_ms:
            due, _, c, m, done = heapq.heappop(heap)
            yield Scheduled(due, c, m, done)
        last = len(carton.messages) - 1
        for i, message in enumerate(carton.messages):
            heapq.heappush(heap, (arrival_ms + message.offset_ms, tie, carton, message, i == last))
            tie += 1
    while heap:
        due, _, c, m, done = heapq.heappop(heap)
        yield Scheduled(due, c, m, done)


def format_ts(epoch_s: float) -> str:
    """ISO 8601 UTC with milliseconds and Z, as the devices send it."""
    # Round once in whole milliseconds: splitting the float first turns .003 into .002.
    whole, ms = divmod(round(epoch_s * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


class _Stamper:
    """Stamps seq (per device, in send order) and ts; a duplicate reuses its original."""

    def __init__(self) -> None:
        self._seq: Counter[Device] = Counter()
        self._sent: dict[tuple[str, Device], bytes] = {}

    def payload(self, item: Scheduled, ts: str) -> bytes:
        message = item.message
        key = (message.tracking_id, message.device)
        if message.duplicate:
            payload = self._sent[key]
        else:
            self._seq[message.device] += 1
            payload = message.render(self._seq[message.device], ts)
            self._sent[key] = payload
        if item.carton_done:
            # Keeps memory bounded on endless runs: nothing of this carton follows.
            for device in Device:
                self._sent.pop((message.tracking_id, device), None)
        return payload


class Weigher(Protocol):
    """A checkweigher the line weighs on instead of publishing weights to MQTT (Modbus).

    `weigh` is called at each carton's planned weighing time, in due order; it must not block
    for long. `drain` returns once every weighing handed over has been performed.
    """

    def weigh(self, tracking_id: str, weight_g: float, in_tolerance: bool) -> None: ...

    def reading(self, weight_g: float) -> float:
        """The weight the device reports for `weight_g` (its resolution, e.g. float32)."""
        ...

    def drain(self, timeout_s: float) -> bool: ...


class Publication(NamedTuple):
    due_ms: float
    topic: str
    payload: bytes
    tracking_id: str
    duplicate: bool


def render_plan(
    cartons: Iterable[Carton], *, start_time: datetime, interval_ms: float = 100.0
) -> list[Publication]:
    """Byte-exact messages for a plan, with device time start_time + due (no broker)."""
    origin_s = start_time.timestamp()
    stamper = _Stamper()
    out = []
    for item in schedule(cartons, interval_ms=interval_ms):
        ts = format_ts(origin_s + item.due_ms / 1000.0)
        payload = stamper.payload(item, ts)
        out.append(
            Publication(
                item.due_ms,
                item.message.topic,
                payload,
                item.carton.tracking_id,
                item.message.duplicate,
            )
        )
    return out


class _WallClockTs:
    """Wall-clock ts strings per device clock, formatting at most once per millisecond."""

    def __init__(self, clocks: dict[Device, DeviceClock] | None = None) -> None:
        self._clocks = clocks or IDEAL_CLOCKS
        self._start = time.time()
        self._ms: dict[Device, int] = {}
        self._text: dict[Device, str] = {}

    def now(self, device: Device = Device.SCANNER) -> str:
        t = time.time()
        c = self._clocks.get(device)
        if c is not None:
            t += c.offset_s + (t - self._start) * c.drift_ppm * 1e-6
        ms = int(t * 1000)
        if ms != self._ms.get(device):
            self._ms[device] = ms
            self._text[device] = format_ts(ms / 1000.0)
        return self._text[device]


@dataclass
class RunSummary:
    cartons: int = 0
    messages: int = 0
    duplicates: int = 0
    reordered: int = 0
    # Weights handed to a `Weigher` instead of published (counted in `messages` too).
    weighings: int = 0
    # Publishes without a PUBACK when the run ended, and PUBACKs with a failure code.
    unacked: int = 0
    rejected: int = 0
    elapsed_s: float = 0.0
    # Worst delay of a publish behind its due time: small means the rate was sustained.
    max_lag_ms: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    expected_types: Counter[str] = field(default_factory=Counter)

    @property
    def carton_rate(self) -> float:
        return self.cartons / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def message_rate(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "cartons": self.cartons,
            "messages": self.messages,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "weighings": self.weighings,
            "unacked": self.unacked,
            "rejected": self.rejected,
            "elapsed_s": round(self.elapsed_s, 3),
            "max_lag_ms": round(self.max_lag_ms, 1),
            "carton_rate_per_s": round(self.carton_rate, 1),
            "message_rate_per_s": round(self.message_rate, 1),
            "outcomes": dict(self.outcomes),
            "expected_types": dict(self.expected_types),
        }

    def line(self) -> str:
        return (
            f"published cartons={self.cartons} messages={self.messages} "
            f"duplicates={self.duplicates} reordered={self.reordered} "
            f"weighings={self.weighings} unacked={self.unacked} "
            f"rejected={self.rejected} "
            f"elapsed_s={self.elapsed_s:.2f} max_lag_ms={self.max_lag_ms:.0f} "
            f"cartons_per_s={self.carton_rate:.0f} msgs_per_s={self.message_rate:.0f} "
            f"outcomes={dict(self.outcomes)}"
        )


class _Acks:
    """Counts the broker's PUBACKs, from paho's network thread.

    Counted by callback rather than through MQTTMessageInfo, because an info whose publish
    happened while disconnected keeps rc=NO_CONN and raises in wait_for_publish even after
    paho resends it on reconnect and the broker acknowledges it.
    """

    def __init__(self) -> None:
        self.acked = 0
        self.rejected = 0
        self._changed = threading.Condition()

    def on_publish(
        self, _client: Any, _userdata: Any, _mid: int, reason: Any, _properties: Any
    ) -> None:
        with self._changed:
            if reason.is_failure:
                self.rejected += 1
            else:
                self.acked += 1
            self._changed.notify_all()

    def wait(self, sent: int, *, at_most_pending: int, timeout_s: float) -> bool:
        """Wait until at most `at_most_pending` of `sent` publishes lack an answer."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sent - self.acked - self.rejected <= at_most_pending, timeout_s
            )


def _connect(
    host: str,
    port: int,
    protocol: Literal["5", "3.1.1"],
    client_id: str,
    timeout_s: float,
    acks: _Acks,
) -> mqtt.Client:
    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
    # paho does not honour the broker's MQTT 5 Receive Maximum and cannot change this once
    # connected; 20 is mosquitto's default and measured no slower than larger windows.
    client.max_inflight_messages_set(MAX_INFLIGHT)
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(
        _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        result["reason"] = reason
        connected.set()

    client.on_connect = on_connect
    client.on_publish = acks.on_publish
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not connected.wait(timeout_s) or result["reason"].is_failure:
        client.loop_stop()
        raise ConnectionError(f"MQTT connect to {host}:{port} failed: {result.get('reason')}")
    return client


def run_line(
    host: str,
    port: int,
    *,
    count: int | None,
    rate_per_s: float,
    seed: int,
    noread_frac: float = 0.0,
    missing_weight_frac: float = 0.0,
    missing_scan_frac: float = 0.0,
    dup_frac: float = 0.0,
    reorder_frac: float = 0.0,
    station: str = "CLOSE1",
    start_index: int = 0,
    base: str = "site/close1",
    scanner_id: str = "SCN1",
    cw_id: str = "CW1",
    protocol: Literal["5", "3.1.1"] = "5",
    client_id: str | None = None,
    ground_truth_path: str | Path | None = None,
    ack_timeout_secs: float = 30.0,
    connect_timeout_secs: float = 10.0,
    stop: threading.Event | None = None,
    weigher: Weigher | None = None,
    clocks: dict[Device, DeviceClock] | None = None,
) -> RunSummary:
    """Publish `count` cartons (None: until `stop` is set) at `rate_per_s`; blocks.

    With a `weigher` (a Modbus checkweigher), each carton's weight is not published but
    weighed on it at the planned time; a duplicate weight message does not apply (a weighing
    happens once), so it is dropped. The run ends after the weigher has drained.

    Returns after every QoS 1 publish is acknowledged by the broker or `ack_timeout_secs`
    has passed since the last publish (then `unacked` > 0). While more than MAX_UNACKED
    publishes lack an answer, publishing pauses: a broker outage stalls the line.

    With a count, the ground truth is written at the end as one JSON object; without, one
    JSON line per carton is appended as soon as its last message is handed to the client,
    so a stopped demo can still account for every carton. On `stop`, no new carton starts,
    and cartons already started are finished on schedule: the ground truth never lists a
    half-published carton.
    """
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    stop = stop or threading.Event()
    planned = iter_cartons(
        seed=seed,
        noread_frac=noread_frac,
        missing_weight_frac=missing_weight_frac,
        missing_scan_frac=missing_scan_frac,
        dup_frac=dup_frac,
        reorder_frac=reorder_frac,
        station=station,
        start_index=start_index,
        base=base,
        scanner_id=scanner_id,
        cw_id=cw_id,
    )
    cartons = islice(planned, count) if count is not None else planned
    cartons = takewhile(lambda _c: not stop.is_set(), cartons)

    acks = _Acks()
    client = _connect(
        host, port, protocol, client_id or f"carton-line-{station}", connect_timeout_secs, acks
    )
    summary = RunSummary()
    published = 0  # MQTT publishes, each due a PUBACK
    done_cartons: list[Carton] = []
    lines: IO[str] | None = None
    if ground_truth_path is not None and count is None:
        lines = open(ground_truth_path, "a", encoding="utf-8")
    try:
        stamper = _Stamper()
        clock = _WallClockTs(REALISTIC_CLOCKS if clocks is None else clocks)
        # What the devices sent while the broker was away, in order: handed to the client
        # only once everything handed before is acknowledged (paho resends its in-flight
        # messages at CONNACK, but a publish racing the reconnect goes out ahead of them).
        backlog: collections.deque[tuple[str, bytes]] = collections.deque()

        def hand_over(topic: str, payload: bytes) -> None:
            nonlocal published
            info = client.publish(topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
            published += 1

        def flush() -> None:
            if backlog and client.is_connected() and acks.wait(
                    published, at_most_pending=0, timeout_s=0):
                while backlog:
                    hand_over(*backlog.popleft())

        items = schedule(cartons, interval_ms=1000.0 / rate_per_s)
        nxt = next(items, None)
        t0 = time.monotonic()
        while nxt is not None:
            flush()
            now_ms = (time.monotonic() - t0) * 1000.0
            if nxt.due_ms > now_ms:
                time.sleep(min(max((nxt.due_ms - now_ms) / 1000.0, BATCH_TICK_S), MAX_SLEEP_S))
                continue
            summary.max_lag_ms = max(summary.max_lag_ms, now_ms - nxt.due_ms)
            batch = 0
            while nxt is not None and nxt.due_ms <= now_ms and batch < MAX_BATCH:
                batch += 1
                message = nxt.message
                if weigher is not None and message.device is Device.CHECKWEIGHER:
                    if not message.duplicate:
                        c = nxt.carton
                        weigher.weigh(c.tracking_id, c.weight_g, True)
                        summary.messages += 1
                        summary.weighings += 1
                else:
                    ts = clock.now(message.device)
                    payload = stamper.payload(nxt, ts)
                    if backlog or not client.is_connected():
                        backlog.append((message.topic, payload))
                    else:
                        hand_over(message.topic, payload)
                    summary.messages += 1
                    summary.duplicates += message.duplicate
                if nxt.carton_done:
                    done = nxt.carton if weigher is None else as_weighed(nxt.carton, weigher)
                    _account(done, summary)
                    if lines is not None:
                        lines.write(json.dumps(done.ground_truth()) + "\n")
                    elif ground_truth_path is not None:
                        done_cartons.append(done)
                nxt = next(items, None)
            if lines is not None:
                lines.flush()
            # Backpressure: a slow or absent broker stalls the line (as a device buffer
            # would fill) instead of growing memory; a stop request still ends the wait.
            # Messages held while the broker was away count against the same buffer.
            while not acks.wait(
                published, at_most_pending=max(MAX_UNACKED - len(backlog), 0),
                timeout_s=MAX_SLEEP_S,
            ):
                if stop.is_set():
                    break
                flush()
        deadline = time.monotonic() + ack_timeout_secs
        while backlog and time.monotonic() < deadline:
            flush()
            time.sleep(MAX_SLEEP_S)
        summary.elapsed_s = time.monotonic() - t0
        if weigher is not None and not weigher.drain(ack_timeout_secs):
            raise RuntimeError(f"the checkweigher did not finish in {ack_timeout_secs} s")
        acks.wait(published, at_most_pending=0, timeout_s=ack_timeout_secs)
        summary.rejected = acks.rejected
        summary.unacked = published - acks.acked - acks.rejected
    finally:
        if lines is not None:
            lines.close()
        client.disconnect()
        client.loop_stop()
    if ground_truth_path is not None and count is not None:
        done_cartons.sort(key=lambda c: c.index)
        document = {
            "summary": summary.to_json(),
            "cartons": [c.ground_truth() for c in done_cartons],
        }
        Path(ground_truth_path).write_text(json.dumps(document), encoding="utf-8")
    log.info("%s", summary.line())
    return summary


def as_weighed(carton: Carton, weigher: Weigher) -> Carton:
    """The carton as `weigher` reports it: its weight at the device's resolution."""
    weight_g = weigher.reading(carton.weight_g)
    if weight_g == carton.weight_g:
        return carton
    expected = _expected(
        carton.outcome, carton.tracking_id, carton.carton_id, weight_g, carton.station
    )
    return replace(carton, weight_g=weight_g, expected=expected)


def _account(carton: Carton, summary: RunSummary) -> None:
    summary.cartons += 1
    summary.reordered += carton.reordered
    summary.outcomes[str(carton.outcome)] += 1
    for event in carton.expected:
        summary.expected_types[event.type] += 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulators.carton_line",
        description="Publish a seeded carton-closing line (scanner + checkweigher) to MQTT.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--count", type=int, default=1000, help="cartons to publish")
    runs.add_argument(
        "--forever",
        action="store_true",
        help="publish until SIGINT/SIGTERM; ground truth appended as JSON lines",
    )
    p.add_argument("--rate", type=float, default=200.0, help="cartons per second")
    add_plan_arguments(p)
    p.add_argument("--cw-id", default="CW1")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--client-id", default=None)
    p.add_argument("--ack-timeout-secs", type=float, default=30.0)
    p.add_argument("--ground-truth", default=None, help="path of the ground-truth file")
    add_clock_arguments(p)
    return p.parse_args(argv)


def add_clock_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ideal-clocks", action="store_true",
                   help="devices stamp exact time (default: a little off, drifting)")
    p.add_argument("--clock", action="append", default=[], metavar="DEVICE=SECS",
                   help="a device's clock offset (scanner or checkweigher), e.g. "
                        "checkweigher=-10800 for 3 h behind; repeatable")


def clocks_from_args(args: argparse.Namespace) -> dict[Device, DeviceClock]:
    clocks = dict(IDEAL_CLOCKS if args.ideal_clocks else REALISTIC_CLOCKS)
    for item in args.clock:
        name, _, secs = item.partition("=")
        device = Device(name)
        clocks[device] = DeviceClock(float(secs), clocks[device].drift_ppm)
    return clocks


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The carton plan's options, shared by every line simulator's command line."""
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--noread-frac", type=float, default=0.02)
    p.add_argument("--missing-weight-frac", type=float, default=0.02)
    p.add_argument("--missing-scan-frac", type=float, default=0.01)
    p.add_argument("--dup-frac", type=float, default=0.05)
    p.add_argument("--reorder-frac", type=float, default=0.05)
    p.add_argument("--station", default="CLOSE1")
    p.add_argument("--start-index", type=int, default=0)
    p.add_argument("--base", default="site/close1", help="topic prefix")
    p.add_argument("--scanner-id", default="SCN1")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    summary = run_line(
        args.host,
        args.port,
        count=None if args.forever else args.count,
        rate_per_s=args.rate,
        seed=args.seed,
        noread_frac=args.noread_frac,
        missing_weight_frac=args.missing_weight_frac,
        missing_scan_frac=args.missing_scan_frac,
        dup_frac=args.dup_frac,
        reorder_frac=args.reorder_frac,
        station=args.station,
        start_index=args.start_index,
        base=args.base,
        scanner_id=args.scanner_id,
        cw_id=args.cw_id,
        protocol=args.protocol,
        client_id=args.client_id,
        ground_truth_path=args.ground_truth,
        ack_timeout_secs=args.ack_timeout_secs,
        stop=stop,
        clocks=clocks_from_args(args),
    )
    return 1 if summary.unacked or summary.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
