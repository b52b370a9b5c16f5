"""Group commit: gathers the current batch on the event loop and makes it durable.

One flusher task, one commit in flight at a time: while the database thread fsyncs one
batch, the next one fills, so the commit rate adapts to the load without per-event work.
After each commit the batch's acks run (in order) and the dispatchers are woken.

A commit failure is fatal for the agent: nothing of that batch was acknowledged, so the
broker redelivers it after a restart; continuing would mean acknowledging nothing forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import StoreError
from .batch import Batch
from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        self._closing = False
        self.commits = 0
        self.committed_events = 0
        self.committed_inputs = 0
        self.last_commit_ms = 0.0
        self.failed: BaseException | None = None

    def listen(self) -> asyncio.Event:
        """An event set after every commit that added business events (for a dispatcher)."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    def changed(self) -> None:
        """Something was added to ``self.batch``: make sure a flush follows soon."""
        self._wake.set()

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call on the database thread (serialized with commits)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(self) -> None:
        """The flusher task; returns after ``close()`` once the last batch is durable."""
        while True:
            if not self.batch:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if self.interval and len(self.batch) < self.max_items:
                    await asyncio.sleep(self.interval)  # let a group form
            await self.flush()

    async def flush(self) -> None:
        b, self.batch = self.batch, Batch()
        if not b and not b.acks:
            return
        t0 = time.perf_counter()
        sealed = b.seal(self.routes, time.time())
        try:
            await self.run_db(self.store.commit, sealed)
        except StoreError as exc:
            self.failed = exc
            log.error("outbox commit failed; stopping ingest: %s", exc)
            raise
        self.last_commit_ms = (time.perf_counter() - t0) * 1000
        self.commits += 1
        self.committed_events += len(b.events)
        self.committed_inputs += len(b.inputs)
        for ack in b.acks:
            ack()
        if b.events or b.settles:
            for ev in self._listeners:
                ev.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def shutdown_executor(self) -> None:
        self.executor.shutdown(wait=True)
