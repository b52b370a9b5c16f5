"""Remembered device message ids: exact dedup with bounded memory (issue 8 item 9).

The engine must recognise a redelivered message id for the whole dedup retention, however
many ids that is, without holding them all in memory: memory stays flat whatever the rate.
"""

from __future__ import annotations

import tracemalloc

from edge_agent.events import DeviceEvent
from edge_agent.outbox.committer import Committer
from edge_agent.outbox.store import Store
from edge_agent.rules.engine import Engine
from edge_agent.runtime.clock import ManualClock

ROUTES: dict[str, list[str]] = {}
N = 500_000
PER_SEC = 2000  # ids per second of (manual) clock: 250 s for N, well within the retention
RETENTION = 900
MAX_BYTES = 24 * 2**20  # today's OrderedDict of 500,000 ids takes ~90 MB


def msg(i: int, t: float) -> DeviceEvent:
    return DeviceEvent("SCN1", "read", {}, t, t, f"SCN1/read/{i}")


def make(path, clock) -> tuple[Store, Committer, Engine]:
    s = Store(path)
    c = Committer(s, ROUTES, interval_ms=0)
    return s, c, Engine([], c, clock, site="s1", dedup_retention_secs=RETENTION)


async def test_remembered_ids_use_bounded_memory_and_old_redeliveries_are_still_dropped(tmp_path):
    clock = ManualClock()
    s, c, eng = make(tmp_path / "o.db", clock)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(N):
        eng.device_event(msg(i, clock.now()), None)
        if i % PER_SEC == PER_SEC - 1:
            await c.flush()
            clock.advance(1.0)
            eng.tick()
    await c.flush()
    eng.tick()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert eng.counters["device_events"] == N and eng.counters["duplicates"] == 0
    assert grown < MAX_BYTES, f"remembered ids take {grown / 2**20:.0f} MB for {N} ids"

    # An old id (long out of any in-memory window, within retention) is still a duplicate;
    # fresh ids are not (no false "duplicate" drops a real message).
    eng.device_event(msg(5, clock.now()), None)
    eng.device_event(msg(N // 2, clock.now()), None)
    assert eng.counters["duplicates"] == 2
    for i in range(N, N + 20_000):
        eng.device_event(msg(i, clock.now()), None)
    assert eng.counters["duplicates"] == 2
    await c.flush()
    c.shutdown_executor()
    s.close()

    # After a restart too.
    clock.advance(10)
    s, c, eng = make(tmp_path / "o.db", clock)
    eng.restore(s.load_rule_state(), s.load_inputs(clock.now() - RETENTION))
    eng.device_event(msg(7, clock.now()), None)
    eng.device_event(msg(N + 10, clock.now()), None)
    assert eng.counters["duplicates"] == 2
    eng.device_event(msg(N + 20_000, clock.now()), None)
    assert eng.counters["duplicates"] == 2 and eng.counters["device_events"] == 1
    # Past the retention an id is forgotten, in memory and in the outbox alike.
    clock.advance(RETENTION + 1)
    eng.tick()
    eng.device_event(msg(9, clock.now()), None)
    assert eng.counters["duplicates"] == 2 and eng.counters["device_events"] == 2
    await c.flush()
    c.shutdown_executor()
    s.close()


async def test_an_id_not_yet_committed_is_a_duplicate_whatever_the_memory_bound(tmp_path):
    """The in-memory window never forgets an id before it is durable in the outbox."""
    clock = ManualClock()
    s, c, eng = make(tmp_path / "o.db", clock)
    n = 60_000  # more than any in-memory window, all in one uncommitted batch
    for i in range(n):
        eng.device_event(msg(i, clock.now()), None)
    eng.tick()
    eng.device_event(msg(0, clock.now()), None)
    assert eng.counters["duplicates"] == 1
    await c.flush()
    eng.tick()
    eng.device_event(msg(1, clock.now()), None)
    assert eng.counters["duplicates"] == 2
    c.shutdown_executor()
    s.close()


def test_restore_streams_ids_from_the_outbox(tmp_path):
    """At start the ids are read as a stream, not as one list held in memory."""
    s = Store(tmp_path / "o.db")
    rows = s.load_inputs(0.0)
    assert not isinstance(rows, list)
    s.close()
