"""Group commit: gathers the current batch on the event loop and makes it durable.

One flusher task, one commit in flight at a time: while the database thread fsyncs one
batch, the next one fills, so the commit rate adapts to the load without per-event work.
After each commit the batch's acks run (in order), the new events are handed to each
sink's ``Feed`` and the dispatchers are woken.

A full disk (``OutboxFull``) is ridden out: the committer reports it once through
``on_pressure("disk_full", detail)`` (the agent pauses every connector: devices' messages stay
unacknowledged upstream), retries the *same* sealed batch with capped backoff, and reports
``on_pressure("disk_full", None)`` once it is durable; only then are its acks called. The
dispatchers' settles are never stuck behind such a batch: while it waits, they are committed
on their own (marking deliveries done rewrites pages already there), so that delivered events
can be pruned and the outbox give space back even when it filled the disk itself. To not
meet that wall at all, the free space of the outbox's filesystem is checked after every
commit (``min_free_bytes``): under it ingest pauses (``"disk_low"``) while there is still room
for settles, pruning and checkpoints, and resumes once twice that is free. Any
other commit failure is fatal for the agent: nothing of that batch was acknowledged, so the
broker redelivers it after a restart; continuing would mean acknowledging nothing forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import StoreError
from .batch import Batch, SealedBatch, Settle
from .store import OutboxFull, Pending, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

FEED_MAX_ITEMS = 10_000  # per sink; beyond it the dispatcher reads the outbox instead
FULL_RETRY_FIRST_SECS = 0.2  # a commit that found the disk full is retried after this,
FULL_RETRY_MAX_SECS = 5.0  # doubling up to this
CROWDED_FRACTION = 0.8  # of the quota: maintenance prunes delivered events now, retention or not
RESUME_FRACTION = 0.9  # of the quota: ingest paused by the quota resumes under this
DISK_RESUME_FACTOR = 2  # ingest paused for free space resumes at this many times the floor
SETTLE_CHUNK = 2000  # settles per settles-only commit (about 100 KB of WAL)
DISK_CROWDED_FACTOR = 4  # under this many times the floor, delivered events are pruned at once


class Feed:
    """Events just committed for one sink, handed over in memory so that a dispatcher that
    keeps up never reads them back from SQLite.

    It holds *every* event for the sink with ``seq > complete_after`` (in order). Bounded:
    on overflow (a sink that is down) it drops everything and restarts from the last
    committed seq; the dispatcher then reads the outbox until it has caught up. The outbox
    stays the truth; the feed is only a shortcut.
    """

    def __init__(self, complete_after: int, max_items: int = FEED_MAX_ITEMS):
        self.items: deque[Pending] = deque()
        self.complete_after = complete_after
        self.max_items = max_items
        self.overflows = 0

    def push(self, items: list[Pending], last_seq: int) -> None:
        self.items.extend(items)
        if len(self.items) > self.max_items:
            self.reset(last_seq)
            self.overflows += 1

    def reset(self, after: int) -> None:
        self.items.clear()
        self.complete_after = after


class Committer:
    def __init__(
        self,
        store: Store,
        routes: dict[str, list[str]],
        *,
        interval_ms: float = 2.0,
        max_items: int = 2000,
    ):
        self.store = store
        self.routes = routes
        self.interval = interval_ms / 1000.0
        self.max_items = max_items
        self.batch = Batch()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._wake = asyncio.Event()
        self._listeners: list[asyncio.Event] = []
        self.next_seq = store.max_seq() + 1
        self.flushing = False  # a commit is in flight (its batch is already sealed)
        self.flush_started = 0.0  # monotonic time the commit in flight started
        self._flush_lock = asyncio.Lock()  # one commit at a time, whoever asks (shutdown too)
        self.feeds: dict[str, Feed] = {}
        self._closing = False
        self.commits = 0
        self.committed_events = 0
        self.committed_inputs = 0
        self.last_commit_ms = 0.0
        self.failed: BaseException | None = None
        # Told (kind, plain-words detail) when ingest must pause, (kind, None) when it may
        # resume; kinds: "disk_full" (here), "quota" (see ``quota_bytes``).
        self.on_pressure: Callable[[str, str | None], None] | None = None
        self.full_since: float | None = None  # wall time the disk was first found full
        self.full_retries = 0
        # Disk quota (bytes; 0: none), checked after every commit from the sizes the store
        # reads then: ingest pauses once over it and resumes under RESUME_FRACTION of it.
        self.quota_bytes = 0
        self.over_quota = False
        self.crowded = asyncio.Event()  # over CROWDED_FRACTION of the quota: prune now
        # Free space kept on the outbox's filesystem (bytes; 0: not checked), checked after
        # every commit (one statvfs): under it ingest pauses ("disk_low").
        self.min_free_bytes = 0
        self.low_disk = False
        self.disk_free_bytes = 0  # as of the last check
        # Settles taken out of a batch that found no room, not durable yet (in order): the
        # next commit of any kind carries them first.
        self._loose: list[Settle] = []
        self.settle_commits = 0  # settles-only commits made while a batch was held

    def listen(self) -> asyncio.Event:
        """An event set after every commit that added business events (for a dispatcher)."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    def durable_after(self) -> int:
        """The value ``commits`` reaches once the settles in ``batch`` now are durable.

        For settles only: the settles-only commits made while a batch is held on a full
        disk count too (each carries every settle waiting, so it is never early for them).
        """
        return self.commits + (2 if self.flushing else 1)

    def feed(self, sink: str) -> Feed:
        """The in-memory feed of ``sink`` (created on first call, before any commit)."""
        if sink not in self.feeds:
            self.feeds[sink] = Feed(self.next_seq - 1)
        return self.feeds[sink]

    def stalled_secs(self) -> float:
        """How long the commit in flight has taken so far (0: none in flight)."""
        return time.monotonic() - self.flush_started if self.flushing else 0.0

    def changed(self) -> None:
        """Something was added to ``self.batch``: make sure a flush follows soon."""
        self._wake.set()

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call on the database thread (serialized with commits)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(self) -> None:
        """The flusher task; returns after ``close()`` once the last batch is durable."""
        while True:
            if not self.batch and not self._loose:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if self.interval and len(self.batch) < self.max_items:
                    await asyncio.sleep(self.interval)  # let a group form
            await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        b, self.batch = self.batch, Batch()
        if self._loose:
            b.settles[:0] = self._loose
            self._loose = []
        if not b and not b.acks:
            return
        t0 = time.perf_counter()
        first = self.next_seq
        sealed = b.seal(self.routes, time.time(), first)
        self.next_seq += len(b.events)
        self.flushing = True
        self.flush_started = time.monotonic()
        try:
            all_new = await self._commit(sealed)
        except StoreError as exc:
            self.failed = exc
            log.error("outbox commit failed; stopping ingest: %s", exc)
            raise
        finally:
            self.flushing = False
        self.last_commit_ms = (time.perf_counter() - t0) * 1000
        if self.quota_bytes:
            self.check_quota()
        self.check_disk()
        self.commits += 1
        self.committed_events += len(b.events)
        self.committed_inputs += len(b.inputs)
        for ack in b.acks:
            ack()
        if b.events:
            self._feed(b, sealed.routes, first, all_new)
        if b.events or b.settles:
            for ev in self._listeners:
                ev.set()

    async def _commit(self, sealed: SealedBatch) -> bool:
        """Commit ``sealed``; while the disk is full, pause ingest and retry the same batch.

        While it waits, the settles go on their own; the batch itself is tried again only
        once the free-space floor is back (the room released by the full disk is for the
        settles and pruning that give space back, not for this batch)."""
        delay = FULL_RETRY_FIRST_SECS
        while True:
            try:
                if self.full_since is not None and self.min_free_bytes:
                    self.check_disk()
                    if self.store.free_for_ingest() < self.min_free_bytes:
                        raise OutboxFull("still under the free-space floor")
                all_new = await self.run_db(self.store.commit, sealed)
                break
            except OutboxFull as exc:
                if self.full_since is None:
                    self.full_since = time.time()
                    log.error(
                        "%s. Ingest paused: devices' messages stay unacknowledged and wait "
                        "upstream; the commit is retried until there is room", exc,
                    )
                    self._pressure("disk_full", str(exc))
                    self.crowded.set()
                if sealed.settles:  # not held with the batch: they go on their own
                    self._loose[:0] = sealed.settles
                    sealed.settles = []
                self.check_disk()
                await self._commit_settles()
                self.full_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, FULL_RETRY_MAX_SECS)
        if self.full_since is not None:
            log.warning(
                "outbox %s has room again after %.0f s: the commit that waited for it is done",
                self.store.path, time.time() - self.full_since,
            )
            self.full_since = None
            self._pressure("disk_full", None)
        return all_new

    async def _commit_settles(self) -> None:
        """Commit the settles waiting (those of the held batch, then the dispatchers' new
        ones) on their own; on no room either, keep them, in order, for the next try."""
        settles = self._loose + self.batch.settles
        if not settles:
            return
        self.batch.settles = []
        self._loose = settles
        # In chunks (each a small transaction); a commit counts once all of them are in.
        while self._loose:
            chunk = self._loose[:SETTLE_CHUNK]
            try:
                await self.run_db(self.store.commit, SealedBatch([], [], [], [], [], [], chunk))
            except OutboxFull:
                return
            del self._loose[: len(chunk)]
            self.crowded.set()  # what was delivered can be pruned now
        self.commits += 1  # settles' durable_after() is met (never early: see there)
        self.settle_commits += 1
        for ev in self._listeners:
            ev.set()

    def check_disk(self) -> None:
        """Pause or resume ingest for the free space kept on the outbox's filesystem."""
        r = self.min_free_bytes
        if not r:
            return
        free = self.store.free_for_ingest()
        self.disk_free_bytes = self.store.free_bytes()
        if free < r * DISK_CROWDED_FACTOR:
            self.crowded.set()
        if not self.low_disk:
            if free < r:
                self.low_disk = True
                self.crowded.set()
                self._pressure(
                    "disk_low",
                    f"only {self.disk_free_bytes / 2**20:.1f} MB free on the filesystem of "
                    f"outbox {self.store.path}, under the "
                    f"{(r + self.disk_free_bytes - free) / 2**20:.1f} MB it keeps free (a "
                    f"{r / 2**20:.1f} MB floor, and room for its WAL and reserve file) for "
                    f"marking deliveries done, pruning and checkpoints",
                )
        elif free >= r * DISK_RESUME_FACTOR:
            self.low_disk = False
            self._pressure("disk_low", None)

    def check_quota(self) -> None:
        """Pause or resume ingest for the quota, from the store's last measured size."""
        q = self.quota_bytes
        used = self.store.used_bytes
        if used > q * CROWDED_FRACTION:
            self.crowded.set()
        if not self.over_quota and used > q:
            self.over_quota = True
            self._pressure(
                "quota",
                f"outbox {self.store.path} holds {used / 2**20:.1f} MB, over its quota of "
                f"{q / 2**20:.0f} MB",
            )
        elif self.over_quota and used <= q * RESUME_FRACTION:
            self.over_quota = False
            self._pressure("quota", None)

    def _pressure(self, kind: str, detail: str | None) -> None:
        if self.on_pressure is not None:
            self.on_pressure(kind, detail)

    def _feed(self, b: Batch, routes: list[tuple[str, int, str]], first: int, all_new: bool) -> None:
        last = first + len(b.events) - 1
        if not all_new:
            # Some ids were already stored under other seqs: read those from the outbox.
            for f in self.feeds.values():
                f.reset(last)
            return
        per_sink: dict[str, list[Pending]] = {}
        events = b.events
        for sink, seq, _ in routes:
            e = events[seq - first]
            per_sink.setdefault(sink, []).append(Pending(seq, e.id, e.type, e.subject, e.body, 0))
        for sink, f in self.feeds.items():
            items = per_sink.get(sink)
            if items:
                f.push(items, last)

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def shutdown_executor(self) -> None:
        self.executor.shutdown(wait=True)
