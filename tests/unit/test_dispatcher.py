"""The dispatcher over a real outbox (Store + Committer) and a real HTTP receiver
(``simulators.receiver``): a delivered event is sent again only when its delivery failed or
was not acknowledged, whatever the dispatcher goes through (idle rescans, feed overflows,
replayed ids, transient failures); rejections are isolated without collapsing the batch
rate; what a receiver says is logged and kept as one bounded, printable line."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import edge_agent.outbox.dispatcher as dispatcher_mod
from edge_agent.config import HttpSinkConfig
from edge_agent.events import BusinessEvent, envelope, event_id
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.dispatcher import Dispatcher
from edge_agent.outbox.store import PENDING, Pending, Store
from edge_agent.sinks.http import HttpSink
from simulators.receiver import Receiver

ROUTES = {"carton_closed": ["wms"]}


def bev(i: int) -> BusinessEvent:
    ev = BusinessEvent(
        event_id("t", "dispatch", str(i)), "carton_closed", f"C{i:06d}", 1_800_000_000.0 + i,
        "edge-agent/t/rules/dispatch", {"carton_id": f"C{i:06d}", "n": i},
    )
    envelope(ev, "t")
    return ev


class RescanCountingStore(Store):
    """Counts reads of the outbox from its start: what an idle dispatcher's rescan does."""

    rescans = 0

    def fetch_pending(self, sink: str, after_seq: int, limit: int) -> list[Pending]:
        if after_seq == 0:
            self.rescans += 1
        return super().fetch_pending(sink, after_seq, limit)


class KeyedReceiver(Receiver):
    """The stand-in WMS, also recording each request's Idempotency-Key and event ids."""

    def __init__(self) -> None:
        super().__init__("wms")
        self.keyed: list[tuple[str, tuple[str, ...]]] = []

    async def _events_response(self, request: web.Request) -> web.Response:
        response = await super()._events_response(request)
        if response.status == 200:
            ids = tuple(e["id"] for e in (await request.json()))
            self.keyed.append((request.headers.get("Idempotency-Key", ""), ids))
        return response


async def eventually(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Rig:
    def __init__(
        self, store: RescanCountingStore, committer: Committer, receiver: KeyedReceiver, sink: HttpSink
    ):
        self.store, self.committer, self.receiver, self.sink = store, committer, receiver, sink
        self.dispatcher: Dispatcher | None = None
        self._dtask: asyncio.Task[None] | None = None
        # A connection of its own sees only what is committed (the store's is mid-transaction).
        self.reader = sqlite3.connect(str(store.path))

    async def rescans(self, n: int) -> None:
        """Wait until the idle dispatcher has rescanned the outbox ``n`` more times."""
        target = self.store.rescans + n
        await eventually(lambda: self.store.rescans >= target, f"{n} idle rescans")

    def make_dispatcher(self, linger_secs: float = 0.0) -> Dispatcher:
        self.dispatcher = Dispatcher(
            self.sink, self.committer, initial_backoff_secs=0.01, max_backoff_secs=0.05,
            linger_secs=linger_secs,
        )
        return self.dispatcher

    def start(self) -> Dispatcher:
        d = self.dispatcher or self.make_dispatcher()
        self._dtask = asyncio.create_task(d.run())
        return d

    async def emit(self, events: list[BusinessEvent]) -> None:
        """Commit ``events`` in one group commit and wait until it is durable."""
        c = self.committer
        target = c.commits + (2 if c.flushing else 1)
        c.batch.events.extend(events)
        c.changed()
        await eventually(lambda: c.commits >= target, "the commit")

    def unique_ids(self) -> list[str]:
        return [e["id"] for e in self.receiver.events]

    def pending(self) -> int:
        q = "SELECT count(*) FROM deliveries WHERE sink = 'wms' AND state = ?"
        return int(self.reader.execute(q, (PENDING,)).fetchone()[0])

    def rows(self) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in dead_and_errors(self.reader)}

    async def stop(self) -> None:
        if self.dispatcher is not None and self._dtask is not None:
            self.dispatcher.stop()
            await asyncio.wait_for(self._dtask, 10)


@asynccontextmanager
async def rig(
    tmp_path: Path, committer_cls: type[Committer] = Committer, **sink_cfg: Any
) -> AsyncIterator[Rig]:
    store = RescanCountingStore(tmp_path / "outbox.db")
    committer = committer_cls(store, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(committer.run())
    receiver = KeyedReceiver()
    await receiver.start()
    sink_cfg.setdefault("batch_linger_ms", 0)
    cfg = HttpSinkConfig(kind="http", url=f"http://127.0.0.1:{receiver.events_port}/events", **sink_cfg)
    sink = HttpSink("wms", cfg)
    await sink.start()
    r = Rig(store, committer, receiver, sink)
    try:
        yield r
    finally:
        await r.stop()
        committer.close()
        await asyncio.wait_for(ctask, 10)
        committer.shutdown_executor()
        await sink.close()
        await receiver.stop()
        r.reader.close()
        store.close()


def dead_and_errors(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT e.id, d.state, d.last_error FROM deliveries d JOIN events e ON e.seq = d.seq "
        "WHERE d.sink = 'wms' ORDER BY d.seq"
    ).fetchall()
    names = {0: "pending", 1: "delivered", 2: "dead"}
    return [{"id": i, "state": names[st], "last_error": err} for i, st, err in rows]


def assert_keys_are_functions_of_ids(rec: KeyedReceiver) -> None:
    by_key: dict[str, set[tuple[str, ...]]] = {}
    by_ids: dict[tuple[str, ...], set[str]] = {}
    for key, ids in rec.keyed:
        by_key.setdefault(key, set()).add(ids)
        by_ids.setdefault(ids, set()).add(key)
    assert all(len(v) == 1 for v in by_key.values()), "one key for different sets of events"
    assert all(len(v) == 1 for v in by_ids.values()), "the same events under different keys"


# --- item 1: nothing delivered is sent again -----------------------------------------------


async def test_events_read_from_the_outbox_are_not_sent_again_after_an_idle_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's broker-outage case: the dispatcher reads the outbox (here after its feed
    overflowed), sends what the feed also holds, goes idle and rescans: it must not send
    those events again from the feed."""
    monkeypatch.setattr(dispatcher_mod, "RESCAN_SECS", 0.01)
    async with rig(tmp_path) as r:
        # A partial batch lingers (as in the agent): its settles are durable by the time the
        # outbox is found empty, and the rescan is due right then.
        d = r.make_dispatcher(linger_secs=0.05)
        d.feed.max_items = 5
        await r.emit([bev(i) for i in range(10)])  # overflows the feed: read from the outbox
        await r.emit([bev(i) for i in range(10, 15)])  # in the feed and in the outbox
        assert d.feed.overflows == 1 and len(d.feed.items) == 5
        r.start()
        await eventually(lambda: len(r.receiver.events) == 15 and r.pending() == 0, "delivery")
        await r.rescans(3)
        await r.emit([bev(15)])
        await eventually(lambda: len(r.receiver.events) == 16, "the next event")
        assert r.receiver.duplicates == 0, [e["id"] for e in r.receiver.redelivered]
        assert r.unique_ids() == [bev(i).id for i in range(16)]
        assert_keys_are_functions_of_ids(r.receiver)


async def test_a_healthy_receiver_gets_each_event_once_through_rescans_overflows_replays_and_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_mod, "RESCAN_SECS", 0.01)
    async with rig(tmp_path, batch_max_events=7) as r:
        d = r.make_dispatcher(linger_secs=0.02)
        d.feed.max_items = 12
        r.start()
        n = 0
        for step in range(40):
            size = (3, 1, 20, 5)[step % 4]  # some commits overflow the feed
            events = [bev(i) for i in range(n, n + size)]
            n += size
            if step % 5 == 2:
                events.append(bev(n - size - 1))  # a replayed id: the feed is reset
            if step % 7 == 3:
                await r.receiver.control({"fail_next": 2, "status": 503})  # transient, not received
            await r.emit(events)
            if step % 3 == 0:
                await r.rescans(1)
        await eventually(lambda: len(r.receiver.events) == n and r.pending() == 0, "delivery")
        await r.rescans(3)
        assert r.receiver.duplicates == 0, [e["id"] for e in r.receiver.redelivered][:20]
        assert r.unique_ids() == [bev(i).id for i in range(n)]  # in order
        assert r.receiver.statuses[503] >= 10
        assert_keys_are_functions_of_ids(r.receiver)


class RacingCommitter(Committer):
    """Lands a group commit of ``race_events`` just before the next read of the outbox from
    its start (a rescan), as happens all the time under load: deterministic here."""

    race_events: list[BusinessEvent] = []

    async def run_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.race_events and getattr(fn, "__name__", "") == "fetch_pending" and args[1] == 0:
            self.batch.events.extend(self.race_events)
            self.race_events = []
            await self.flush()
        return await super().run_db(fn, *args)


async def test_events_a_rescan_read_from_the_outbox_are_not_sent_again_from_the_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's case: an idle rescan reads the outbox from its start just after new events
    were committed: it sends them from the outbox, and the feed holds them too. The next
    rescan must not make the dispatcher send them again from the feed (it did: up to the
    feed's 10,000 events, in full batches under new batch keys)."""
    monkeypatch.setattr(dispatcher_mod, "RESCAN_SECS", 0.05)
    async with rig(tmp_path, committer_cls=RacingCommitter) as r:
        await r.receiver.control({"delay_ms": 100})  # a send outlasts the rescan period
        d = r.make_dispatcher(linger_secs=0.02)
        r.start()
        await r.emit([bev(0)])
        await eventually(lambda: len(r.receiver.events) == 1, "the first event")
        assert isinstance(r.committer, RacingCommitter)
        r.committer.race_events = [bev(i) for i in range(1, 6)]
        await eventually(lambda: len(r.receiver.events) == 6 and r.pending() == 0, "delivery")
        await r.rescans(3)
        assert r.receiver.duplicates == 0, [e["id"] for e in r.receiver.redelivered]
        assert r.unique_ids() == [bev(i).id for i in range(6)]
        assert_keys_are_functions_of_ids(r.receiver)
        assert d.delivered == 6


async def test_a_dead_letter_put_back_by_an_operator_is_sent_once_and_nothing_else_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_mod, "RESCAN_SECS", 0.02)
    async with rig(tmp_path) as r:
        bad = bev(3)
        await r.receiver.control({"reject_ids": [bad.id]})
        d = r.start()
        await r.emit([bev(i) for i in range(8)])
        await eventually(lambda: d.delivered == 7 and d.dead == 1 and r.pending() == 0, "settles")
        await r.receiver.control({"mode": "ok"})
        assert await r.committer.run_db(r.store.retry_dead) == 1  # `edge-agent outbox retry`
        await eventually(lambda: len(r.receiver.events) == 8 and r.pending() == 0, "the retry")
        await r.rescans(3)
        assert r.receiver.duplicates == 0
        assert r.unique_ids()[-1] == bad.id


# --- item 5: one rejected event does not collapse the batch rate ----------------------------


async def test_one_rejected_event_in_a_full_batch_is_isolated_in_log_n_requests(tmp_path: Path) -> None:
    n = 256
    events = [bev(i) for i in range(n)]
    bad = events[100]
    async with rig(tmp_path, batch_max_events=n) as r:
        await r.receiver.control({"reject_ids": [bad.id], "reject_status": 422})
        await r.emit(events)
        d = r.start()
        await eventually(lambda: d.delivered + d.dead == n and r.pending() == 0, "settles")
        assert r.receiver.requests <= 1 + 2 * math.ceil(math.log2(n))
        assert r.receiver.duplicates == 0
        assert r.unique_ids() == [e.id for e in events if e is not bad]
        (dead,) = [e for e in r.rows().values() if e["state"] == "dead"]
        assert dead["id"] == bad.id
        assert dead["last_error"].startswith("HTTP 422: ") and bad.id in dead["last_error"]


# --- item 10: a receiver's garbage is neither logged raw nor stored raw ---------------------


GARBAGE = (
    b"bad\x00\x00 event\r\n2026-01-01 ERROR forged log line\x1b[31m red\xe2\x80\xae\x7f\xff"
    + b"z" * 60_000
)


@pytest.fixture
async def garbage_url() -> AsyncIterator[tuple[str, list[int]]]:
    """A receiver that rejects the first request for good and fails the next transiently,
    each time with a body of NULs, control characters, bad UTF-8 and 60 KB of text."""
    calls: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        calls.append(1)
        status = {1: 422, 2: 503}.get(len(calls), 200)
        return web.Response(status=status, body=GARBAGE, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/events", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/events", calls
    await runner.cleanup()


def assert_one_bounded_printable_line(text: str, limit: int) -> None:
    assert text.isprintable(), repr(text[:300])
    assert len(text) <= limit, len(text)


async def test_garbage_response_bodies_are_logged_and_stored_as_one_bounded_printable_line(
    tmp_path: Path, garbage_url: tuple[str, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    url, calls = garbage_url
    store = Store(tmp_path / "outbox.db")
    committer = Committer(store, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(committer.run())
    sink = HttpSink("wms", HttpSinkConfig(kind="http", url=url, mode="single"))
    await sink.start()
    d = Dispatcher(sink, committer, initial_backoff_secs=0.01, max_backoff_secs=0.02, linger_secs=0)
    caplog.set_level(logging.INFO, logger="edge_agent.outbox.dispatcher")
    dtask = asyncio.create_task(d.run())
    reader = sqlite3.connect(str(store.path))
    try:
        committer.batch.events.extend([bev(1), bev(2)])
        committer.changed()
        await eventually(lambda: d.dead == 1 and d.delivered == 1, "settles")
        seen_error = d.last_error
        await eventually(
            lambda: [e["state"] for e in dead_and_errors(reader)] == ["dead", "delivered"],
            "durable settles",
        )
        rows = {e["id"]: e for e in dead_and_errors(reader)}
    finally:
        reader.close()
        d.stop()
        await asyncio.wait_for(dtask, 10)
        committer.close()
        await asyncio.wait_for(ctask, 10)
        committer.shutdown_executor()
        await sink.close()
    assert len(calls) == 3
    store.close()
    dead, retried = rows[bev(1).id], rows[bev(2).id]
    assert dead["state"] == "dead" and dead["last_error"].startswith("HTTP 422: bad\\x00\\x00 event ")
    assert_one_bounded_printable_line(dead["last_error"], 1100)
    assert retried["state"] == "delivered"  # its transient error was recorded on the way
    assert seen_error is None  # cleared by the success
    records = [r for r in caplog.records if r.name == "edge_agent.outbox.dispatcher"]
    assert any("rejected" in r.getMessage() for r in records)
    assert any("will retry" in r.getMessage() for r in records)
    for rec in records:
        assert_one_bounded_printable_line(rec.getMessage(), 700)


async def test_a_transient_garbage_error_is_kept_as_one_bounded_printable_line(
    tmp_path: Path, garbage_url: tuple[str, list[int]]
) -> None:
    url, calls = garbage_url
    calls.append(1)  # skip the 422: the first answer is the 503
    store = Store(tmp_path / "outbox.db")
    committer = Committer(store, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(committer.run())
    sink = HttpSink("wms", HttpSinkConfig(kind="http", url=url, mode="single"))
    await sink.start()
    d = Dispatcher(sink, committer, initial_backoff_secs=5, max_backoff_secs=5, linger_secs=0)
    dtask = asyncio.create_task(d.run())
    reader = sqlite3.connect(str(store.path))
    try:
        committer.batch.events.append(bev(1))
        committer.changed()
        await eventually(lambda: d.state == "backoff", "the transient failure")
        assert d.last_error is not None
        assert_one_bounded_printable_line(d.last_error, 600)
        await eventually(
            lambda: [e["last_error"] for e in dead_and_errors(reader)] != [None],
            "the recorded attempt",
        )
        (row,) = dead_and_errors(reader)
        assert row["state"] == "pending"
        assert_one_bounded_printable_line(row["last_error"], 600)
        assert "HTTP 503: bad\\x00\\x00 event " in row["last_error"]
    finally:
        reader.close()
        d.stop()
        await asyncio.wait_for(dtask, 10)
        committer.close()
        await asyncio.wait_for(ctask, 10)
        committer.shutdown_executor()
        await sink.close()
        store.close()
