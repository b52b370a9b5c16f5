"""The fault suite's ledger: obligations (PUBACKed device messages) against what every sink
finally holds.

Owns the judgement of one scenario and imports nothing from the agent. From the publisher's
cartons it derives, per sink, the facts the rules *must* produce (every input of them was
acknowledged by the broker) and those they *may* produce (an input was sent but never
acknowledged, so the agent may not have seen it). Then, from every delivery a sink received
(repeats of an id included, in arrival order):

  lost            a required fact no event carries
  invented        an event no fact allows (e.g. an exception for a carton that closed)
  wrong           an event for a fact with wrong values (weight, carton id)
  dup deliveries  the same event id received again (before dedup by id)
  dup facts       one fact under a second event id (after dedup by id)
  out of order    a business key whose events arrived in another order than they happened
  re-sends        repeats of an id; "healthy" ones had no fault on that sink (nor an agent
                  restart) between the first delivery and the repeat: the agent sent again
                  something that had been delivered and acknowledged
  dead            a required fact the receiver rejected on purpose (a 422/400 it was told to
                  give): expected to be missing, and counted apart

The rules of the site (``faults.rig.site_yaml``): ``close`` correlates a scan and a weight
by tracking id into ``carton_closed`` (a no-read scan ends it with ``scan_no_read``; a window
without both gives ``carton_exception``); ``scanned`` maps every scan to ``carton_scanned``.

Devices other than the MQTT ones (a Modbus checkweigher, an OPC UA sorter: ``faults.devices``)
bring their own facts in a ``FactBook``: what they must produce (with the values each event
must carry), what they may produce, and which sinks take each type. They are judged with
the same counts, in the same table.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .publisher import Carton

ALL_TYPES = ("carton_scanned", "carton_closed", "scan_no_read", "carton_exception")
SINK_TYPES: dict[str, frozenset[str]] = {
    "wms": frozenset(ALL_TYPES),
    "erp": frozenset({"carton_closed"}),
    "bus": frozenset(ALL_TYPES),
}
# A repeat is justified by a fault window that overlaps [first delivery - slack, repeat].
SLACK_SECS = 1.0


@dataclass(frozen=True)
class Delivery:
    id: str
    type: str
    key: str
    time: float  # the event's own time (when it happened on the floor)
    arrival: float  # wall clock at the sink
    data: Mapping[str, Any]


@dataclass
class FactBook:
    """Facts of devices outside the publisher's: ``required`` maps (type, key) to the values
    its event must carry (numbers within ``tolerance``); ``allowed`` also holds what may come
    (every required fact is allowed); ``sinks`` maps each type to the sinks that take it."""

    required: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    allowed: set[tuple[str, str]] = field(default_factory=set)
    sinks: dict[str, frozenset[str]] = field(default_factory=dict)
    tolerance: float = 0.01

    def for_sink(self, sink: str) -> tuple[dict[tuple[str, str], dict[str, Any]],
                                           set[tuple[str, str]]]:
        takes = {t for t, ss in self.sinks.items() if sink in ss}
        required = {f: v for f, v in self.required.items() if f[0] in takes}
        allowed = {f for f in self.allowed | set(self.required) if f[0] in takes}
        return required, allowed

    def required_count(self, sink: str) -> int:
        return len(self.for_sink(sink)[0])


@dataclass(frozen=True)
class Window:
    """A fault that may justify a re-send to ``sinks`` (None: every sink)."""

    start: float
    end: float
    what: str
    sinks: frozenset[str] | None = None

    def covers(self, sink: str, first: float, repeat: float) -> bool:
        return (self.sinks is None or sink in self.sinks) and \
            self.start <= repeat and self.end >= first - SLACK_SECS


@dataclass
class SinkResult:
    sink: str
    required: int = 0
    unique: int = 0
    deliveries: int = 0
    lost: int = 0
    dead: int = 0
    invented: int = 0
    wrong: int = 0
    dup_deliveries: int = 0
    dup_facts: int = 0
    out_of_order: int = 0
    resends: int = 0
    healthy_resends: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 6:
            self.examples.append(f"{self.sink}: {text}")


def _ts(value: Any) -> float:
    if not isinstance(value, str):
        return math.nan
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.nan


def deliveries_from_receiver(doc: Mapping[str, Any]) -> list[Delivery]:
    """A stand-in receiver's ``/_received``: unique events and repeats, in arrival order."""
    both = sorted([*doc.get("events", []), *doc.get("redelivered", [])],
                  key=lambda e: e.get("_arrival", 0))
    return [_delivery(e, float(e.get("_received_at", 0.0))) for e in both]


def deliveries_from_bus(events: Iterable[Mapping[str, Any]],
                        arrivals: Iterable[float]) -> list[Delivery]:
    return [_delivery(e, a) for e, a in zip(events, arrivals, strict=True)]


def _delivery(e: Mapping[str, Any], arrival: float) -> Delivery:
    data = e.get("data") if isinstance(e.get("data"), Mapping) else {}
    key = str(data.get("tracking_id") or e.get("subject"))  # type: ignore[union-attr]
    return Delivery(str(e.get("id")), str(e.get("type")), key, _ts(e.get("time")), arrival,
                    data or {})


def expected(cartons: Iterable[Carton]) -> tuple[dict[tuple[str, str], Carton],
                                                  set[tuple[str, str]]]:
    """(required facts -> carton, allowed facts): facts are (type, tracking id)."""
    required: dict[tuple[str, str], Carton] = {}
    allowed: set[tuple[str, str]] = set()
    for c in cartons:
        k = c.tracking_id
        if c.scan_acked:
            required[("carton_scanned", k)] = c
        if c.scan_sent:
            allowed.add(("carton_scanned", k))
        if c.noread:
            if c.scan_acked:
                required[("scan_no_read", k)] = c
            if c.scan_sent:
                allowed.add(("scan_no_read", k))
            if not c.scan_acked and c.weight_sent:
                allowed.add(("carton_exception", k))  # the agent may never see the no-read
            continue
        if c.scan_acked and c.weight_acked:
            required[("carton_closed", k)] = c
        else:
            if c.scan_sent and c.weight_sent:
                allowed.add(("carton_closed", k))
            if c.scan_sent or c.weight_sent:
                allowed.add(("carton_exception", k))
    allowed.update(required)
    return required, allowed


def _wrong(d: Delivery, c: Carton | Mapping[str, Any], tolerance: float = 0.01) -> str | None:
    if isinstance(c, Mapping):  # a device fact from a FactBook: the values it must carry
        for k, want in c.items():
            got = d.data.get(k)
            if isinstance(want, (int, float)) and not isinstance(want, bool):
                if not isinstance(got, (int, float)) or abs(got - want) > tolerance:
                    return f"{k}={got!r}, want {want!r}"
            elif got != want:
                return f"{k}={got!r}, want {want!r}"
        return None
    if d.type == "carton_closed":
        w = d.data.get("weight_g")
        if not isinstance(w, (int, float)) or abs(w - c.weight_g) > 1e-6:
            return f"weight_g={w!r}, want {c.weight_g}"
        if d.data.get("carton_id") != c.barcode:
            return f"carton_id={d.data.get('carton_id')!r}, want {c.barcode!r}"
    return None


def account_sink(sink: str, deliveries: list[Delivery], cartons: list[Carton],
                 windows: list[Window], dead_ids: Iterable[str] = (),
                 book: FactBook | None = None) -> SinkResult:
    types = SINK_TYPES[sink]
    required_all, allowed_all = expected(cartons)
    required: dict[tuple[str, str], Carton | Mapping[str, Any]] = {
        f: c for f, c in required_all.items() if f[0] in types}
    allowed = {f for f in allowed_all if f[0] in types}
    tolerance = 0.01
    if book is not None:
        more_required, more_allowed = book.for_sink(sink)
        required.update(more_required)
        allowed |= more_allowed
        tolerance = book.tolerance
    dead = set(dead_ids)
    r = SinkResult(sink, required=len(required), deliveries=len(deliveries))

    first: dict[str, Delivery] = {}
    per_fact: dict[tuple[str, str], list[str]] = defaultdict(list)
    per_key: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        if d.id in first:
            r.dup_deliveries += 1
            r.resends += 1
            f0 = first[d.id]
            if not any(w.covers(sink, f0.arrival, d.arrival) for w in windows):
                r.healthy_resends += 1
                if r.healthy_resends <= 3:
                    r.note(f"re-sent {d.type} {d.key} {d.arrival - f0.arrival:.1f} s after its "
                           f"first delivery with no fault between")
            continue
        first[d.id] = d
        fact = (d.type, d.key)
        per_fact[fact].append(d.id)
        per_key[d.key].append(d)
        if fact not in allowed:
            r.invented += 1
            r.note(f"invented {d.type} {d.key}")
            continue
        c = required.get(fact)
        if c is not None and len(per_fact[fact]) == 1 and (why := _wrong(d, c, tolerance)):
            r.wrong += 1
            r.note(f"wrong {d.type} {d.key}: {why}")
    r.unique = len(first)
    for fact, ids in per_fact.items():
        if len(ids) > 1:
            r.dup_facts += len(ids) - 1
            r.note(f"{fact[0]} {fact[1]} under {len(ids)} ids")
    for fact, c in required.items():
        ids = per_fact.get(fact)
        if not ids:
            if _dead_fact(fact, c, dead):
                r.dead += 1
                continue
            r.lost += 1
            if r.lost <= 3:
                r.note(f"lost {fact[0]} {fact[1]}")
    for key, evs in per_key.items():
        times = [e.time for e in evs]
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            r.out_of_order += 1
            if r.out_of_order <= 2:
                r.note(f"out of order for {key}: {[e.type for e in evs]}")
    return r


def _dead_fact(fact: tuple[str, str], c: Any, dead: set[str]) -> bool:
    # Rejected ids are known by the receiver; a fact is dead when the receiver rejected an
    # event of that type and key (it records type and subject/key with each rejected id).
    return f"{fact[0]}|{fact[1]}" in dead


@dataclass
class LedgerResult:
    sinks: dict[str, SinkResult]

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.sinks.values())

    def lines(self) -> list[str]:
        cols = ("required", "unique", "lost", "dead", "invented", "wrong", "dup_deliveries",
                "dup_facts", "out_of_order", "resends", "healthy_resends")
        out = ["sink  " + " ".join(f"{c:>15}" for c in cols)]
        for s in self.sinks.values():
            out.append(f"{s.sink:5} " + " ".join(f"{getattr(s, c):>15}" for c in cols))
        for s in self.sinks.values():
            out += s.examples
        return out


def account(holdings: Mapping[str, list[Delivery]], cartons: list[Carton],
            windows: list[Window], dead: Mapping[str, Iterable[str]] | None = None,
            book: FactBook | None = None) -> LedgerResult:
    return LedgerResult({
        sink: account_sink(sink, ds, cartons, windows, (dead or {}).get(sink, ()), book)
        for sink, ds in holdings.items()
    })


def summary_counts(res: LedgerResult) -> Counter[str]:
    c: Counter[str] = Counter()
    for s in res.sinks.values():
        for name in ("lost", "invented", "wrong", "dup_facts", "out_of_order", "healthy_resends",
                     "dup_deliveries", "dead"):
            c[name] += getattr(s, name)
    return c
