"""The stand-in WMS/ERP receiver, over real HTTP on 127.0.0.1: dedup and failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from simulators.receiver import BATCH, SINGLE, ControlError, Receiver, merge_deliveries

REPO = Path(__file__).resolve().parents[2]


def event(event_id: str, subject: str = "C0000001") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "type": "carton_closed",
        "source": "edge-agent/test",
        "subject": subject,
        "data": {"carton_id": subject, "weight_g": 1234.5, "station": "CLOSE1"},
    }


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver("wms") as r:
        yield r


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


async def post_one(http: httpx.AsyncClient, r: Receiver, ev: dict[str, Any]) -> httpx.Response:
    return await http.post(
        f"http://127.0.0.1:{r.events_port}/events",
        content=json.dumps(ev),
        headers={"Content-Type": SINGLE, "Idempotency-Key": ev["id"]},
    )


async def post_batch(
    http: httpx.AsyncClient, r: Receiver, evs: list[dict[str, Any]], key: str = "batch-1"
) -> httpx.Response:
    return await http.post(
        f"http://127.0.0.1:{r.events_port}/events",
        content=json.dumps(evs),
        headers={"Content-Type": BATCH, "Idempotency-Key": key},
    )


async def control(http: httpx.AsyncClient, r: Receiver, body: dict[str, Any]) -> httpx.Response:
    return await http.post(f"http://127.0.0.1:{r.control_port}/_control", json=body)


@pytest.mark.asyncio
async def test_single_event_is_recorded_with_arrival_time(receiver, http):
    before = time.time()
    resp = await post_one(http, receiver, event("e1"))
    assert resp.status_code == 200
    assert [e["id"] for e in receiver.events] == ["e1"]
    assert before <= receiver.events[0]["_received_at"] <= time.time()
    assert receiver.events[0]["data"]["weight_g"] == 1234.5
    assert receiver.idempotency_key_errors == 0


@pytest.mark.asyncio
async def test_duplicate_single_gets_200_and_is_recorded_once(receiver, http):
    assert (await post_one(http, receiver, event("e1"))).status_code == 200
    resp = await post_one(http, receiver, event("e1"))
    assert resp.status_code == 200
    assert resp.json() == {"accepted": 0, "duplicates": 1}
    assert len(receiver.events) == 1
    assert receiver.duplicates == 1
    assert receiver.requests == 2
    # The repeat is kept for the ledger: at least once may deliver an id twice.
    assert [e["id"] for e in receiver.redelivered] == ["e1"]
    assert [e["id"] for e in receiver.deliveries] == ["e1", "e1"]


@pytest.mark.asyncio
async def test_batch_dedups_per_event_id_not_per_batch_key(receiver, http):
    await post_one(http, receiver, event("a"))
    resp = await post_batch(http, receiver, [event("a"), event("b"), event("c"), event("b")])
    assert resp.status_code == 200
    assert resp.json() == {"accepted": 2, "duplicates": 2}
    # Same batch key again, new ids: the key is not used for dedup.
    resp = await post_batch(http, receiver, [event("d")], key="batch-1")
    assert resp.json()["accepted"] == 1
    assert [e["id"] for e in receiver.events] == ["a", "b", "c", "d"]
    assert receiver.duplicates == 2
    assert [e["id"] for e in receiver.deliveries] == ["a", "a", "b", "c", "b", "d"]


@pytest.mark.asyncio
async def test_malformed_requests_get_400_and_record_nothing(receiver, http):
    url = f"http://127.0.0.1:{receiver.events_port}/events"
    no_subject = {k: v for k, v in event("x").items() if k != "subject"}
    cases = [
        ("application/json", json.dumps(event("x"))),
        (SINGLE, "{not json"),
        (SINGLE, json.dumps([event("x")])),
        (BATCH, json.dumps(event("x"))),
        (BATCH, "[]"),
        (SINGLE, json.dumps(no_subject)),
    ]
    for content_type, body in cases:
        resp = await http.post(url, content=body, headers={"Content-Type": content_type})
        assert resp.status_code == 400, (content_type, body)
        assert resp.json()["error"]
    assert receiver.events == []
    assert receiver.statuses == {400: len(cases)}


@pytest.mark.asyncio
async def test_idempotency_key_problems_are_counted_not_rejected(receiver, http):
    url = f"http://127.0.0.1:{receiver.events_port}/events"
    resp = await http.post(url, content=json.dumps(event("e1")), headers={"Content-Type": SINGLE})
    assert resp.status_code == 200
    headers = {"Content-Type": SINGLE, "Idempotency-Key": "not-e2"}
    await http.post(url, content=json.dumps(event("e2")), headers=headers)
    assert receiver.idempotency_key_errors == 2
    assert len(receiver.events) == 2


@pytest.mark.asyncio
async def test_refuse_closes_the_events_port_and_ok_reopens_it(receiver, http):
    port = receiver.events_port
    resp = await control(http, receiver, {"mode": "refuse"})
    assert resp.json()["mode"] == "refuse"
    with pytest.raises(httpx.ConnectError):
        await post_one(http, receiver, event("e1"))
    # The control port stays up while the events port refuses.
    stats = (await http.get(f"http://127.0.0.1:{receiver.control_port}/_stats")).json()
    assert stats["requests"] == 0

    await control(http, receiver, {"mode": "ok"})
    assert receiver.events_port == port
    assert (await post_one(http, receiver, event("e1"))).status_code == 200
    assert [e["id"] for e in receiver.events] == ["e1"]


@pytest.mark.asyncio
async def test_status_mode_fails_every_request_and_records_nothing(receiver, http):
    await control(http, receiver, {"mode": "status", "status": 503})
    for _ in range(3):
        resp = await post_one(http, receiver, event("e1"))
        assert resp.status_code == 503
        assert "Retry-After" not in resp.headers
    assert receiver.events == []
    await control(http, receiver, {"mode": "ok"})
    assert (await post_one(http, receiver, event("e1"))).status_code == 200
    assert receiver.statuses == {503: 3, 200: 1}


@pytest.mark.asyncio
async def test_429_carries_retry_after(receiver, http):
    await control(http, receiver, {"mode": "status", "status": 429, "retry_after_secs": 2})
    resp = await post_batch(http, receiver, [event("e1")])
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "2"
    assert receiver.events == []


@pytest.mark.asyncio
async def test_reject_ids_rejects_whole_request_with_body(receiver, http):
    await control(http, receiver, {"reject_ids": ["bad1", "bad2"], "reject_status": 422})
    resp = await post_batch(http, receiver, [event("ok1"), event("bad2"), event("ok2")])
    assert resp.status_code == 422
    assert resp.json()["rejected_ids"] == ["bad2"]
    assert resp.json()["error"]
    resp = await post_one(http, receiver, event("bad1"))
    assert resp.status_code == 422
    assert resp.json()["rejected_ids"] == ["bad1"]
    # Nothing of the rejected batch was recorded, so its good events are new later.
    resp = await post_batch(http, receiver, [event("ok1"), event("ok2")])
    assert resp.json() == {"accepted": 2, "duplicates": 0}
    assert [e["id"] for e in receiver.events] == ["ok1", "ok2"]


@pytest.mark.asyncio
async def test_delay_slows_answers(receiver, http):
    await control(http, receiver, {"delay_ms": 300})
    started = time.monotonic()
    resp = await post_one(http, receiver, event("e1"))
    assert resp.status_code == 200
    assert time.monotonic() - started >= 0.3
    await control(http, receiver, {"delay_ms": 0})
    started = time.monotonic()
    await post_one(http, receiver, event("e2"))
    assert time.monotonic() - started < 0.3


@pytest.mark.asyncio
async def test_fail_next_fails_n_requests_then_recovers(receiver, http):
    await control(http, receiver, {"fail_next": 2, "status": 503})
    codes = [(await post_one(http, receiver, event("e1"))).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert receiver.failures.fail_next == 0
    assert [e["id"] for e in receiver.events] == ["e1"]


@pytest.mark.asyncio
async def test_received_stats_and_reset_over_http(receiver, http):
    await post_batch(http, receiver, [event("a"), event("b")])
    await post_one(http, receiver, event("a"))
    base = f"http://127.0.0.1:{receiver.control_port}"
    received = (await http.get(f"{base}/_received")).json()
    assert [e["id"] for e in received["events"]] == ["a", "b"]
    assert all("_received_at" in e for e in received["events"])
    assert [e["id"] for e in received["redelivered"]] == ["a"]
    assert [e["id"] for e in merge_deliveries(received["events"], received["redelivered"])] == [
        "a", "b", "a"]
    assert received["duplicates"] == 1
    assert received["requests"] == 2
    assert received["statuses"] == {"200": 2}
    stats = (await http.get(f"{base}/_stats")).json()
    assert "events" not in stats and "redelivered" not in stats
    assert stats["unique"] == 2
    assert stats["duplicates"] == 1

    await control(http, receiver, {"delay_ms": 1})
    assert (await http.post(f"{base}/_reset")).json()["requests"] == 0
    assert receiver.events == [] and receiver.redelivered == []
    assert receiver.failures.delay_ms == 1  # reset keeps failure settings
    assert (await post_one(http, receiver, event("a"))).json()["accepted"] == 1


@pytest.mark.asyncio
async def test_control_rejects_unknown_keys_and_bad_values(receiver, http):
    for body in (
        {"mode": "broken"},
        {"mode": "status"},
        {"status": 503},
        {"delay": 5},
        {"reject_ids": "e1"},
        {"fail_next": -1},
    ):
        resp = await control(http, receiver, body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]
    assert receiver.failures.mode == "ok"
    with pytest.raises(ControlError, match="unknown key"):
        await receiver.control({"mode": "ok", "typo": 1})


@pytest.mark.asyncio
async def test_wait_for_events_times_out_and_succeeds(receiver, http):
    assert await receiver.wait_for_events(1, timeout_secs=0.05) is False
    await post_one(http, receiver, event("e1"))
    assert await receiver.wait_for_events(1, timeout_secs=1.0) is True


def test_cli_prints_ready_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.receiver", "--name", "erp", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        assert words[:2] == ["READY", "erp"]
        ports = dict(w.split("=") for w in words[2:])
        body = json.dumps(event("cli-1"))
        headers = {"Content-Type": SINGLE, "Idempotency-Key": "cli-1"}
        resp = httpx.post(
            f"http://127.0.0.1:{ports['events']}/events", content=body, headers=headers
        )
        assert resp.status_code == 200
        stats = httpx.get(f"http://127.0.0.1:{ports['control']}/_stats").json()
        assert stats["unique"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
