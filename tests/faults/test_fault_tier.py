"""The short tier of the fault suite (``faults``), run by ``make test``.

Each test runs one scenario at its quick size against the real agent process, a real
mosquitto and real HTTP receivers, and fails with the scenario's ledger unless every target
holds: lost, invented, wrong, duplicate facts, out of order and re-sends to a healthy receiver
all 0, no agent exit but our kill -9s (and the scenario's own target, e.g. throughput under
rejections). ``make faults`` runs the same scenarios at full size.

A scenario whose fix (an item of issue 8) has not landed is marked xfail, not strict, with the
item: the coordinator removes the mark when the fix lands.

Not in this tier: ``opcua_cert`` and ``modbus`` (about 50 s each at their quick size on 2
cores, and judged partly on times: how soon the device is back online, no weighing left
unread). ``make faults`` runs them; their connector behaviour (items 6 and 7) is tested
against real servers in ``tests/integration/test_device_faults.py``.
"""

from __future__ import annotations

import pytest

from faults.scenarios import SCENARIOS, Result, run

# Generous: a quick scenario takes 20-60 s on 2 shared cores; a hung one must still end.
pytestmark = pytest.mark.timeout(420)


def _explain(r: Result) -> str:
    return "\n".join([f"{r.name}: {r.status} {r.reason}", *[f"missed: {m}" for m in r.misses],
                      *r.ledger_lines, *r.notes[-3:], *r.exit_tails[:1]])


def _run(name: str, tmp_path) -> Result:
    r = run(SCENARIOS[name], tmp_path / name, quick=True)
    if r.status == "SKIP":
        pytest.skip(r.reason)
    # A scenario that judged nothing proves nothing: it must have carried obligations.
    assert r.obligations > 0, _explain(r)
    assert r.status == "PASS", _explain(r)
    return r


def test_no_fault_no_resend(tmp_path):
    """Item 1: with every answer 200, nothing delivered is sent again."""
    _run("baseline", tmp_path)


def test_kill9_under_load_loses_nothing(tmp_path):
    r = _run("kill9", tmp_path)
    assert r.kills == SCENARIOS["kill9"].quick.kills


def test_wms_refused_503_429_then_drains(tmp_path):
    """The WMS down three ways; the ERP and the bus (healthy) get nothing twice; the backlog
    drains at 10x the ingest rate."""
    r = _run("wms_down", tmp_path)
    assert r.drain_per_s is not None


def test_broker_restart_no_exit_no_loss(tmp_path):
    """Item 2: the broker goes away and returns; every connection failure is retriable."""
    _run("broker_restart", tmp_path)


def test_rejects_keep_batching_and_nothing_resent(tmp_path):
    """Items 1, 5, 10: 5% rejected (422, then 400 with garbage bodies): the rest keeps
    flowing at the ingest rate, nothing delivered is sent again, the log holds no raw
    control characters from the WMS."""
    _run("rejects", tmp_path)
