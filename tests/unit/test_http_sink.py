"""HttpSink: classification and headers against httpx.MockTransport, then the sink contract
and failure modes against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from edge_agent.config import HttpSinkConfig
from edge_agent.errors import ConfigError, RetriableError
from edge_agent.outbox.store import Pending
from edge_agent.sinks.base import SendIncomplete
from edge_agent.sinks.http import (
    BATCH_CONTENT_TYPE,
    SINGLE_CONTENT_TYPE,
    HttpSink,
    parse_retry_after,
)
from edge_agent.testing import ReceivedEvent, check_sink_contract, sample_items
from simulators.receiver import Receiver as SimReceiver

URL = "http://wms.test/events"


def config(**kw: Any) -> HttpSinkConfig:
    kw.setdefault("url", URL)
    return HttpSinkConfig(kind="http", **kw)


Reply = httpx.Response | Exception
Handler = Callable[[httpx.Request], Reply]


class Mock:
    """A MockTransport that records requests and replies from a script (then 200)."""

    def __init__(self, *replies: Reply | Handler):
        self.replies: deque[Reply | Handler] = deque(replies)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.popleft() if self.replies else httpx.Response(200)
        if callable(reply) and not isinstance(reply, (httpx.Response, Exception)):
            reply = reply(request)
        if isinstance(reply, Exception):
            raise reply
        return reply


async def started(mock: Mock, **kw: Any) -> HttpSink:
    base_dir = kw.pop("base_dir", None)
    sink = HttpSink("wms", config(**kw), base_dir=base_dir, transport=mock.transport)
    await sink.start()
    return sink


def item(seq: int, body: str, *, subject: str = "C1") -> Pending:
    return Pending(seq, f"id-{seq}", "carton_closed", subject, body, attempts=0)


# --- single mode: headers and body -----------------------------------------------------------


async def test_single_posts_each_body_verbatim_with_contract_headers() -> None:
    mock = Mock(httpx.Response(201), httpx.Response(204))
    sink = await started(mock, mode="single", headers={"X-Site": "dc-east-1"})
    # Odd spacing and non-ASCII: the sink must send the stored text as-is, UTF-8 encoded.
    items = [
        item(1, '{"id": "id-1",  "data": {"station": "Waage-Süd"}}', subject="C0000123"),
        item(2, '{"id":"id-2"}', subject="T-9"),
    ]

    assert await sink.send(items) == [None, None]

    assert [r.content for r in mock.requests] == [
        '{"id": "id-1",  "data": {"station": "Waage-Süd"}}'.encode(),
        b'{"id":"id-2"}',
    ]
    first, second = mock.requests
    assert first.method == "POST" and str(first.url) == URL
    assert first.headers["content-type"] == SINGLE_CONTENT_TYPE
    assert first.headers["idempotency-key"] == "id-1"
    assert first.headers["x-correlation-id"] == "C0000123"
    assert second.headers["idempotency-key"] == "id-2"
    assert second.headers["x-correlation-id"] == "T-9"
    assert first.headers["x-site"] == "dc-east-1"
    assert first.headers["user-agent"].startswith("edge-agent/")
    assert "authorization" not in first.headers
    await sink.close()


async def test_bearer_token_is_read_from_a_file_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "wms.token").write_text("s3cr3t-token\n")
    mock = Mock()
    sink = await started(
        mock, mode="single", bearer_token_file=Path("secrets/wms.token"), base_dir=tmp_path
    )
    await sink.send(sample_items(1))
    assert mock.requests[0].headers["authorization"] == "Bearer s3cr3t-token"
    await sink.close()


async def test_unreadable_or_empty_token_file_is_a_config_error(tmp_path: Path) -> None:
    missing = HttpSink(
        "wms", config(bearer_token_file=tmp_path / "nope"), transport=Mock().transport
    )
    with pytest.raises(ConfigError, match="cannot read bearer token"):
        await missing.start()
    (tmp_path / "empty").write_text("\n")
    empty = HttpSink(
        "wms", config(bearer_token_file=tmp_path / "empty"), transport=Mock().transport
    )
    with pytest.raises(ConfigError, match="bearer token is empty"):
        await empty.start()


async def test_headers_that_cannot_be_sent_are_a_config_error_at_start() -> None:
    sink = HttpSink("wms", config(headers={"X-Ok": "1", "X-Bad": "Größe", "Bad Name": "v"}))
    with pytest.raises(ConfigError) as info:
        await sink.start()
    problems = sorted(str(p) for p in info.value.problems)
    assert [p.split(" (")[0] for p in problems] == [
        "sinks.wms.headers: cannot send header 'Bad Name'",
        "sinks.wms.headers: cannot send header 'X-Bad'",
    ]


async def test_a_subject_a_header_cannot_carry_is_percent_encoded_not_fatal() -> None:
    mock = Mock()
    sink = await started(mock, mode="single")
    items = [
        item(1, "{}", subject="Größe 1"),
        item(2, "{}", subject=" padded "),
        item(3, "{}", subject=""),
    ]
    assert await sink.send(items) == [None, None, None]
    assert [r.headers["x-correlation-id"] for r in mock.requests] == [
        "Gr%C3%B6%C3%9Fe%201",
        "%20padded%20",
        "",
    ]
    await sink.close()


async def test_send_of_nothing_makes_no_request_and_close_is_idempotent() -> None:
    mock = Mock()
    for mode in ("single", "batch"):
        sink = await started(mock, mode=mode)
        assert await sink.send([]) == []
        await sink.close()
        await sink.close()
    assert mock.requests == []


async def test_send_before_start_is_a_programming_error() -> None:
    sink = HttpSink("wms", config(), transport=Mock().transport)
    assert sink.name == "wms" and sink.batch_max_events == 500
    with pytest.raises(RuntimeError, match="before start"):
        await sink.send(sample_items(1))


# --- classification --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299, 409])
async def test_2xx_and_409_are_delivered(status: int) -> None:
    mock = Mock(httpx.Response(status, text="already have it" if status == 409 else ""))
    sink = await started(mock, mode="single")
    assert await sink.send(sample_items(1)) == [None]
    await sink.close()


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 301, 307])
async def test_transient_statuses_raise_retriable(status: int) -> None:
    mock = Mock(httpx.Response(status, text="busy", headers={"Location": "http://elsewhere/"}))
    sink = await started(mock, mode="single")
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(2))
    assert type(info.value) is RetriableError  # first item failed: nothing to report as partial
    assert f"HTTP {status}" in str(info.value)
    assert info.value.retry_after_secs is None
    assert len(mock.requests) == 1  # sequential: nothing after the failure was sent
    if 300 <= status < 400:
        assert "check the sink url" in str(info.value)
    await sink.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("soon", None), ("-5", None), ("nan", None)],
)
async def test_retry_after_seconds_is_passed_on(header: str, expected: float | None) -> None:
    mock = Mock(httpx.Response(429, headers={"Retry-After": header}))
    sink = await started(mock, mode="single")
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(1))
    assert info.value.retry_after_secs == expected
    await sink.close()


async def test_retry_after_http_date_is_converted_to_seconds() -> None:
    mock = Mock(
        httpx.Response(503, headers={"Retry-After": formatdate(time.time() + 90, usegmt=True)})
    )
    sink = await started(mock, mode="single")
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(1))
    assert info.value.retry_after_secs is not None
    assert 80 <= info.value.retry_after_secs <= 91
    await sink.close()


def test_parse_retry_after_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:15:00 GMT", now=now) == 100.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:15:00 -0000", now=now) == 100.0
    assert parse_retry_after("Mon, 13 Nov 2023 00:00:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("Tue, 99 Foo 2023", now=now) is None
    assert parse_retry_after("", now=now) is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_are_retriable_not_dead(status: int) -> None:
    # Wrong credentials are the sink's problem, not the event's: keep every event.
    mock = Mock(httpx.Response(status, text="token expired"))
    sink = await started(mock, mode="batch")
    with pytest.raises(RetriableError, match="credentials"):
        await sink.send(sample_items(3))
    await sink.close()


@pytest.mark.parametrize("status", [400, 404, 410, 413, 415, 422])
async def test_other_4xx_are_permanent_with_the_response_kept(status: int) -> None:
    mock = Mock(httpx.Response(status, text=f'{{"error":"bad event {status}"}}'))
    sink = await started(mock, mode="single")
    assert await sink.send(sample_items(1)) == [f'HTTP {status}: {{"error":"bad event {status}"}}']
    await sink.close()


async def test_permanent_reason_keeps_the_first_1000_chars_or_the_reason_phrase() -> None:
    mock = Mock(httpx.Response(422, text="x" * 5000), httpx.Response(400))
    sink = await started(mock, mode="single")
    long, empty = await sink.send(sample_items(2))
    assert long == "HTTP 422: " + "x" * 1000 + "…"  # marked as cut
    assert empty == "HTTP 400: Bad Request"
    await sink.close()


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.PoolTimeout("pool timed out"),
        httpx.ReadError("connection reset"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_transport_errors_become_retriable_with_the_cause_chained(error: Exception) -> None:
    mock = Mock(error)
    sink = await started(mock, mode="single")
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(1))
    assert info.value.__cause__ is error
    assert type(error).__name__ in str(info.value) and "wms.test" in str(info.value)
    await sink.close()


async def test_credentials_in_the_url_never_reach_error_messages() -> None:
    mock = Mock(httpx.ConnectError("refused"))
    sink = await started(mock, mode="single", url="http://user:pa55@wms.test/events")
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(1))
    assert "pa55" not in str(info.value) and "wms.test/events" in str(info.value)
    await sink.close()


# --- single mode: partial progress -----------------------------------------------------------


async def test_single_stops_at_the_first_transient_failure_with_send_incomplete() -> None:
    mock = Mock(httpx.Response(200), httpx.Response(503, headers={"Retry-After": "7"}))
    sink = await started(mock, mode="single")
    items = sample_items(3)
    with pytest.raises(SendIncomplete) as info:
        await sink.send(items)
    assert info.value.results == [None]
    assert isinstance(info.value.cause, RetriableError)
    assert info.value.retry_after_secs == info.value.cause.retry_after_secs == 7.0
    assert [r.headers["idempotency-key"] for r in mock.requests] == [items[0].id, items[1].id]
    await sink.close()


async def test_single_records_a_rejection_and_goes_on() -> None:
    mock = Mock(httpx.Response(200), httpx.Response(422, text="bad weight"), httpx.Response(200))
    sink = await started(mock, mode="single")
    assert await sink.send(sample_items(3)) == [None, "HTTP 422: bad weight", None]
    assert len(mock.requests) == 3
    await sink.close()


# --- batch mode ------------------------------------------------------------------------------


async def test_batch_posts_one_json_array_of_the_envelopes() -> None:
    mock = Mock()
    sink = await started(mock, mode="batch")
    items = sample_items(4)
    assert await sink.send(items) == [None] * 4
    (request,) = mock.requests
    assert request.headers["content-type"] == BATCH_CONTENT_TYPE
    assert json.loads(request.content) == [json.loads(it.body) for it in items]
    assert request.content == ("[" + ",".join(it.body for it in items) + "]").encode()
    assert request.headers["x-correlation-id"] == items[0].subject
    await sink.close()


async def test_batch_idempotency_key_is_deterministic_per_set_of_events() -> None:
    mock = Mock()
    sink = await started(mock, mode="batch")
    items = sample_items(3)
    await sink.send(items)
    await sink.send(list(items))  # a retry of the same batch
    await sink.send(items[:2])  # a differently cut batch
    await sink.send(items[:1])  # a batch of one is keyed like its event
    keys = [r.headers["idempotency-key"] for r in mock.requests]
    assert keys[0] == keys[1]
    assert keys[2] != keys[0] and keys[2] not in {it.id for it in items}
    assert keys[3] == items[0].id
    await sink.close()


async def test_batch_409_delivers_all_and_5xx_retries_the_whole_batch() -> None:
    mock = Mock(httpx.Response(409), httpx.Response(500, text="db down"))
    sink = await started(mock, mode="batch")
    assert await sink.send(sample_items(3)) == [None, None, None]
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(3))
    assert type(info.value) is RetriableError and "db down" in str(info.value)
    assert len(mock.requests) == 2  # no isolation for a transient failure
    await sink.close()


async def test_batch_rejection_is_isolated_to_the_bad_event() -> None:
    items = sample_items(3)

    def reject_middle(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        if any(e["id"] == items[1].id for e in events):
            return httpx.Response(422, text=f"invalid event {items[1].id}")
        return httpx.Response(202)

    mock = Mock(*[reject_middle] * 4)
    sink = await started(mock, mode="batch")
    assert await sink.send(items) == [None, f"HTTP 422: invalid event {items[1].id}", None]
    # Bisected in order: [0,1,2] rejected -> [0] ok, [1,2] rejected -> [1] dead, [2] ok.
    sent = [[e["id"] for e in json.loads(r.content)] for r in mock.requests]
    ids = [it.id for it in items]
    assert sent == [ids, ids[:1], ids[1:], ids[1:2], ids[2:]]
    keys = [r.headers["idempotency-key"] for r in mock.requests]
    assert keys[1] == ids[0] and keys[3] == ids[1] and keys[4] == ids[2]  # one event: its id
    assert keys[2] not in ids and keys[2] != keys[0]
    assert [r.headers["x-correlation-id"] for r in mock.requests] == [
        items[0].subject, items[0].subject, items[1].subject, items[1].subject, items[2].subject
    ]
    assert all(r.headers["content-type"] == BATCH_CONTENT_TYPE for r in mock.requests)
    await sink.close()


@pytest.mark.parametrize("n", [64, 500])
async def test_one_rejected_event_in_a_batch_costs_log_n_requests(n: int) -> None:
    """A rejection that does not say which event is bad: bisection isolates it with
    O(log N) requests; every other event is accepted exactly once."""
    items = sample_items(n)
    bad = items[n * 2 // 3]
    accepted: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.content)]
        if bad.id in ids:
            return httpx.Response(422, text="schema violation somewhere in this batch")
        accepted.extend(ids)
        return httpx.Response(200)

    mock = Mock(*[reply] * (2 * n))
    sink = await started(mock, mode="batch")
    results = await sink.send(items)
    await sink.close()
    assert len(mock.requests) <= 1 + 2 * math.ceil(math.log2(n))  # not n
    assert accepted == [it.id for it in items if it is not bad]
    assert results == [
        "HTTP 422: schema violation somewhere in this batch" if it is bad else None for it in items
    ]


async def test_rejections_named_by_a_real_receiver_cost_two_requests() -> None:
    """The stand-in WMS names the rejected ids: those are dead-lettered with its answer and
    the others sent again as one batch (5% rejected in 500: 2 requests, not 500)."""
    items = sample_items(500)
    bad = {it.id for it in items[::20]}
    async with SimReceiver("wms") as rec:
        await rec.control({"reject_ids": sorted(bad), "reject_status": 422})
        sink = HttpSink("wms", config(url=f"http://127.0.0.1:{rec.events_port}/events", mode="batch"))
        await sink.start()
        try:
            results = await sink.send(items)
        finally:
            await sink.close()
        assert rec.requests == 2
        assert [e["id"] for e in rec.events] == [it.id for it in items if it.id not in bad]
        assert rec.duplicates == 0 and rec.idempotency_key_errors == 0
    assert [it.id for it, r in zip(items, results, strict=True) if r is not None] == [
        it.id for it in items if it.id in bad
    ]
    assert all(r.startswith("HTTP 422: ") and "rejected_ids" in r for r in results if r)
    assert all(len(r) <= 1001 + len("HTTP 422: ") for r in results if r)


async def test_a_rejection_naming_ids_of_another_batch_is_not_trusted() -> None:
    items = sample_items(4)
    mock = Mock(
        httpx.Response(422, json={"rejected_ids": ["not-in-this-batch"]}),
        httpx.Response(200),  # first half
        httpx.Response(200),  # second half
    )
    sink = await started(mock, mode="batch")
    assert await sink.send(items) == [None] * 4  # bisected, nothing dead-lettered
    assert [len(json.loads(r.content)) for r in mock.requests] == [4, 2, 2]
    await sink.close()


async def test_a_transient_failure_after_named_rejections_keeps_the_settled_prefix() -> None:
    items = sample_items(4)
    mock = Mock(
        httpx.Response(422, json={"rejected_ids": [items[0].id, items[2].id]}),
        httpx.Response(503, text="busy"),  # the rest, items 1 and 3, as one batch
    )
    sink = await started(mock, mode="batch")
    with pytest.raises(SendIncomplete) as info:
        await sink.send(items)
    (reason,) = info.value.results  # item 0 dead; item 1 has no result: stop there
    assert reason is not None and reason.startswith("HTTP 422: ")
    assert [[e["id"] for e in json.loads(r.content)] for r in mock.requests] == [
        [it.id for it in items], [items[1].id, items[3].id]
    ]
    await sink.close()


async def test_a_transient_failure_while_isolating_keeps_the_settled_prefix() -> None:
    items = sample_items(4)

    def reply(request: httpx.Request) -> httpx.Response:
        ids = [e["id"] for e in json.loads(request.content)]
        if len(ids) == 4 or ids == [items[2].id, items[3].id]:
            return httpx.Response(400, text="bad batch")
        if ids == [items[2].id]:
            return httpx.Response(503, headers={"Retry-After": "2"})
        return httpx.Response(200)

    mock = Mock(*[reply] * 10)
    sink = await started(mock, mode="batch")
    with pytest.raises(SendIncomplete) as info:
        await sink.send(items)
    assert info.value.results == [None, None]  # the first half went through as one batch
    assert info.value.retry_after_secs == 2.0
    assert [len(json.loads(r.content)) for r in mock.requests] == [4, 2, 2, 1]
    await sink.close()


async def test_batch_of_one_rejected_is_dead_without_a_second_request() -> None:
    mock = Mock(httpx.Response(400, text="no"))
    sink = await started(mock, mode="batch")
    assert await sink.send(sample_items(1)) == ["HTTP 400: no"]
    assert len(mock.requests) == 1
    await sink.close()


async def test_batch_isolation_stops_at_a_transient_failure() -> None:
    mock = Mock(
        httpx.Response(422),  # the batch of 3
        httpx.Response(200),  # its first half: event 1 alone
        httpx.Response(429, headers={"Retry-After": "3"}),  # its second half: events 2-3
    )
    sink = await started(mock, mode="batch")
    with pytest.raises(SendIncomplete) as info:
        await sink.send(sample_items(3))
    assert info.value.results == [None]
    assert info.value.retry_after_secs == 3.0
    assert len(mock.requests) == 3

    mock.replies.extend([httpx.Response(422), httpx.ReadTimeout("slow")])
    with pytest.raises(RetriableError) as first_fails:
        await sink.send(sample_items(3))
    assert type(first_fails.value) is RetriableError  # nothing settled: not SendIncomplete
    await sink.close()


# --- what a peer says is untrusted text ------------------------------------------------------

GARBAGE = "bad\x00\x00 event\r\nFAKE LOG LINE level=ERROR\x1b[31m red\u202e\x7f" + "z" * 50_000


def assert_one_bounded_printable_line(text: str, limit: int) -> None:
    assert text.isprintable(), repr(text[:200])
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert len(text) <= limit, len(text)


async def test_garbage_bodies_and_headers_become_one_bounded_printable_line() -> None:
    garbage = GARBAGE.encode() + b"\xff\xfe"
    mock = Mock(
        httpx.Response(422, content=garbage),
        httpx.Response(503, content=garbage),
        httpx.Response(307, headers={"Location": "http://x/\x7f" + "y" * 5000}),
    )
    sink = await started(mock, mode="single")
    (reason,) = await sink.send(sample_items(1))
    assert reason is not None and reason.startswith("HTTP 422: bad\\x00\\x00 event FAKE LOG LINE")
    assert_one_bounded_printable_line(reason, 1100)
    for _ in range(2):
        with pytest.raises(RetriableError) as info:
            await sink.send(sample_items(1))
        assert_one_bounded_printable_line(str(info.value), 400)
    await sink.close()


# --- a real HTTP server on 127.0.0.1 -----------------------------------------------------------


class Receiver:
    """An aiohttp app that records every request and answers from a script (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[CIMultiDict[str], bytes, Any]] = []
        self.replies: deque[tuple[int, dict[str, str], str]] = deque()
        self.release = asyncio.Event()  # lets slow handlers finish at teardown
        self.url = ""

    async def events(self, request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append((CIMultiDict(request.headers), body, peer))
        status, headers, text = self.replies.popleft() if self.replies else (200, {}, "")
        return web.Response(status=status, headers=headers, text=text)

    async def drip(self, request: web.Request) -> web.StreamResponse:
        """Answers 200 at once, then the body a byte at a time, forever."""
        await request.read()
        response = web.StreamResponse(status=200)
        response.content_length = 1_000_000
        await response.prepare(request)
        try:
            while not self.release.is_set():
                await response.write(b" ")
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            pass
        return response

    def received(self) -> list[ReceivedEvent]:
        """What the receiver accepted, per event, for the sink contract."""
        out = []
        for headers, body, _ in self.requests:
            parsed = json.loads(body)
            envelopes = parsed if headers["Content-Type"] == BATCH_CONTENT_TYPE else [parsed]
            out += [ReceivedEvent(e, headers.get("Idempotency-Key")) for e in envelopes]
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/events", rec.events)
    app.router.add_post("/drip", rec.drip)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}/events"
    yield rec
    rec.release.set()
    await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_sink_contract_over_a_real_socket(receiver: Receiver, mode: str) -> None:
    down_url = f"http://127.0.0.1:{closed_port()}/events"
    await check_sink_contract(
        lambda: HttpSink("wms", config(url=receiver.url, mode=mode)),
        receiver.received,
        make_unreachable_sink=lambda: HttpSink("wms", config(url=down_url, mode=mode)),
    )
    assert len(receiver.requests) == (10 if mode == "single" else 2)


async def test_real_server_sees_headers_outcomes_and_one_kept_alive_connection(
    receiver: Receiver, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    receiver.replies.extend(
        [
            (201, {}, ""),
            (422, {}, "carton unknown"),
            (200, {}, ""),
            (503, {"Retry-After": "11"}, ""),
        ]
    )
    sink = HttpSink(
        "erp", config(url=receiver.url, mode="single", bearer_token_file=tmp_path / "token")
    )
    await sink.start()
    items = sample_items(4)
    with pytest.raises(SendIncomplete) as info:
        await sink.send(items)
    await sink.close()

    assert info.value.results == [None, "HTTP 422: carton unknown", None]
    assert info.value.retry_after_secs == 11.0
    headers = [h for h, _, _ in receiver.requests]
    assert [h["Idempotency-Key"] for h in headers] == [it.id for it in items]
    assert [h["X-Correlation-ID"] for h in headers] == [it.subject for it in items]
    assert {h["Authorization"] for h in headers} == {"Bearer tok-123"}
    assert {h["Content-Type"] for h in headers} == {SINGLE_CONTENT_TYPE}
    assert [body for _, body, _ in receiver.requests] == [it.body.encode() for it in items]
    assert len({peer for _, _, peer in receiver.requests}) == 1  # one pooled connection


async def test_connection_refused_is_retriable_and_start_does_not_need_the_receiver() -> None:
    sink = HttpSink("wms", config(url=f"http://127.0.0.1:{closed_port()}/events", mode="batch"))
    await sink.start()  # nothing listens: still fine
    with pytest.raises(RetriableError) as info:
        await sink.send(sample_items(3))
    assert type(info.value) is RetriableError
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    await sink.close()


async def test_a_response_that_never_completes_times_out_as_a_whole(receiver: Receiver) -> None:
    # Each read succeeds well within the timeout, so only the whole-request deadline ends it.
    url = receiver.url.replace("/events", "/drip")
    sink = HttpSink("wms", config(url=url, mode="single", timeout_secs=0.5))
    await sink.start()
    began = time.monotonic()
    with pytest.raises(RetriableError, match=r"no complete response within 0\.5s"):
        await sink.send(sample_items(1))
    assert time.monotonic() - began < 3
    await sink.close()
