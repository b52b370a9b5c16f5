"""The outbox never deadlocks on a disk it filled itself (issue 8 item 3).

When the outbox fills its filesystem, the sinks catching up must still be able to mark
their deliveries done (settles), so that delivered events can be pruned, the file shrink,
and ingest resume by itself. Two guards, each tested here:

- a free-space reserve checked at every commit (``outbox.min_free_disk_mb`` /
  ``min_free_disk_percent``): ingest pauses while there is still room for settles, pruning
  and checkpoints, and resumes (with hysteresis) once the room is back;
- should the wall be hit anyway, settles are committed on their own while a batch that
  does not fit is held (they are never stuck behind it).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest

from edge_agent.errors import StoreError
from edge_agent.events import BusinessEvent, envelope
from edge_agent.outbox.batch import Batch, Settle
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.store import DELIVERED, Store
from tests.unit.conftest import outbox_site

ROUTES = {"carton_closed": ["wms", "bus"]}
MB = 2**20


def bev(i: int, type_: str = "carton_closed") -> BusinessEvent:
    ev = BusinessEvent(f"id-{i}", type_, f"C{i}", 1_800_000_000.0 + i, "src",
                       {"n": i, "pad": "x" * 600})
    envelope(ev, "s1")
    return ev


async def eventually(cond, timeout: float = 60.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def delivered_count(path: Path) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM deliveries WHERE state = 1").fetchone()[0]
    finally:
        con.close()


async def test_settles_are_committed_while_a_batch_that_does_not_fit_is_held(tmp_path):
    """The wall is ``max_page_count`` here (no root needed): the dispatchers' settles, added
    while a full batch is retried, become durable anyway; pruning then makes room and the
    held batch goes through by itself, its acks after it, in order, once."""
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    pressure: list[tuple[str, str | None]] = []
    c.on_pressure = lambda kind, detail: pressure.append((kind, detail))
    task = asyncio.create_task(c.run())
    for k in range(0, 2000, 500):  # owed to both sinks, not delivered yet
        c.batch.events += [bev(i) for i in range(k, k + 500)]
        await c.flush()
    pages = await c.run_db(lambda: s.conn.execute("PRAGMA page_count").fetchone()[0])
    await c.run_db(s.conn.execute, f"PRAGMA max_page_count={pages + 2}")  # no room left
    acked: list[int] = []
    for i in range(2000, 2400):
        c.batch.events.append(bev(i))
        c.batch.inputs.append((f"m{i}", 1.0))
        c.batch.acks.append(lambda i=i: acked.append(i))
    c.changed()
    await eventually(lambda: pressure, what="the disk-full pause")
    assert pressure[0][0] == "disk_full" and acked == []
    # The sinks catch up meanwhile: what they delivered is settled...
    pending = {sink: await c.run_db(s.fetch_pending, sink, 0, 10_000) for sink in ("wms", "bus")}
    assert [len(v) for v in pending.values()] == [2000, 2000]
    c.batch.settles += [Settle(sink, p.seq, DELIVERED, None, 2.0)
                        for sink, ps in pending.items() for p in ps]
    c.changed()
    # ...durably, although the held batch still does not fit.
    await eventually(lambda: delivered_count(tmp_path / "o.db") == 4000,
                     what="settles durable while a batch is held")
    assert acked == [] and not task.done()
    # Maintenance prunes what was delivered: room again, the held batch goes through.
    n = 0
    while k := await c.run_db(lambda: s.prune_step(inputs_before=0.0, delivered_before=1e12)):
        n += k
    assert n >= 2000
    await eventually(lambda: len(acked) == 400, what="the held batch's acks")
    assert acked == list(range(2000, 2400))
    assert pressure[-1] == ("disk_full", None)
    c.close()
    await asyncio.wait_for(task, 10)
    c.shutdown_executor()
    st = s.stats()
    assert st["events"] == 400 and st["sinks"]["wms"] == {"pending": 400, "delivered": 0, "dead": 0}
    s.close()


def test_a_settles_only_commit_needs_no_new_page(tmp_path):
    """What the reserve is for: settles rewrite pages already there."""
    s = Store(tmp_path / "o.db")
    b = Batch()
    b.events += [bev(i) for i in range(300)]
    sealed = b.seal(ROUTES, 1.0, 1)
    s.commit(sealed)
    pages = s.conn.execute("PRAGMA page_count").fetchone()[0]
    s.conn.execute(f"PRAGMA max_page_count={pages}")
    b = Batch()
    b.settles += [Settle(sink, seq, DELIVERED, None, 2.0) for sink, seq, _ in sealed.routes]
    s.commit(b.seal(ROUTES, 1.0, 301))
    assert s.stats()["sinks"]["wms"]["delivered"] == 300
    s.close()


async def test_ingest_pauses_under_the_free_space_floor_and_resumes_at_twice_it(tmp_path):
    """Checked at every commit, from the filesystem itself (any disk will do: the floor is
    set from what is free now)."""
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=0)
    pressure: list[tuple[str, str | None]] = []
    c.on_pressure = lambda kind, detail: pressure.append((kind, detail))
    free = s.free_bytes()
    c.min_free_bytes = free + 512 * MB  # under it already
    c.batch.events.append(bev(1))
    await c.flush()
    assert [k for k, _ in pressure] == ["disk_low"] and c.low_disk and c.crowded.is_set()
    assert str(tmp_path / "o.db") in pressure[0][1] and "MB free" in pressure[0][1]
    c.min_free_bytes = int(free * 0.7)  # over the floor, not yet twice it: still paused
    c.batch.events.append(bev(2))
    await c.flush()
    assert len(pressure) == 1 and c.low_disk
    c.min_free_bytes = free // 4  # twice the floor is free: resumed, said once
    c.batch.events.append(bev(3))
    await c.flush()
    assert pressure[1:] == [("disk_low", None)] and not c.low_disk
    c.batch.events.append(bev(4))
    await c.flush()
    assert len(pressure) == 2
    c.shutdown_executor()
    assert s.stats()["events"] == 4
    s.close()


def test_the_reserve_file_is_released_when_a_write_finds_the_disk_full(tmp_path):
    s = Store(tmp_path / "o.db")
    assert s.make_reserve(MB) and s.reserve_path.stat().st_blocks * 512 >= MB
    assert abs(s.free_for_ingest() - s.free_bytes()) < MB // 2  # (others write on this disk)
    pages = s.conn.execute("PRAGMA page_count").fetchone()[0]
    s.conn.execute(f"PRAGMA max_page_count={pages}")
    b = Batch()
    b.events += [bev(i) for i in range(100)]
    with pytest.raises(StoreError, match="full"):
        s.commit(b.seal(ROUTES, 1.0, 1))
    assert not s.reserve_path.exists() and not s.reserve_held
    assert abs(s.free_for_ingest() - (s.free_bytes() - MB)) < MB // 2  # as if still held
    assert s.make_reserve(MB) and s.reserve_held
    s.close()


# --- a real small filesystem (root) --------------------------------------------------------

@pytest.fixture
def small_fs(small_tmpfs):
    return small_tmpfs("8m")

def _agent(tmp_path: Path, db: Path, extra: str = ""):
    from edge_agent.agent import Agent
    from edge_agent.config import load_site

    f = tmp_path / "site.yaml"
    f.write_text(outbox_site(db, extra))
    site, profiles = load_site(f)
    agent = Agent(site, profiles, base_dir=tmp_path)
    agent._build()
    return agent


async def _fill_until_paused(agent, acked: list[int], start: int = 0) -> int:
    """Feed events (each with its ack) as connectors would, until ingest pauses."""
    c = agent.committer
    i = start
    while not agent.ingest_paused:
        assert i < start + 100_000, "ingest never paused"
        for _ in range(50):
            c.batch.events.append(bev(i, "equipment_fault"))
            c.batch.inputs.append((f"m{i}", 1.0))
            c.batch.acks.append(lambda i=i: acked.append(i))
            i += 1
        c.changed()
        await eventually(lambda: not c.batch or agent.ingest_paused, what="a commit")
    return i


async def _deliver_everything(agent) -> dict[str, set[str]]:
    """The sinks come back: every pending delivery is settled, as dispatchers do (in
    batches of 500); returns the event ids settled, by sink."""
    c = agent.committer
    out: dict[str, set[str]] = {}
    for sink in agent.site.sinks:
        rows = await c.run_db(agent.store.fetch_pending, sink, 0, 1_000_000)
        for k in range(0, len(rows), 500):
            c.batch.settles += [Settle(sink, p.seq, DELIVERED, None, 2.0) for p in rows[k:k + 500]]
            c.changed()
            await asyncio.sleep(0.005)
        out[sink] = {p.id for p in rows}
    return out


async def test_an_outbox_that_filled_its_disk_frees_it_and_resumes_by_itself(tmp_path, small_fs):
    agent = _agent(tmp_path, small_fs / "o.db")
    c, store = agent.committer, agent.store
    tasks = [asyncio.create_task(c.run()), asyncio.create_task(agent._maintenance())]
    try:
        acked: list[int] = []
        i = await _fill_until_paused(agent, acked)
        assert set(agent.pause_causes) & {"disk_full", "disk_low"}, agent.pause_causes
        assert agent.status()["ingest_paused"]
        # The sinks catch up; nothing else is done from outside.
        settled = await _deliver_everything(agent)
        assert settled["wms"] and settled["wms"] == settled["erp"]
        await eventually(lambda: not agent.ingest_paused, what="ingest resumed by itself")
        await eventually(lambda: len(acked) == i, what="every ack")
        assert acked == list(range(i))  # each once, in order
        assert not agent.pause_causes and c.full_since is None and not c.low_disk
        # What was delivered is pruned and its space given back, the reserve file held again.
        await eventually(lambda: shutil.disk_usage(small_fs).free > 4 * MB, what="space back")
        await eventually(lambda: store.reserve_held, what="the reserve file made again")
        # Ingest works again.
        j = i + 200
        for k in range(i, j):
            c.batch.events.append(bev(k, "equipment_fault"))
            c.batch.acks.append(lambda k=k: acked.append(k))
        c.changed()
        await eventually(lambda: len(acked) == j, what="acks after the resume")
        # Nothing lost, nothing duplicated: what was not delivered is owed, once.
        for sink in ("wms", "erp"):
            owed = [p.id for p in await c.run_db(store.fetch_pending, sink, 0, 1_000_000)]
            assert len(owed) == len(set(owed))
            assert set(owed) == {f"id-{k}" for k in range(j)} - settled[sink]
        ids = await c.run_db(lambda: store.conn.execute(
            "SELECT count(*), count(DISTINCT id) FROM events").fetchone())
        assert ids[0] == ids[1]
    finally:
        c.close()
        tasks[1].cancel()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:  # a batch still held on a full disk keeps the committer running
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        c.shutdown_executor()
        store.close()
    con = sqlite3.connect(small_fs / "o.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
