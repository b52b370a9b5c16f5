"""Accounting: compare what a destination received with the simulator's ground truth.

Every simulated carton expects a list of business events (type + data values). A
destination's events are grouped by tracking id; a carton is *accounted for* when it got
exactly its expected events, once each (after the receiver's dedup by event id), with the
expected values. Used by the tests, the demo summary and the benchmarks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Ledger:
    cartons: int = 0
    accounted: int = 0
    missing: list[str] = field(default_factory=list)  # "T0000042:carton_closed"
    unexpected: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # same carton+type more than once
    wrong_values: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.accounted == self.cartons and not self.unexpected

    def summary(self) -> str:
        return (
            f"{self.accounted}/{self.cartons} cartons accounted for exactly once; "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"duplicates {len(self.duplicates)}, wrong values {len(self.wrong_values)}"
        )


def tracking_id(ev: Mapping[str, Any]) -> str | None:
    data = ev.get("data") or {}
    return data.get("tracking_id") or ev.get("subject")


def reconcile(
    cartons: Iterable[Mapping[str, Any]],
    received: Iterable[Mapping[str, Any]],
    *,
    types: set[str] | None = None,
) -> Ledger:
    """``cartons``: ground-truth entries; ``received``: CloudEvents envelopes (deduped by id
    upstream, or not: a repeated id counts once). ``types``: the event types this destination
    subscribes to (others are not expected there)."""
    by_carton: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    seen_ids: set[str] = set()
    for ev in received:
        if ev["id"] in seen_ids:
            continue
        seen_ids.add(ev["id"])
        tid = tracking_id(ev)
        by_carton[str(tid)].append(ev)
    led = Ledger()
    known: set[str] = set()
    for c in cartons:
        tid = c["tracking_id"]
        known.add(tid)
        led.cartons += 1
        expected = [e for e in c["expected"] if types is None or e["type"] in types]
        got = by_carton.get(tid, [])
        got_types = Counter(e["type"] for e in got)
        ok = True
        for exp in expected:
            n = got_types.get(exp["type"], 0)
            if n == 0:
                led.missing.append(f"{tid}:{exp['type']}")
                ok = False
                continue
            if n > 1:
                led.duplicates.append(f"{tid}:{exp['type']}")
                ok = False
            ev = next(e for e in got if e["type"] == exp["type"])
            for k, v in exp.get("data", {}).items():
                if ev["data"].get(k) != v:
                    led.wrong_values.append(f"{tid}:{exp['type']}.{k}={ev['data'].get(k)!r}, want {v!r}")
                    ok = False
        extra = set(got_types) - {e["type"] for e in expected}
        for t in sorted(extra):
            led.unexpected.append(f"{tid}:{t}")
            ok = False
        if ok:
            led.accounted += 1
    for tid, evs in by_carton.items():
        if tid not in known:
            led.unexpected += [f"{tid}:{e['type']}" for e in evs]
    return led


# --- the sorter ----------------------------------------------------------------------------

SORTER_TYPES = ("carton_sorted", "sort_exception", "scan_no_read")


def sorter_expected(
    truth: list[dict[str, Any]], *, scans: bool = False
) -> list[tuple[str, str, str]]:
    """What a destination must get for the OPC UA sorter simulator's finished cartons, as
    sorted (type, tracking id, detail); ``scans``: the scanner's no-reads are expected too."""
    out = []
    for c in truth:
        if not c.get("done"):
            continue
        tid, final = c["tracking_id"], c["final_disposition"]
        if final in ("sorted", "no_read", "no_destination", "lane_full"):
            out.append(("carton_sorted", tid, f"{final}@{c['final_lane']}"))
        if final == "lost_mistrack":
            out.append(("sort_exception", tid, "lost"))
        if c["dispositions"].count("recirculated") >= 2:
            out.append(("sort_exception", tid, "recirculated_too_often"))
        if scans and not c["read"]:
            out.append(("scan_no_read", tid, ""))
    return sorted(out)


def sorter_received(
    events: Iterable[Mapping[str, Any]], *, types: Iterable[str] = SORTER_TYPES
) -> list[tuple[str, str, str]]:
    """The sorter events among ``events`` (each id once), in ``sorter_expected``'s form."""
    out = []
    seen: set[Any] = set()
    wanted = set(types)
    for e in events:
        if e.get("type") not in wanted or e.get("id") in seen:
            continue
        seen.add(e.get("id"))
        d = e.get("data") or {}
        if e["type"] == "carton_sorted":
            detail = f"{d.get('disposition')}@{d.get('lane')}"
        elif e["type"] == "sort_exception":
            detail = str(d.get("reason"))
        else:
            detail = ""
        out.append((e["type"], str(d.get("tracking_id")), detail))
    return sorted(out)
