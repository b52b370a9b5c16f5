"""The fault suite's own parts: the receiver's fault modes it relies on (over real HTTP) and
the ledger's verdicts on hand-made holdings."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from faults.ledger import Delivery, FactBook, Window, account_sink
from faults.publisher import Carton
from faults.rig import log_control_chars
from simulators.receiver import BATCH, ControlError, Receiver


def _ev(i: int) -> dict:
    return {"specversion": "1.0", "id": f"id-{i}", "type": "carton_closed", "source": "t",
            "subject": f"C{i}", "data": {"tracking_id": f"T{i}"}}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver("wms") as r:
        yield r


async def _post(r: Receiver, events: list[dict]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as c:
        return await c.post(f"http://127.0.0.1:{r.events_port}/events",
                            content=json.dumps(events), headers={"Content-Type": BATCH})


async def test_reject_fraction_rejects_the_same_ids_and_keeps_them(receiver):
    await receiver.control({"reject_fraction": 0.2})
    events = [_ev(i) for i in range(200)]
    rejected = []
    for ev in events:
        if (await _post(receiver, [ev])).status_code == 422:
            rejected.append(ev["id"])
    assert 10 < len(rejected) < 80  # about a fifth
    again = [ev["id"] for ev in events if ev["id"] in rejected]
    for i in again:  # the same ids again: rejected again, kept once
        assert (await _post(receiver, [next(e for e in events if e["id"] == i)])).status_code == 422
    assert sorted(r["id"] for r in receiver.rejected.values()) == sorted(rejected)
    assert {r["key"] for r in receiver.rejected.values()} == {
        f"T{i.split('-')[1]}" for i in rejected}
    assert len(receiver.events) == 200 - len(rejected)


async def test_garbage_body_on_failures(receiver):
    await receiver.control({"mode": "status", "status": 400, "body": "garbage"})
    r = await _post(receiver, [_ev(1)])
    assert r.status_code == 400
    assert b"\x00" in r.content and b"\x1b[" in r.content
    with pytest.raises(ControlError):
        await receiver.control({"body": "html"})
    with pytest.raises(ControlError):
        await receiver.control({"reject_fraction": 1.5})


def _carton(i: int, **kw) -> Carton:
    c = Carton(f"T{i}", f"C{i}", 1000.0 + i, noread=False, scan_sent=True, weight_sent=True,
               scan_acked=True, weight_acked=True)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _d(id_: str, type_: str, key: str, t: float, arrival: float, **data) -> Delivery:
    return Delivery(id_, type_, key, t, arrival, data)


def test_ledger_finds_lost_invented_dup_facts_and_healthy_resends():
    cartons = [_carton(1), _carton(2), _carton(3, weight_acked=False)]
    ds = [
        _d("a", "carton_closed", "T1", 1.0, 10.0, weight_g=1001.0, carton_id="C1"),
        _d("b", "carton_closed", "T1", 1.0, 11.0, weight_g=1001.0, carton_id="C1"),  # dup fact
        _d("a", "carton_closed", "T1", 1.0, 12.0, weight_g=1001.0, carton_id="C1"),  # re-send
        _d("c", "carton_exception", "T2", 1.0, 13.0),  # T2 closed: invented (and T2 lost)
        _d("e", "carton_closed", "T3", 1.0, 14.0, weight_g=1003.0, carton_id="C3"),  # may be
    ]
    r = account_sink("erp", ds, cartons, [])
    assert (r.lost, r.invented, r.dup_facts, r.dup_deliveries, r.healthy_resends) == (
        1, 1, 1, 1, 1), r.examples
    # a kill -9 between the first delivery and the repeat justifies it
    r = account_sink("erp", ds, cartons, [Window(11.5, 11.5, "kill -9")])
    assert (r.resends, r.healthy_resends) == (1, 0)


def test_ledger_finds_wrong_values_and_out_of_order():
    cartons = [_carton(1)]
    ds = [
        _d("x", "carton_closed", "T1", 2.0, 10.0, weight_g=5.0, carton_id="C1"),
        _d("y", "carton_scanned", "T1", 1.0, 11.0),
    ]
    r = account_sink("wms", ds, cartons, [])
    assert (r.wrong, r.out_of_order, r.lost, r.invented) == (1, 1, 0, 0), r.examples


def test_ledger_judges_device_facts_from_a_factbook():
    """Facts of devices other than the publisher's (a weighing, a sort) count like the
    line's: lost, invented, wrong values, duplicate facts; a fact only allowed may be
    missing; a sink that does not take the type holds nothing of it."""
    book = FactBook(
        required={("carton_weighed", "W1"): {"weight_g": 512.5, "seq": 1},
                  ("carton_weighed", "W2"): {"weight_g": 600.0, "seq": 2},
                  ("carton_sorted", "S1"): {"lane": 4, "disposition": "sorted"}},
        allowed={("carton_weighed", "W3")},  # overwritten unread: may be missing
        sinks={"carton_weighed": frozenset({"wms", "bus"}),
               "carton_sorted": frozenset({"wms", "bus"})})
    ds = [
        _d("a", "carton_weighed", "W1", 1.0, 10.0, weight_g=512.5, seq=1),
        _d("b", "carton_weighed", "W1", 1.0, 10.5, weight_g=512.5, seq=1),  # dup fact
        _d("c", "carton_sorted", "S1", 1.0, 11.0, lane=5, disposition="sorted"),  # wrong lane
        _d("d", "carton_weighed", "W9", 1.0, 12.0, weight_g=1.0, seq=9),  # invented
    ]  # W2 lost, W3 allowed and missing
    r = account_sink("wms", ds, [], [], (), book)
    assert (r.required, r.lost, r.invented, r.wrong, r.dup_facts) == (3, 1, 1, 1, 1), r.examples
    assert book.required_count("erp") == 0 and book.required_count("bus") == 3
    ok = [_d("a", "carton_weighed", "W1", 1.0, 10.0, weight_g=512.5, seq=1),
          _d("e", "carton_weighed", "W2", 1.0, 10.0, weight_g=600.004, seq=2),  # float32
          _d("c", "carton_sorted", "S1", 1.0, 11.0, lane=4, disposition="sorted")]
    r = account_sink("bus", ok, [], [], (), book)
    assert (r.lost, r.invented, r.wrong, r.dup_facts) == (0, 0, 0, 0), r.examples


def test_log_control_chars():
    assert log_control_chars("ok line\nalso\tfine\r\n") == 0
    assert log_control_chars("a\x00b\nfine\nesc \x1b[31m\n") == 2


def test_runner_merges_some_scenarios_into_a_whole_table():
    from faults.run import merge, table
    from faults.scenarios import Result

    def results(status: str, *names: str) -> list[Result]:
        return [Result(n, f"title {n}", status=status, notes=[f"{n} {status}"]) for n in names]

    whole = table(results("FAIL", "baseline", "kill9", "modbus"), quick=True, started="then",
                  secs=60)
    part = table(results("PASS", "modbus", "opcua_cert"), quick=True, started="now", secs=60)
    out = merge(whole, part, "Updated: modbus, opcua_cert on now")
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| ")]
    assert [(n.strip(), s.strip()) for n, s in rows[1:]] == [
        ("baseline", "FAIL"), ("kill9", "FAIL"), ("opcua_cert", "PASS"), ("modbus", "PASS")]
    assert "- modbus PASS" in out and "- modbus FAIL" not in out and "- kill9 FAIL" in out
    assert out.count("### ") == 4 and "Updated: modbus, opcua_cert on now" in out
    assert "on then" in out  # the header of the whole run is kept
