"""A full disk pauses ingest, retries the same batch and resumes by itself (issue 8 item 3).

SQLITE_FULL is made without root by lowering ``PRAGMA max_page_count`` on the store's own
connection; a real small filesystem (tmpfs) is used too where we may mount one (root).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess

import pytest

from edge_agent.errors import StoreError
from edge_agent.events import BusinessEvent, envelope
from edge_agent.outbox.batch import Batch
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.store import Store

ROUTES = {"carton_closed": ["wms", "bus"]}


def bev(i: int) -> BusinessEvent:
    ev = BusinessEvent(f"id-{i}", "carton_closed", f"C{i}", 1_800_000_000.0 + i, "src",
                       {"n": i, "pad": "x" * 600})
    envelope(ev, "s1")
    return ev


def fill_until_full(s: Store) -> None:
    """Leave the database with no room for one more page."""
    pages = s.conn.execute("PRAGMA page_count").fetchone()[0]
    s.conn.execute(f"PRAGMA max_page_count={pages + 2}")


async def eventually(cond, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_full_disk_is_named_as_such_and_the_store_stays_usable(tmp_path):
    s = Store(tmp_path / "o.db")
    fill_until_full(s)
    b = Batch()
    b.events += [bev(i) for i in range(200)]
    with pytest.raises(StoreError) as ei:
        s.commit(b.seal(ROUTES, 1.0, 1))
    msg = str(ei.value)
    assert "full" in msg and "rollback" not in msg, msg  # the real cause, not the rollback's
    assert not s.conn.in_transaction
    s.conn.execute("PRAGMA max_page_count=1073741823")  # space is back
    assert s.commit(b.seal(ROUTES, 1.0, 1)) is True
    assert s.stats()["events"] == 200
    s.close()


async def test_disk_full_pauses_ingest_retries_the_same_batch_and_resumes(tmp_path, caplog):
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    pressure: list[tuple[str, str | None]] = []
    c.on_pressure = lambda kind, detail: pressure.append((kind, detail))
    task = asyncio.create_task(c.run())
    fill_until_full(s)
    acked: list[int] = []
    for i in range(200):
        c.batch.events.append(bev(i))
        c.batch.inputs.append((f"m{i}", 1.0))
        c.batch.acks.append(lambda i=i: acked.append(i))
    c.changed()
    with caplog.at_level(logging.WARNING, logger="edge_agent.outbox.committer"):
        await eventually(lambda: pressure, what="the pause")
        assert pressure[0][0] == "disk_full" and pressure[0][1] is not None
        assert str(tmp_path / "o.db") in pressure[0][1] and "free" in pressure[0][1]
        # Several retries while full: still not acknowledged, the committer still alive.
        n0 = c.full_retries
        await eventually(lambda: c.full_retries >= n0 + 2, what="retries")
        assert acked == [] and not task.done()
        # More device messages arrive meanwhile (already read): they wait for the next commit.
        c.batch.events.append(bev(999))
        c.batch.acks.append(lambda: acked.append(999))
        c.changed()
        await c.run_db(s.conn.execute, "PRAGMA max_page_count=1073741823")  # space returns
        await eventually(lambda: len(acked) == 201, what="acks after space returned")
    assert acked == [*range(200), 999]  # in order, each once
    assert pressure == [pressure[0], ("disk_full", None)]
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "disk full" in m]) == 1, said  # said once, in plain words
    assert "room again" in said[-1]
    c.close()
    await asyncio.wait_for(task, 10)
    c.shutdown_executor()
    st = s.stats()
    assert st["events"] == 201 and st["sinks"]["wms"]["pending"] == 201  # nothing duplicated
    assert s.conn.execute("SELECT count(*) FROM inputs").fetchone()[0] == 200
    s.close()


@pytest.fixture
def small_fs(small_tmpfs):
    return small_tmpfs("2m")


async def test_a_real_full_filesystem_pauses_and_resumes_without_loss(small_fs):
    s = Store(small_fs / "o.db")
    c = Committer(s, ROUTES, interval_ms=1)
    pressure: list[tuple[str, str | None]] = []
    c.on_pressure = lambda kind, detail: pressure.append((kind, detail))
    task = asyncio.create_task(c.run())
    acked: list[int] = []
    i = 0
    while not pressure:  # feed batches until the filesystem is full
        assert i < 20_000, "the filesystem never filled"
        for _ in range(50):
            c.batch.events.append(bev(i))
            c.batch.acks.append(lambda i=i: acked.append(i))
            i += 1
        c.changed()
        await eventually(lambda: not c.batch or pressure, what="a commit")
    assert pressure[0][0] == "disk_full"
    n0 = c.full_retries
    await eventually(lambda: c.full_retries >= n0 + 1, what="a retry")
    assert len(acked) < i and not task.done()
    # Space returns: grow the filesystem.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True, timeout=10)
    await eventually(lambda: len(acked) == i, what="acks after space returned")
    assert acked == list(range(i))
    assert pressure[-1] == ("disk_full", None)
    c.close()
    await asyncio.wait_for(task, 10)
    c.shutdown_executor()
    assert s.stats()["events"] == i
    s.close()
    con = sqlite3.connect(small_fs / "o.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
