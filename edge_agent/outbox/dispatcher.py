"""One dispatcher per sink: leases pending deliveries in order, sends, settles.

Order per sink is the outbox order (hence per business key too): a batch that fails
transiently is retried as a whole, with capped jittered exponential backoff or the
receiver's Retry-After, before anything behind it is sent. A permanently rejected event is
dead-lettered and does not hold back the ones behind it. Each dispatcher advances on its
own, so a dead WMS never holds back the ERP or the MQTT bus.

Settlements join the group-commit batch (losing one to a crash only means a re-send, which
the receiver deduplicates by Idempotency-Key).

What is sent again: only what failed or was not acknowledged (a transient failure, a crash
before the settle was durable). The ``cursor`` (the last sequence number taken from the
outbox order) never moves back: every read of the feed or the outbox is past it, so nothing
the dispatcher already took is read again. Rows an operator puts back (``outbox retry``) lie
behind the cursor; an idle dispatcher *sweeps* for them every ``RESCAN_SECS``, only once its
own settles are durable (an unsettled row looks pending too), and sends them without moving
the cursor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ..errors import RetriableError
from ..sinks.base import Result, SendIncomplete, Sink, peer_text
from .batch import Settle
from .committer import Committer
from .store import DEAD, DELIVERED, PENDING, Pending

log = logging.getLogger(__name__)

RESCAN_SECS = 10.0  # how often an idle dispatcher sweeps for rows put back by an operator
DEAD_REASON_MAX_CHARS = 2000  # of a rejection reason, kept in the dead letter


def backoff_delay(attempt: int, initial_secs: float, cap_secs: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog), capped."""
    return random.uniform(0, min(cap_secs, initial_secs * (2 ** min(attempt, 30))))


class Dispatcher:
    def __init__(
        self,
        sink: Sink,
        committer: Committer,
        *,
        initial_backoff_secs: float = 0.5,
        max_backoff_secs: float = 60.0,
        max_retry_after_secs: float = 600.0,
        linger_secs: float = 0.02,
    ):
        self.sink = sink
        self.name = sink.name
        self.committer = committer
        self.wake = committer.listen()
        self.feed = committer.feed(sink.name)
        self.initial = initial_backoff_secs
        self.cap = max_backoff_secs
        self.max_retry_after = max_retry_after_secs
        self.linger = linger_secs
        self._partial = False  # the last send was not a full batch: traffic is flowing
        self.cursor = 0  # last seq taken in outbox order; only ever grows
        self._sweep_after: int | None = None  # a sweep under way: its position
        self._last_sweep = time.monotonic()
        self.sweeps = 0  # rows found put back behind the cursor (operator retries)
        self.held: list[Pending] = []
        self.failures = 0  # consecutive transient failures
        self.delivered = 0
        self.dead = 0
        self.state = "idle"  # idle | sending | backoff
        self.last_error: str | None = None
        self._settle_commit = 0  # commits count after which our settles are durable
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()

    async def run(self) -> None:
        while not self._stopping:
            items = self.held
            if not items:
                if self._partial and self.linger:
                    # Busy but not saturated: let a fuller batch form rather than send
                    # many tiny ones (each request costs far more than each event).
                    await asyncio.sleep(self.linger)
                if self._stopping:
                    break
                self.wake.clear()
                items = await self._next_batch()
                if items:
                    self.cursor = items[-1].seq
                    self._partial = len(items) < self.sink.batch_max_events
                else:
                    self.state = "idle"
                    items = await self._sweep()
                    if not items:
                        if self._stopping:
                            break
                        try:
                            await asyncio.wait_for(self.wake.wait(), RESCAN_SECS)
                        except TimeoutError:
                            pass
                        self._partial = False
                        continue
            self.state = "sending"
            try:
                results = await self.sink.send(items)
            except SendIncomplete as exc:
                self._settle(items[: len(exc.results)], exc.results)
                self.held = items[len(exc.results) :]
                await self._backoff(exc.cause)
            except RetriableError as exc:
                self.held = items
                await self._backoff(exc)
            else:
                if len(results) != len(items):
                    raise RuntimeError(f"sink {self.name} returned {len(results)} results for {len(items)}")
                self._settle(items, results)
                self.held = []
                if self.failures:
                    log.info("sink %s delivering again after %d failed attempts", self.name, self.failures)
                self.failures = 0
                self.last_error = None

    async def _next_batch(self) -> list[Pending]:
        """The next pending events after the cursor: from the in-memory feed when it is
        complete past the cursor, else from the outbox."""
        f, limit = self.feed, self.sink.batch_max_events
        q = f.items
        while q and q[0].seq <= self.cursor:  # taken from the outbox already
            q.popleft()
        if self.cursor >= f.complete_after:
            n = min(limit, len(q))
            return [q.popleft() for _ in range(n)]
        complete_after = f.complete_after
        items = await self.committer.run_db(
            self.committer.store.fetch_pending, self.name, self.cursor, limit
        )
        if not items:
            # Nothing pending up to what was committed when we asked, which includes
            # everything up to complete_after: from here on the feed has it all.
            self.cursor = max(self.cursor, complete_after)
        return items

    async def _sweep(self) -> list[Pending]:
        """Rows pending behind the cursor (put back by an operator), a batch at a time; an
        idle dispatcher looks every ``RESCAN_SECS``. Never moves the cursor."""
        if self._sweep_after is None:
            now = time.monotonic()
            if now - self._last_sweep <= RESCAN_SECS:
                return []
            self._last_sweep = now
            self._sweep_after = 0
        if self.committer.commits < self._settle_commit:
            return []  # our last settles are not durable yet: those rows still look pending
        rows = await self.committer.run_db(
            self.committer.store.fetch_pending, self.name, self._sweep_after, self.sink.batch_max_events
        )
        cursor = self.cursor
        items = [r for r in rows if r.seq <= cursor]
        if not items:
            self._sweep_after = None
            return []
        self._sweep_after = items[-1].seq
        self.sweeps += len(items)
        log.info("sink %s: %d events put back for delivery (first %s)", self.name, len(items), items[0].id)
        return items

    def _settle(self, items: list[Pending], results: list[Result]) -> None:
        now = time.time()
        settles = self.committer.batch.settles
        for it, res in zip(items, results, strict=True):
            if res is None:
                settles.append(Settle(self.name, it.seq, DELIVERED, None, now))
                self.delivered += 1
            else:
                # A reason quotes the receiver: one printable line, bounded, whatever it sent.
                settles.append(Settle(self.name, it.seq, DEAD, peer_text(res, DEAD_REASON_MAX_CHARS), now))
                self.dead += 1
                log.error("sink %s rejected event %s (%s) for good: %s", self.name, it.id, it.type, peer_text(res))
        self._settle_commit = self.committer.durable_after()
        self.committer.changed()

    async def _backoff(self, exc: RetriableError) -> None:
        self.failures += 1
        self.state = "backoff"
        msg = peer_text(str(exc), 500)
        if self.last_error is None:
            log.warning("sink %s failing, will retry: %s", self.name, msg)
        self.last_error = msg
        now = time.time()
        settles = self.committer.batch.settles
        for it in self.held[:1]:  # record the attempt on the head event, for operators
            settles.append(Settle(self.name, it.seq, PENDING, msg, now))
        self.committer.changed()
        if exc.retry_after_secs is not None:
            delay = min(max(exc.retry_after_secs, 0.0), self.max_retry_after)
        else:
            delay = backoff_delay(self.failures - 1, self.initial, self.cap)
        await self._sleep(delay)

    async def _sleep(self, secs: float) -> None:
        # Stop promptly on shutdown; held items stay pending in the outbox.
        deadline = time.monotonic() + secs
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.25))
