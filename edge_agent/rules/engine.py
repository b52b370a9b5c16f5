"""The rules engine: routes device events to rules, drops redeliveries, drives timeouts.

Runs on the event loop, synchronously inside the connector's message callback: one device
message is decoded, deduplicated, applied to every rule that consumes it, and its effects
(business events, rule state, its own id, its ack) join the current group-commit batch. No
task is created per message.

Time: each message's event time goes through ``Sources`` (per device clock and coverage),
and the engine drives every rule's watermark from its inputs' progress after each message
and on ``tick()`` (a quiet line). The agent tells the engine when a device's connection
comes and goes (``source_online``) and when ingest is paused (``paused``); the engine
itself notices a late tick or a slow commit.

Connectors see only the ``Ingest`` protocol: ``device_event`` and ``bad_payload``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ..events import DeviceEvent, envelope
from ..outbox.batch import Quarantined
from ..outbox.committer import Committer
from ..outbox.seen import SeenIds
from ..runtime.clock import Clock
from .base import Rule
from .sources import Sources

log = logging.getLogger(__name__)

Ack = Callable[[], None] | None
QUARANTINE_MAX_BYTES = 65_536  # what is kept of a bad payload
STALL_SECS = 1.0  # a tick this late, or a commit this long, means the agent is behind


def _never_stored(msg_id: str, since: float) -> bool:
    return False


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
        sources: Sources | None = None,
    ):
        self.rules = list(rules)
        self.sources = sources or Sources()
        self.committer = committer
        self.clock = clock
        self.site = site
        # (device, event) -> (rule, input name, the rule's input devices)
        self.routes: dict[tuple[str, str], list[tuple[Rule, str, tuple[str, ...]]]] = {}
        self.rule_devices: dict[str, tuple[str, ...]] = {}
        for rule in self.rules:
            triples = rule.inputs()
            devices = self.rule_devices[rule.name] = tuple(sorted({d for d, _, _ in triples}))
            for device, event, input_name in triples:
                self.routes.setdefault((device, event), []).append((rule, input_name, devices))
            rule.driven = True
            if hasattr(rule, "sources"):
                rule.sources = self.sources
        self._last_tick = clock.monotonic()
        self._next_prune = 0.0
        self.paused = False  # ingest paused (outbox over quota): messages wait upstream
        # Consumed message ids, exact for the retention in bounded memory (the outbox's
        # ``inputs`` table is the record; see SeenIds).
        # (A stand-in committer without an outbox, as in RuleHarness, commits nothing: every
        # id then stays in memory.)
        store = getattr(committer, "store", None)
        self.seen = SeenIds(
            store.input_seen if store is not None else _never_stored, dedup_retention_secs
        )
        self.dedup_retention = dedup_retention_secs
        self.counters: dict[str, int] = {
            "device_events": 0,
            "duplicates": 0,
            "unrouted": 0,
            "business_events": 0,
        }
        self.bad: dict[tuple[str, str], int] = {}  # (device, reason) -> count
        self.recent: list[tuple[float, str, str]] = []  # (time, type, subject), for live views

    # --- start -----------------------------------------------------------------------------

    def restore(
        self, rule_state: dict[str, dict[str, str]], inputs: Iterable[tuple[str, float]]
    ) -> None:
        """Load persisted rule state and consumed input ids (a stream, in ``seen`` order),
        before any message arrives."""
        for rule in self.rules:
            items = rule_state.get(rule.name, {})
            rule.load_state({k: json.loads(v) for k, v in items.items()})
            t = getattr(rule, "max_time", None)
            if t:  # the rule's inputs had surely reached this (a quiet restart still expires)
                for d in self.rule_devices[rule.name]:
                    self.sources.seed(d, t)
        self.seen.restore(inputs)

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
        self.seen.add(msg_id, ev.received_at)
        batch.inputs.append((msg_id, ev.received_at))
        self.counters["device_events"] += 1
        targets = self.routes.get((ev.device, ev.event))
        if not targets:
            self.counters["unrouted"] += 1
            return
        t = self.sources.observe(ev.device, ev.time, ev.received_at)
        if t != ev.time:
            ev = dataclasses.replace(ev, time=t)  # a copy: the connector's event is its own
        n = len(batch.events)
        wm_of = self.sources.watermark
        now = ev.received_at
        for rule, input_name, devices in targets:
            rule.on_event(ev, input_name, batch)
            wm = wm_of(devices, now) - rule.lateness
            if wm > rule.watermark:
                rule.advance(wm, batch)
        if len(batch.events) > n:
            self._finish(batch.events, n)

    def bad_payload(
        self, device: str, source: str, reason: str, detail: str, payload: bytes, ack: Ack
    ) -> None:
        if reason == "counter_gap":
            self.sources.gap(device, self.clock.now())  # events missed: what is missing is unseen
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

    def source_online(self, devices: Iterable[str], online: bool, *, resumed: bool = False) -> None:
        """A connection came up or went down (``resumed``: nothing sent meanwhile was lost)."""
        now = self.clock.now()
        for d in devices:
            self.sources.set_online(d, online, now, resumed=resumed)

    def tick(self) -> None:
        now = self.clock.now()
        mono = self.clock.monotonic()
        if mono - self._last_tick > STALL_SECS:
            self.sources.stall(now)  # the loop was blocked: messages may be waiting unread
        self._last_tick = mono
        if self.paused or self.committer.stalled_secs() > STALL_SECS:
            self.sources.stall(now)
        batch = self.committer.batch
        n = len(batch.events)
        wm_of = self.sources.watermark
        for rule in self.rules:
            wm = wm_of(self.rule_devices[rule.name], now) - rule.lateness
            if wm > rule.watermark:
                rule.advance(wm, batch)
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
        # Ids are committed in the order they were added: the first ``committed_inputs``
        # are durable, so the table can answer for them.
        self.seen.prune(now, getattr(self.committer, "committed_inputs", 0))
        if now >= self._next_prune:
            self._next_prune = now + 60
            self.sources.prune(now - 86400)
