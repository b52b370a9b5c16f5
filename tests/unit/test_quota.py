"""The outbox's disk quota holds at every commit, and the outbox shrinks again (issue 8 item 4)."""

from __future__ import annotations

import os

from edge_agent.events import BusinessEvent, envelope
from edge_agent.outbox.batch import Batch, Settle
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.store import DELIVERED, Store
from tests.unit.conftest import outbox_site

ROUTES = {"carton_closed": ["wms"]}
MB = 2**20


def bev(i: int) -> BusinessEvent:
    ev = BusinessEvent(f"id-{i}", "carton_closed", f"C{i}", 1_800_000_000.0 + i, "src",
                       {"n": i, "pad": "x" * 900})
    envelope(ev, "s1")
    return ev


def on_disk(path) -> int:
    return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))


def fill(s: Store, n: int, start: int = 0, *, delivered: bool, created: float = 1.0) -> None:
    for k in range(start, start + n, 500):
        b = Batch()
        b.events += [bev(i) for i in range(k, min(k + 500, start + n))]
        sealed = b.seal(ROUTES, created, s.max_seq() + 1)
        s.commit(sealed)
        if delivered:
            b = Batch()
            b.settles += [Settle("wms", seq, DELIVERED, None, 2.0) for _, seq, _ in sealed.routes]
            s.commit(b.seal(ROUTES, created, s.max_seq() + 1))


def prune_all(s: Store, now: float, delivered_before: float) -> int:
    n = 0
    while k := s.prune_step(inputs_before=now - 900, delivered_before=delivered_before):
        n += k
    s.compact()
    return n


def test_pruning_delivered_events_shrinks_the_outbox_and_truncates_the_wal(tmp_path):
    s = Store(tmp_path / "o.db")
    s.set_limits(64 * MB)
    fill(s, 6000, delivered=True, created=1.0)
    fill(s, 500, 6000, delivered=False, created=1.0)  # still owed to the WMS: kept
    big = on_disk(tmp_path / "o.db")
    assert big > 5 * MB
    assert prune_all(s, now=100.0, delivered_before=50.0) >= 6000
    assert s.stats()["events"] == 500
    assert [r.id for r in s.fetch_pending("wms", 0, 1)] == ["id-6000"]
    small = on_disk(tmp_path / "o.db")
    assert small < big / 4, (small, big)  # the file itself shrank, and the WAL is gone
    assert s.wal_bytes == 0 and s.used_bytes <= small
    s.close()


def test_delivered_events_within_their_retention_are_kept(tmp_path):
    s = Store(tmp_path / "o.db")
    fill(s, 100, delivered=True, created=90.0)
    assert prune_all(s, now=100.0, delivered_before=50.0) == 0
    assert s.stats()["events"] == 100
    s.close()


async def test_the_quota_is_checked_at_every_commit_and_ingest_resumes_once_pruned(tmp_path):
    quota = 4 * MB
    s = Store(tmp_path / "o.db")
    c = Committer(s, ROUTES, interval_ms=0)
    pressure: list[tuple[str, str | None]] = []
    c.on_pressure = lambda kind, detail: pressure.append((kind, detail))
    c.quota_bytes = quota
    await c.run_db(s.set_limits, quota)
    biggest_commit = 0
    i = 0
    while not pressure:
        assert i < 50_000, "the quota never paused ingest"
        before = on_disk(tmp_path / "o.db")
        c.batch.events += [bev(k) for k in range(i, i + 100)]
        i += 100
        await c.flush()
        biggest_commit = max(biggest_commit, on_disk(tmp_path / "o.db") - before)
        # Disk never above quota + one commit, measured on the files themselves.
        assert on_disk(tmp_path / "o.db") <= quota + biggest_commit
    kind, detail = pressure[0]
    assert kind == "quota" and detail and "quota" in detail and str(tmp_path / "o.db") in detail
    assert c.over_quota
    # The sink catches up: everything is delivered, maintenance prunes and ingest resumes.
    seqs = [p.seq for p in await c.run_db(s.fetch_pending, "wms", 0, 100_000)]
    c.batch.settles += [Settle("wms", q, DELIVERED, None, 2.0) for q in seqs]
    await c.flush()
    assert pressure == [(kind, detail)]  # still paused: delivered rows are still there
    await c.run_db(prune_all, s, 1e12, 1e12)  # as maintenance does under pressure
    c.check_quota()
    assert pressure[-1] == ("quota", None) and not c.over_quota
    assert on_disk(tmp_path / "o.db") < quota * 0.9
    c.shutdown_executor()
    s.close()

async def test_the_agent_pauses_every_connector_while_any_cause_holds_and_status_says_why(tmp_path):
    from edge_agent.agent import Agent
    from edge_agent.config import load_site

    f = tmp_path / "site.yaml"
    f.write_text(outbox_site(tmp_path / "o.db", "  max_disk_mb: 16\n"))
    site, profiles = load_site(f)
    agent = Agent(site, profiles, base_dir=tmp_path)
    agent._build()
    conn = agent.connectors[0]
    assert conn._resumed.is_set()
    agent._on_pressure("quota", "outbox o.db holds 17 MB, over its quota of 16 MB")
    agent._on_pressure("disk_full", "disk full: cannot write o.db (0.0 MB free)")
    st = agent.status()
    assert st["ingest_paused"] and set(st["ingest_pause"]) == {"quota", "disk_full"}
    assert st["ingest_pause"]["quota"]["detail"].startswith("outbox o.db holds 17 MB")
    assert st["outbox"]["used_bytes"] > 0 and "quota_bytes" in st["outbox"]
    assert not conn._resumed.is_set() and agent.engine.paused
    agent._on_pressure("quota", None)
    assert agent.status()["ingest_paused"] and not conn._resumed.is_set()  # still full
    agent._on_pressure("disk_full", None)
    assert not agent.status()["ingest_paused"] and agent.status()["ingest_pause"] == {}
    assert conn._resumed.is_set() and not agent.engine.paused
    agent.committer.shutdown_executor()
    agent.store.close()
