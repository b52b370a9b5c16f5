"""The outbox store, group commit, dispatcher and engine, against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from edge_agent.errors import RetriableError, StoreError
from edge_agent.events import BusinessEvent, DeviceEvent, envelope
from edge_agent.outbox.batch import Batch, Settle
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.dispatcher import Dispatcher, backoff_delay
from edge_agent.outbox.store import DEAD, DELIVERED, PENDING, Pending, Store
from edge_agent.rules.engine import Engine
from edge_agent.runtime.clock import ManualClock
from edge_agent.sinks.base import SendIncomplete

ROUTES = {"carton_closed": ["wms", "bus"], "scan_no_read": ["wms"]}


def bev(i: int, type_: str = "carton_closed") -> BusinessEvent:
    ev = BusinessEvent(f"id-{i}", type_, f"C{i}", 1_800_000_000.0 + i, "src", {"n": i})
    envelope(ev, "s1")
    return ev


def commit(store: Store, *events: BusinessEvent, **kw) -> None:
    b = Batch()
    b.events.extend(events)
    for k, v in kw.items():
        setattr(b, k, v)
    store.commit(b.seal(ROUTES, 1.0, store.max_seq() + 1))


def test_store_is_durable_and_verified_at_open(tmp_path):
    s = Store(tmp_path / "o.db")
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    s.close()


def test_store_refuses_a_database_that_cannot_be_wal(tmp_path):
    # An in-memory database cannot use WAL: the store must refuse rather than run unsafe.
    with pytest.raises(StoreError, match="not durable"):
        Store(":memory:")


def test_commit_routes_each_event_to_its_sinks_once(tmp_path):
    s = Store(tmp_path / "o.db")
    commit(s, bev(1), bev(2, "scan_no_read"))
    commit(s, bev(1))  # the same deterministic id again (a replay): no second event
    st = s.stats()
    assert st["events"] == 2
    assert st["sinks"] == {"wms": {"pending": 2, "delivered": 0, "dead": 0},
                           "bus": {"pending": 1, "delivered": 0, "dead": 0}}
    rows = s.fetch_pending("wms", 0, 10)
    assert [r.id for r in rows] == ["id-1", "id-2"]
    assert rows[0].body.startswith('{"specversion":"1.0","id":"id-1"')


def test_settle_and_fetch_after_cursor(tmp_path):
    s = Store(tmp_path / "o.db")
    commit(s, *(bev(i) for i in range(5)))
    rows = s.fetch_pending("wms", 0, 3)
    assert len(rows) == 3
    assert [r.id for r in s.fetch_pending("wms", rows[-1].seq, 10)] == ["id-3", "id-4"]
    commit(s, settles=[Settle("wms", rows[0].seq, DELIVERED, None, 2.0),
                       Settle("wms", rows[1].seq, DEAD, "HTTP 422: no", 2.0)])
    assert [r.id for r in s.fetch_pending("wms", 0, 10)] == ["id-2", "id-3", "id-4"]
    dead = s.list_events(sink="wms", state=DEAD)
    assert [(d["id"], d["last_error"]) for d in dead] == [("id-1", "HTTP 422: no")]
    assert s.retry_dead(sink="wms") == 1
    assert [r.id for r in s.fetch_pending("wms", 0, 10)] == ["id-1", "id-2", "id-3", "id-4"]
    assert s.fetch_pending("bus", 0, 10)[0].id == "id-0"  # other sinks untouched


def test_rule_state_and_inputs_survive_reopen(tmp_path):
    s = Store(tmp_path / "o.db")
    b = Batch()
    b.state_changed("r1", "T1", {"t0": 1.0})
    b.state_changed("r1", "T2", {"t0": 2.0})
    b.inputs.append(("SCN1/read/1", 100.0))
    s.commit(b.seal(ROUTES, 1.0, s.max_seq() + 1))
    b = Batch()
    b.state_changed("r1", "T2", None)
    s.commit(b.seal(ROUTES, 1.0, s.max_seq() + 1))
    s.close()
    s = Store(tmp_path / "o.db")
    assert s.load_rule_state() == {"r1": {"T1": '{"t0":1.0}'}}
    assert list(s.load_inputs(50.0)) == [("SCN1/read/1", 100.0)]
    assert list(s.load_inputs(150.0)) == []


def test_prune_keeps_undelivered_events(tmp_path):
    s = Store(tmp_path / "o.db")
    commit(s, bev(1), bev(2))
    rows = {r.id: r.seq for r in s.fetch_pending("wms", 0, 10)}
    commit(s, settles=[Settle("wms", rows["id-1"], DELIVERED, None, 2.0),
                       Settle("bus", rows["id-1"], DELIVERED, None, 2.0),
                       Settle("wms", rows["id-2"], DELIVERED, None, 2.0)])
    assert s.prune(inputs_before=0, delivered_before=10.0) >= 1
    assert [r.id for r in s.fetch_pending("bus", 0, 10)] == ["id-2"]  # bus still owes id-2
    assert s.stats()["events"] == 1


async def test_committer_commits_state_only_batches_and_acks_after_commit(tmp_path):
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    task = asyncio.create_task(c.run())
    acked: list[int] = []

    def ack() -> None:  # the row must already be durable when the ack runs
        con = sqlite3.connect(tmp_path / "o.db")
        acked.append(con.execute("SELECT count(*) FROM rule_state").fetchone()[0])
        con.close()

    c.batch.state_changed("r", "k", {"x": 1})
    c.batch.acks.append(ack)
    c.changed()
    for _ in range(100):
        if acked:
            break
        await asyncio.sleep(0.01)
    assert acked == [1]
    c.close()
    await asyncio.wait_for(task, 5)
    c.shutdown_executor()


class ScriptedSink:
    """A sink whose answers are scripted per call; records what it was sent."""

    name = "wms"
    batch_max_events = 3

    def __init__(self, script):
        self.script = list(script)
        self.sent: list[list[str]] = []

    async def start(self): ...

    async def close(self): ...

    async def send(self, items: list[Pending]):
        self.sent.append([i.id for i in items])
        step = self.script.pop(0) if self.script else "ok"
        if step == "ok":
            return [None] * len(items)
        if step == "reject-first":
            return ["HTTP 422: bad"] + [None] * (len(items) - 1)
        if step == "partial":
            raise SendIncomplete([None], RetriableError("broke after one"))
        raise RetriableError("down", retry_after_secs=0.01)


async def test_dispatcher_retries_in_order_dead_letters_and_settles(tmp_path):
    s = Store(tmp_path / "o.db")
    commit(s, *(bev(i) for i in range(7)))
    c = Committer(s, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(c.run())
    sink = ScriptedSink(["down", "down", "reject-first", "partial", "ok", "ok"])
    d = Dispatcher(sink, c, initial_backoff_secs=0.001, max_backoff_secs=0.01)
    dtask = asyncio.create_task(d.run())
    for _ in range(300):
        if d.delivered + d.dead == 7:
            break
        await asyncio.sleep(0.01)
    d.stop()
    await asyncio.wait_for(dtask, 5)
    c.close()
    await asyncio.wait_for(ctask, 5)
    c.shutdown_executor()
    # The failed batch is resent as is, before anything behind it; a partial send resumes.
    assert sink.sent[:5] == [
        ["id-0", "id-1", "id-2"], ["id-0", "id-1", "id-2"], ["id-0", "id-1", "id-2"],
        ["id-3", "id-4", "id-5"], ["id-4", "id-5"],
    ]
    assert (d.delivered, d.dead) == (6, 1)
    st = s.stats()["sinks"]["wms"]
    assert st == {"pending": 0, "delivered": 6, "dead": 1}
    assert s.list_events(sink="wms", state=DEAD)[0]["id"] == "id-0"
    assert s.stats()["sinks"]["bus"]["pending"] == 7  # another sink is not touched


def test_backoff_is_capped_and_jittered():
    delays = [backoff_delay(a, 0.5, 10.0) for a in range(40)]
    assert all(0 <= x <= 10.0 for x in delays)
    assert len(set(delays)) > 30


def _engine(tmp_path, clock):
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES)
    return Engine([], c, clock, site="s1", dedup_retention_secs=60), c


def dev(msg_id: str, t: float) -> DeviceEvent:
    return DeviceEvent("SCN1", "read", {"tracking_id": "T1"}, t, t, msg_id)


def test_engine_drops_redeliveries_but_acks_them(tmp_path):
    clock = ManualClock()
    eng, c = _engine(tmp_path, clock)
    acks: list[str] = []
    eng.device_event(dev("SCN1/read/1@1.0", 1.0), lambda: acks.append("a"))
    eng.device_event(dev("SCN1/read/1@1.0", 1.0), lambda: acks.append("b"))
    eng.device_event(dev("SCN1/read/1@2.0", 2.0), lambda: acks.append("c"))  # counter reset
    assert eng.counters["duplicates"] == 1
    assert eng.counters["device_events"] == 2
    assert len(c.batch.acks) == 3  # every message is acked, after the commit
    assert [m for m, _ in c.batch.inputs] == ["SCN1/read/1@1.0", "SCN1/read/1@2.0"]


def test_engine_forgets_ids_after_retention(tmp_path):
    clock = ManualClock(start=1000.0)
    eng, _ = _engine(tmp_path, clock)
    eng.device_event(dev("m1", 1000.0), None)
    clock.advance(61)
    eng.tick()
    assert "m1" not in eng.seen


def test_engine_quarantines_bad_payloads(tmp_path):
    eng, c = _engine(tmp_path, ManualClock())
    eng.bad_payload("SCN1", "site/x/read", "not_json", "Expecting value", b"\xff" * 70_000, None)
    eng.bad_payload("SCN1", "site/x/read", "not_json", "again", b"{", None)
    assert eng.bad == {("SCN1", "not_json"): 2}
    q = c.batch.quarantine
    assert len(q) == 2 and len(q[0].payload) == 65_536  # bounded copy kept for inspection


def test_pending_constants_are_distinct():
    assert len({PENDING, DELIVERED, DEAD}) == 3


def test_event_id_is_uuid5_of_the_parts():
    import uuid

    from edge_agent.events import ID_NAMESPACE, event_id

    parts = ("dc-1", "close-station-1", "carton_closed", "T1", "SCN1/read/1@1.5", "CW1/weight/9@1.7")
    assert event_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))
    assert event_id(*parts) != event_id(*parts[:-1])


def test_a_replayed_event_id_is_not_stored_twice_and_keeps_its_seq(tmp_path):
    s = Store(tmp_path / "o.db")
    b = Batch()
    b.events.append(bev(1))
    assert s.commit(b.seal(ROUTES, 1.0, 1)) is True
    b = Batch()
    b.events += [bev(1), bev(2)]  # id-1 again (a replay), under a new seq
    assert s.commit(b.seal(ROUTES, 1.0, 2)) is False
    rows = s.fetch_pending("wms", 0, 10)
    assert [(r.seq, r.id) for r in rows] == [(1, "id-1"), (3, "id-2")]
    assert s.stats()["events"] == 2


class CountingStore(Store):
    fetches = 0

    def fetch_pending(self, *a):
        CountingStore.fetches += 1
        return super().fetch_pending(*a)


async def _deliver(c: Committer, d: Dispatcher, sink: ScriptedSink, n: int) -> None:
    for _ in range(300):
        if sum(len(x) for x in sink.sent) >= n:
            return
        await asyncio.sleep(0.01)


async def test_a_caught_up_dispatcher_takes_events_from_memory_and_reads_the_outbox_after_overflow(tmp_path):
    s = CountingStore(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(c.run())
    sink = ScriptedSink([])
    sink.batch_max_events = 1000
    d = Dispatcher(sink, c, linger_secs=0)
    dtask = asyncio.create_task(d.run())
    await asyncio.sleep(0.05)  # the dispatcher catches up on the empty outbox once
    before = CountingStore.fetches
    for i in range(50):
        c.batch.events.append(bev(i))
        c.changed()
        await asyncio.sleep(0.002)
    await _deliver(c, d, sink, 50)
    assert CountingStore.fetches == before  # nothing read back from SQLite
    # Overflow (as when a sink is down): the feed restarts and the outbox is read instead.
    d.feed.max_items = 5
    d.stop()
    await asyncio.wait_for(dtask, 5)
    for i in range(50, 80):
        c.batch.events.append(bev(i))
    c.changed()
    await asyncio.sleep(0.05)
    assert d.feed.overflows == 1
    d2 = Dispatcher(sink, c, linger_secs=0)
    d2.feed.max_items = 5
    d2.cursor = d.cursor
    d2task = asyncio.create_task(d2.run())
    await _deliver(c, d2, sink, 80)
    assert CountingStore.fetches > before
    sent = [i for batch in sink.sent for i in batch]
    assert sent == [f"id-{i}" for i in range(80)]  # each once, in order
    d2.stop()
    await asyncio.wait_for(d2task, 5)
    c.close()
    await asyncio.wait_for(ctask, 5)
    c.shutdown_executor()


async def test_an_idle_dispatcher_picks_up_dead_letters_put_back_by_an_operator(tmp_path, monkeypatch):
    import edge_agent.outbox.dispatcher as dispatcher_mod

    monkeypatch.setattr(dispatcher_mod, "RESCAN_SECS", 0.05)
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    ctask = asyncio.create_task(c.run())
    sink = ScriptedSink(["reject-first"])
    d = Dispatcher(sink, c, linger_secs=0)
    dtask = asyncio.create_task(d.run())
    c.batch.events += [bev(1), bev(2)]
    c.changed()
    for _ in range(100):
        if d.dead == 1 and d.delivered == 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the settles are committed
    assert await c.run_db(s.retry_dead) == 1  # as `edge-agent outbox retry` does
    for _ in range(100):
        if d.delivered == 2:
            break
        await asyncio.sleep(0.02)
    assert sink.sent[-1] == ["id-1"]
    d.stop()
    await asyncio.wait_for(dtask, 5)
    c.close()
    await asyncio.wait_for(ctask, 5)
    c.shutdown_executor()
