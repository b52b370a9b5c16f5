"""The ledger: what each sink received, fact by fact, against the simulators' ground truth.

One ledger for the end-to-end tests, the demo summary and the benchmarks. It cannot be
fooled by counting unique ids: every delivery is looked at, repeats included.

- The ground truth is a list of `Fact`s: an event type, the business key the event is about
  (tracking id, location, equipment), the data values it must carry (a subset of the
  event's data; numbers within a tolerance), and where facts of one type and key differ,
  a `detail` (a sort exception's reason) or a `seq` (a press sequence the event carries).
- What a sink received is its list of CloudEvents in arrival order, **not deduplicated**.
- `account` classifies, per sink and per event type:

  delivered        an event that matches an expected fact (first id for it)
  wrong            an event for an expected fact, with wrong values
  missing          an expected fact no event matched
  invented         an event with no fact behind it: an exception about something that did
                   happen (a carton_exception for a carton that closed), a type the sink
                   does not subscribe to, or a key nobody simulated
  dup deliveries   the same event id again (allowed by at least once; shown, not a failure)
  dup facts        one fact (a press, a carton, a divert) delivered under a second id

  precision = delivered / distinct ids received, recall = delivered / expected.
  "Exactly once" holds when missing, wrong, invented and dup facts are all 0 everywhere.

Keys come from `KEYS` (event type -> function of the event); an unknown type is keyed by
its subject. Ground truth adapters: `carton_facts` (simulators.carton_line),
`sorter_facts` (simulators.opcua_sorter), `press_facts` and `fault_facts` (Modbus
pick-to-light presses and conveyor stops). `reconcile`, `sorter_expected` and
`sorter_received` are the older carton and sorter views, built on the same ledger.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CloudEvent = Mapping[str, Any]
# event -> (key, detail, seq): the business key, what tells facts of one key apart, and a
# sequence the event carries (or None).
KeyFn = Callable[[CloudEvent], tuple[str, str, Any]]

EXCEPTION_TYPES = frozenset({"carton_exception", "sort_exception", "scan_no_read"})
DEFAULT_TOLERANCE = 1e-6
CATEGORIES = ("delivered", "wrong", "missing", "invented", "dup_deliveries", "dup_facts")


@dataclass(frozen=True)
class Fact:
    """One thing that happened, as a sink must hear about it."""

    type: str
    key: str
    data: Mapping[str, Any] = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE  # absolute, for numbers
    detail: str = ""
    seq: Any = None

    def __hash__(self) -> int:
        return hash((self.type, self.key, self.detail, self.seq))


def _data(ev: CloudEvent) -> Mapping[str, Any]:
    d = ev.get("data")
    return d if isinstance(d, Mapping) else {}


def _tracking(ev: CloudEvent) -> tuple[str, str, Any]:
    d = _data(ev)
    return str(d.get("tracking_id") or ev.get("subject")), "", None


def _sort_exception(ev: CloudEvent) -> tuple[str, str, Any]:
    return _tracking(ev)[0], str(_data(ev).get("reason")), None


def _press(ev: CloudEvent) -> tuple[str, str, Any]:
    d = _data(ev)
    # A press sequence from the device, when the profile has one; else presses are counted.
    return str(d.get("location") or ev.get("subject")), "", d.get("press_seq")


def _equipment(ev: CloudEvent) -> tuple[str, str, Any]:
    d = _data(ev)
    return str(d.get("equipment") or ev.get("subject")), "", d.get("fault_seq")


def _subject(ev: CloudEvent) -> tuple[str, str, Any]:
    return str(ev.get("subject")), "", None


KEYS: dict[str, KeyFn] = {
    "carton_closed": _tracking,
    "carton_exception": _tracking,
    "scan_no_read": _tracking,
    "carton_sorted": _tracking,  # a carton's final divert: once per carton
    "sort_exception": _sort_exception,  # per reason
    "pick_confirmed": _press,
    "pick_short": _press,
    "equipment_fault": _equipment,
}


def event_key(ev: CloudEvent, keys: Mapping[str, KeyFn] | None = None) -> tuple[str, str, Any]:
    fn = (keys or KEYS).get(str(ev.get("type")), None) or KEYS.get(str(ev.get("type")), _subject)
    return fn(ev)


def values_match(fact: Fact, data: Mapping[str, Any]) -> bool:
    return not _mismatches(fact, data)


def _same(want: Any, got: Any, tol: float) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(want, got, rel_tol=0.0, abs_tol=tol)
    return bool(want == got)


def _mismatches(fact: Fact, data: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}={data.get(k)!r}, want {v!r}"
        for k, v in fact.data.items()
        if not _same(v, data.get(k), fact.tolerance)
    ]


@dataclass
class Row:
    """One sink's counts for one event type (or a total)."""

    sink: str
    type: str
    expected: int = 0
    received: int = 0  # distinct ids
    delivered: int = 0
    wrong: int = 0
    missing: int = 0
    invented: int = 0
    dup_deliveries: int = 0
    dup_facts: int = 0

    @property
    def precision(self) -> float | None:
        return self.delivered / self.received if self.received else None

    @property
    def recall(self) -> float | None:
        return self.delivered / self.expected if self.expected else None

    @property
    def exact(self) -> bool:
        return not (self.missing or self.wrong or self.invented or self.dup_facts)

    def add(self, other: Row) -> None:
        for name in ("expected", "received", *CATEGORIES):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Problem:
    sink: str
    type: str
    category: str  # one of CATEGORIES but "delivered"
    key: str
    text: str

    def __str__(self) -> str:
        return f"{self.sink} {self.category}: {self.type} {self.key}: {self.text}"


TABLE_HEADER = ("sink", "type", "expected", "delivered", "wrong", "missing", "invented",
                "dup deliveries", "dup facts", "precision", "recall")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@dataclass
class Ledger:
    """Per sink and per event type counts, and what went wrong, event by event."""

    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0  # events out of scope (e.g. about cartons unfinished at stop)

    def row(self, sink: str, type_: str) -> Row:
        r = self.rows.get((sink, type_))
        if r is None:
            r = self.rows[(sink, type_)] = Row(sink, type_)
        return r

    @property
    def sinks(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.rows))

    def total(self, sink: str | None = None, type_: str | None = None) -> Row:
        t = Row(sink or "all", type_ or "all")
        for (s, ty), r in self.rows.items():
            if (sink is None or s == sink) and (type_ is None or ty == type_):
                t.add(r)
        return t

    @property
    def exactly_once(self) -> bool:
        """No fact missing, none wrong, none invented, none under two ids: at every sink."""
        return all(r.exact for r in self.rows.values())

    ok = exactly_once

    def sink_ok(self, sink: str) -> bool:
        return all(r.exact for (s, _), r in self.rows.items() if s == sink)

    def examples(self, sink: str | None = None, limit: int = 5,
                 categories: Collection[str] = CATEGORIES) -> list[str]:
        return [str(p) for p in self.problems
                if (sink is None or p.sink == sink) and p.category in categories][:limit]

    def summary(self, sink: str | None = None) -> str:
        t = self.total(sink)
        verdict = "exactly once" if t.exact else "NOT exactly once"
        return (f"{sink or 'all sinks'}: {verdict}: {t.delivered}/{t.expected} delivered; "
                f"wrong {t.wrong}, missing {t.missing}, invented {t.invented}, "
                f"dup facts {t.dup_facts}, dup deliveries {t.dup_deliveries}")

    def table(self) -> list[list[str]]:
        """Rows of TABLE_HEADER's columns: each sink's types, then the sink's total."""
        out = []
        for sink in self.sinks:
            types = sorted(ty for s, ty in self.rows if s == sink)
            for r in [self.rows[(sink, ty)] for ty in types] + [self.total(sink)]:
                label = "total" if r.type == "all" else r.type
                out.append([sink, label, *(str(getattr(r, c)) for c in (
                    "expected", "delivered", "wrong", "missing", "invented",
                    "dup_deliveries", "dup_facts")), _ratio(r.precision), _ratio(r.recall)])
        return out

    def lines(self) -> list[str]:
        """The table as fixed-width text lines (header first)."""
        rows = [list(TABLE_HEADER), *self.table()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
        return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                for r in rows]

    def verdict(self) -> str:
        t = self.total()
        if self.exactly_once:
            return (f"exactly once: {t.delivered:,} facts at {len(self.sinks)} sinks, none missing, "
                    f"wrong, invented or duplicated ({t.dup_deliveries:,} redeliveries of the "
                    f"same id, allowed by at least once)")
        return (f"NOT exactly once: missing {t.missing:,}, wrong {t.wrong:,}, invented "
                f"{t.invented:,}, duplicate facts {t.dup_facts:,} (redeliveries of the same "
                f"id {t.dup_deliveries:,})")


def account(
    facts: Iterable[Fact],
    received: Mapping[str, Iterable[CloudEvent]],
    *,
    types: Mapping[str, Collection[str] | None] | None = None,
    ignore: Callable[[CloudEvent], bool] | None = None,
    keys: Mapping[str, KeyFn] | None = None,
) -> Ledger:
    """The ledger of every sink in ``received`` (sink -> its events in arrival order, every
    delivery, repeats of an id included). ``types``: sink -> the event types it subscribes
    to (None or absent: every type); a fact is expected at a sink that subscribes to its
    type. ``ignore``: events out of scope, counted in ``Ledger.ignored`` only. ``keys``:
    key functions for types not in `KEYS` (or to override them)."""
    facts = list(facts)
    led = Ledger()
    for sink, events in received.items():
        subscribed = (types or {}).get(sink)
        wanted = set(subscribed) if subscribed is not None else None
        expected = [f for f in facts if wanted is None or f.type in wanted]
        _account_sink(led, sink, expected, events, ignore, keys)
    return led


def _account_sink(led: Ledger, sink: str, expected: list[Fact], events: Iterable[CloudEvent],
                  ignore: Callable[[CloudEvent], bool] | None,
                  keys: Mapping[str, KeyFn] | None) -> None:
    groups: dict[tuple[str, str, str], list[Fact]] = defaultdict(list)
    for f in expected:
        groups[(f.type, f.key, f.detail)].append(f)
        led.row(sink, f.type).expected += 1
    # Keys that have a fact other than an exception: an exception about them is false.
    happened = {f.key for f in expected if f.type not in EXCEPTION_TYPES}

    first: dict[str, CloudEvent] = {}
    got: dict[tuple[str, str, str], list[tuple[CloudEvent, Any]]] = defaultdict(list)
    for ev in events:
        if ignore is not None and ignore(ev):
            led.ignored += 1
            continue
        eid, type_ = str(ev.get("id")), str(ev.get("type"))
        row = led.row(sink, type_)
        if eid in first:
            row.dup_deliveries += 1
            if _data(first[eid]) != _data(ev) or first[eid].get("type") != ev.get("type"):
                row.wrong += 1
                led.problems.append(Problem(sink, type_, "wrong", event_key(ev, keys)[0],
                                            f"id {eid} delivered again with other data"))
            continue
        first[eid] = ev
        row.received += 1
        key, detail, seq = event_key(ev, keys)
        got[(type_, key, detail)].append((ev, seq))

    for gkey in list(groups) + [g for g in got if g not in groups]:
        _match_group(led, sink, gkey, groups.get(gkey, []), got.get(gkey, []), happened)


def _match_group(led: Ledger, sink: str, gkey: tuple[str, str, str], facts: list[Fact],
                 events: list[tuple[CloudEvent, Any]], happened: set[str]) -> None:
    type_, key, detail = gkey
    row = led.row(sink, type_)
    label = f"{key}:{detail}" if detail else key

    def problem(category: str, text: str) -> None:
        led.problems.append(Problem(sink, type_, category, label, text))

    if not facts:
        for ev, _ in events:
            row.invented += 1
            if type_ in EXCEPTION_TYPES and key in happened:
                problem("invented", f"false exception (id {ev.get('id')}): {label} happened")
            else:
                problem("invented", f"no fact behind id {ev.get('id')} {dict(_data(ev))}")
        return
    seqs_known = any(f.seq is not None for f in facts)

    def candidates(seq: Any) -> list[Fact]:
        if seq is not None and seqs_known:
            return [f for f in facts if f.seq == seq]
        return facts

    claimed: set[int] = set()  # indices into facts
    claimed_seqs: set[Any] = set()
    rest: list[tuple[CloudEvent, Any]] = []
    index = {id(f): i for i, f in enumerate(facts)}
    # Pass 1: each event claims the first unclaimed fact it matches exactly.
    for ev, seq in events:
        hit = None
        if seq is None or seq not in claimed_seqs:
            for f in candidates(seq):
                if index[id(f)] not in claimed and values_match(f, _data(ev)):
                    hit = f
                    break
        if hit is None:
            rest.append((ev, seq))
            continue
        claimed.add(index[id(hit)])
        if seq is not None:
            claimed_seqs.add(seq)
        row.delivered += 1
    # Pass 2: the rest are second ids of a fact, wrong values for one, or invented.
    for ev, seq in rest:
        cands = candidates(seq)
        eid = ev.get("id")
        if (seq is not None and seq in claimed_seqs) or any(
                values_match(f, _data(ev)) for f in cands):
            row.dup_facts += 1
            problem("dup_facts", f"delivered again under id {eid}")
            continue
        open_facts = [f for f in cands if index[id(f)] not in claimed]
        if open_facts:
            f = open_facts[0]
            claimed.add(index[id(f)])
            row.wrong += 1
            problem("wrong", f"id {eid}: " + "; ".join(_mismatches(f, _data(ev))))
        elif not cands:
            row.invented += 1
            problem("invented", f"id {eid}: no such {type_} (seq {seq!r})")
        else:
            row.dup_facts += 1
            problem("dup_facts", f"delivered again under id {eid}, with other values: "
                    + "; ".join(_mismatches(cands[0], _data(ev))))
    for i, f in enumerate(facts):
        if i not in claimed:
            row.missing += 1
            problem("missing", f"never arrived: {dict(f.data)}")


# --- ground truth adapters ----------------------------------------------------------------


def carton_facts(cartons: Iterable[Mapping[str, Any]]) -> list[Fact]:
    """The packing line's ground truth (`Carton.ground_truth()` entries) as facts."""
    return [
        Fact(e["type"], str(c["tracking_id"]), dict(e.get("data", {})))
        for c in cartons for e in c["expected"]
    ]


SORTER_TYPES = ("carton_sorted", "sort_exception", "scan_no_read")


def sorter_facts(truth: Iterable[Mapping[str, Any]], *, scans: bool = False) -> list[Fact]:
    """The OPC UA sorter simulator's finished cartons (`SorterSim.ground_truth()`) as facts;
    ``scans``: the scanner's no-reads are expected too."""
    out = []
    for c in truth:
        if not c.get("done"):
            continue
        tid, final = str(c["tracking_id"]), c["final_disposition"]
        if final in ("sorted", "no_read", "no_destination", "lane_full"):
            out.append(Fact("carton_sorted", tid, {
                "tracking_id": tid, "disposition": final, "lane": c["final_lane"]}))
        if final == "lost_mistrack":
            out.append(Fact("sort_exception", tid, {"tracking_id": tid, "reason": "lost"},
                            detail="lost"))
        if c["dispositions"].count("recirculated") >= 2:
            reason = "recirculated_too_often"
            out.append(Fact("sort_exception", tid, {"tracking_id": tid, "reason": reason},
                            detail=reason))
        if scans and not c["read"]:
            out.append(Fact("scan_no_read", tid, {"tracking_id": tid}))
    return out


def sorter_unfinished(truth: Iterable[Mapping[str, Any]]) -> Callable[[CloudEvent], bool]:
    """An `account(ignore=...)` predicate: sorter events about cartons not done yet."""
    not_done = {str(c["tracking_id"]) for c in truth if not c.get("done")}
    return lambda ev: ev.get("type") in SORTER_TYPES and _tracking(ev)[0] in not_done


def press_facts(presses: Iterable[Mapping[str, Any]]) -> list[Fact]:
    """Pick-to-light presses as facts. Each press: ``kind`` (confirm or short),
    ``location``, ``position``, ``qty`` (picked), ``display_qty`` (for a short), and
    ``seq`` when the device numbers its presses (events then carry it as press_seq)."""
    out = []
    for p in presses:
        loc = str(p["location"])
        if p["kind"] == "confirm":
            out.append(Fact("pick_confirmed", loc, {
                "location": loc, "position": p["position"], "qty": p["qty"]}, seq=p.get("seq")))
        else:
            out.append(Fact("pick_short", loc, {
                "location": loc, "position": p["position"], "qty_picked": p["qty"],
                "qty_expected": p["display_qty"]}, seq=p.get("seq")))
    return out


def fault_facts(faults: Iterable[Mapping[str, Any]]) -> list[Fact]:
    """Equipment stops as facts, each ``{"equipment": ..., "reason": ...}``, in order."""
    return [Fact("equipment_fault", str(f["equipment"]),
                 {"equipment": f["equipment"], "reason": f["reason"]}, seq=f.get("seq"))
            for f in faults]


# --- the carton view (older callers) --------------------------------------------------------


@dataclass
class CartonLedger:
    """One sink's carton accounting, in the older shape; built on `account`."""

    cartons: int = 0
    accounted: int = 0
    missing: list[str] = field(default_factory=list)  # "T0000042:carton_closed"
    unexpected: list[str] = field(default_factory=list)  # invented
    duplicates: list[str] = field(default_factory=list)  # duplicate facts (a second id)
    wrong_values: list[str] = field(default_factory=list)
    redeliveries: int = 0  # the same id again: allowed
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def ok(self) -> bool:
        return self.ledger.exactly_once and self.accounted == self.cartons

    def summary(self) -> str:
        return (
            f"{self.accounted}/{self.cartons} cartons accounted for exactly once; "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"duplicates {len(self.duplicates)}, wrong values {len(self.wrong_values)}, "
            f"redeliveries {self.redeliveries}"
        )


def tracking_id(ev: Mapping[str, Any]) -> str | None:
    data = ev.get("data") or {}
    return data.get("tracking_id") or ev.get("subject")


def reconcile(
    cartons: Iterable[Mapping[str, Any]],
    received: Iterable[Mapping[str, Any]],
    *,
    types: Collection[str] | None = None,
) -> CartonLedger:
    """One sink's events (every delivery; repeats of an id are redeliveries, allowed)
    against the packing line's ground truth. ``types``: the event types this sink subscribes
    to (others are not expected there). Fails on missing, wrong, invented and on one carton's
    event under two ids."""
    cartons = list(cartons)
    led = account(carton_facts(cartons), {"sink": received}, types={"sink": types})
    out = CartonLedger(cartons=len(cartons), ledger=led,
                       redeliveries=led.total().dup_deliveries)
    lists = {"missing": out.missing, "invented": out.unexpected, "dup_facts": out.duplicates,
             "wrong": out.wrong_values}
    bad: set[str] = set()
    for p in led.problems:
        lists[p.category].append(f"{p.key}:{p.type}" + (
            f" {p.text}" if p.category == "wrong" else ""))
        bad.add(p.key.split(":", 1)[0])
    out.accounted = sum(1 for c in cartons if str(c["tracking_id"]) not in bad)
    return out


# --- the sorter view (older callers) --------------------------------------------------------


def _sorter_detail(type_: str, d: Mapping[str, Any]) -> str:
    if type_ == "carton_sorted":
        return f"{d.get('disposition')}@{d.get('lane')}"
    if type_ == "sort_exception":
        return str(d.get("reason"))
    return ""


def sorter_expected(
    truth: list[dict[str, Any]], *, scans: bool = False
) -> list[tuple[str, str, str]]:
    """What a destination must get for the OPC UA sorter simulator's finished cartons, as
    sorted (type, tracking id, detail); ``scans``: the scanner's no-reads are expected too."""
    return sorted((f.type, f.key, _sorter_detail(f.type, f.data))
                  for f in sorter_facts(truth, scans=scans))


def sorter_received(
    events: Iterable[Mapping[str, Any]], *, types: Iterable[str] = SORTER_TYPES
) -> list[tuple[str, str, str]]:
    """The sorter events among ``events`` in ``sorter_expected``'s form: a repeated id once
    (a redelivery), but one carton's event under two ids twice, so comparing with
    ``sorter_expected`` fails on duplicate facts as it does on missing and invented ones."""
    out = []
    seen: set[Any] = set()
    wanted = set(types)
    for e in events:
        if e.get("type") not in wanted or e.get("id") in seen:
            continue
        seen.add(e.get("id"))
        d = _data(e)
        out.append((str(e["type"]), str(d.get("tracking_id")), _sorter_detail(str(e["type"]), d)))
    return sorted(out)


def sorter_ledger(truth: list[dict[str, Any]], received: Mapping[str, Iterable[CloudEvent]], *,
                  scans: bool = False,
                  types: Mapping[str, Collection[str] | None] | None = None) -> Ledger:
    """The sorter's finished cartons against what each sink received (events about cartons
    still on the belt are ignored)."""
    scope = set(SORTER_TYPES if scans else SORTER_TYPES[:2])
    return account(sorter_facts(truth, scans=scans),
                   {s: [e for e in evs if e.get("type") in scope] for s, evs in received.items()},
                   types=types, ignore=sorter_unfinished(truth))


__all__ = [
    "CATEGORIES", "EXCEPTION_TYPES", "KEYS", "SORTER_TYPES", "TABLE_HEADER", "CartonLedger",
    "Fact", "Ledger", "Problem", "Row", "account", "carton_facts", "event_key", "fault_facts",
    "press_facts", "reconcile", "sorter_expected", "sorter_facts", "sorter_ledger",
    "sorter_received", "sorter_unfinished", "tracking_id", "values_match",
]
