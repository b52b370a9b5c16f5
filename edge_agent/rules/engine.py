"""The rules engine: routes device events to rules, drops redeliveries, drives timeouts.

Runs on the event loop, synchronously inside the connector's message callback: one device
message is decoded, deduplicated, applied to every rule that consumes it, and its effects
(business events, rule state, its own id, its ack) join the current group-commit batch. No
task is created per message. ``tick()`` runs from one periodic task and expires windows.

Connectors see only the ``Ingest`` protocol: ``device_event`` and ``bad_payload``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from ..events import DeviceEvent, envelope
from ..outbox.batch import Quarantined
from ..outbox.committer import Committer
from ..runtime.clock import Clock
from .base import Rule

log = logging.getLogger(__name__)

Ack = Callable[[], None] | None
QUARANTINE_MAX_BYTES = 65_536  # what is kept of a bad payload


class Ingest(Protocol):
    """What a connector hands its decoded messages to."""

    def device_event(self, ev: DeviceEvent, ack: Ack) -> None: ...

    def bad_payload(
        self, device: str, source: str, reason: str, detail: str, payload: bytes, ack: Ack
    ) -> None: ...


class Engine:
    def __init__(
        self,
        rules: Iterable[Rule],
        committer: Committer,
        clock: Clock,
        *,
        site: str,
        dedup_retention_secs: float = 900,
        dedup_max_ids: int = 2_000_000,
    ):
        self.rules = list(rules)
        self.committer = committer
        self.clock = clock
        self.site = site
        self.routes: dict[tuple[str, str], list[tuple[Rule, str]]] = {}
        for rule in self.rules:
            for device, event, input_name in rule.inputs():
                self.routes.setdefault((device, event), []).append((rule, input_name))
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.dedup_retention = dedup_retention_secs
        self.dedup_max = dedup_max_ids
        self.counters: dict[str, int] = {
            "device_events": 0,
            "duplicates": 0,
            "unrouted": 0,
            "business_events": 0,
        }
        self.bad: dict[tuple[str, str], int] = {}  # (device, reason) -> count
        self.recent: list[tuple[float, str, str]] = []  # (time, type, subject), for live views

    # --- start -----------------------------------------------------------------------------

    def restore(self, rule_state: dict[str, dict[str, str]], inputs: list[tuple[str, float]]) -> None:
        """Load persisted rule state and consumed input ids (before any message arrives)."""
        for rule in self.rules:
            items = rule_state.get(rule.name, {})
            rule.load_state({k: json.loads(v) for k, v in items.items()})
        for msg_id, seen in inputs:
            self.seen[msg_id] = seen

    # --- Ingest ----------------------------------------------------------------------------

    def device_event(self, ev: DeviceEvent, ack: Ack) -> None:
        batch = self.committer.batch
        if ack is not None:
            batch.acks.append(ack)
        self.committer.changed()
        msg_id = ev.msg_id
        if msg_id in self.seen:
            self.counters["duplicates"] += 1
            return
        self.seen[msg_id] = ev.received_at
        batch.inputs.append((msg_id, ev.received_at))
        self.counters["device_events"] += 1
        targets = self.routes.get((ev.device, ev.event))
        if not targets:
            self.counters["unrouted"] += 1
            return
        n = len(batch.events)
        for rule, input_name in targets:
            rule.on_event(ev, input_name, batch)
        if len(batch.events) > n:
            self._finish(batch.events, n)

    def bad_payload(
        self, device: str, source: str, reason: str, detail: str, payload: bytes, ack: Ack
    ) -> None:
        k = (device, reason)
        n = self.bad.get(k, 0)
        self.bad[k] = n + 1
        if n == 0:  # loud once per cause, then counted
            log.warning(
                "malformed payload from %s set aside: %s %s (source %s); further ones are counted",
                device, reason, detail, source,
            )
        batch = self.committer.batch
        batch.quarantine.append(
            Quarantined(device, source, reason, detail, payload[:QUARANTINE_MAX_BYTES], self.clock.now())
        )
        if ack is not None:
            batch.acks.append(ack)
        self.committer.changed()

    # --- time ------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock.now()
        batch = self.committer.batch
        n = len(batch.events)
        for rule in self.rules:
            rule.on_tick(now, batch)
        if len(batch.events) > n:
            self._finish(batch.events, n)
        self.committer.changed()
        self._prune_seen(now)

    async def run_ticks(self, interval_secs: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval_secs)
            self.tick()

    # --- internals -------------------------------------------------------------------------

    def _finish(self, events: list, start: int) -> None:
        site = self.site
        for ev in events[start:]:
            envelope(ev, site)
            self.recent.append((ev.time, ev.type, ev.subject))
        self.counters["business_events"] += len(events) - start
        if len(self.recent) > 200:
            del self.recent[:-50]

    def _prune_seen(self, now: float) -> None:
        seen, horizon = self.seen, now - self.dedup_retention
        while seen and (len(seen) > self.dedup_max or next(iter(seen.values())) < horizon):
            seen.popitem(last=False)
