"""The HTTP sink: POSTs committed CloudEvents to a WMS/ERP endpoint (contract 3.3).

Owns one ``httpx.AsyncClient`` per sink and the translation of HTTP outcomes into the sink
contract (``sinks/base.py``): 2xx and 409 delivered; 408, 425, 429, 5xx, other non-4xx
statuses, 401/403 (our credentials, not the event, are wrong), timeouts, connection and
protocol errors raise ``RetriableError`` (with the
receiver's ``Retry-After``); any other 4xx is a permanent rejection, returned as
``"HTTP <status>: <response body>"``. It never sleeps, retries or logs: the dispatcher
owns timing and reporting.

Bodies are the envelopes exactly as the outbox stored them (serialized once, at emission);
a batch is those bodies joined into a JSON array, so nothing is parsed per event.

``mode: single`` sends one request per event, in order, ``Idempotency-Key`` = event id.
``mode: batch`` sends one ``application/cloudevents-batch+json`` request per send; its
``Idempotency-Key`` is derived from the event ids, so a retried batch of the same events
carries the same key (receivers must still deduplicate per event id: after a restart the
same events may travel in a differently cut batch). When the receiver rejects a batch for
good, the bad events are isolated and the rest stays batched. If the rejection names them
(a JSON body with ``"rejected_ids": [...]``, a subset of the batch's ids), exactly those are
dead-lettered with that response and the others are sent again as one batch (two requests
whatever the number of rejections). Otherwise the batch is split in halves, in order, and
each half sent again (a half of one event is a one-element batch keyed by the event id): one
rejected event in N costs about 2 log2(N) more requests, not N.

Everything the receiver says (body, reason phrase, headers) goes through ``peer_text``
before it is kept in a reason or an error message: one printable line, bounded.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson

from .. import __version__
from ..config import HttpSinkConfig
from ..errors import ConfigError, ConfigProblem, RetriableError
from ..outbox.store import Pending
from .base import Result, SendIncomplete, peer_text

SINGLE_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
REASON_MAX_CHARS = 1000  # of a rejecting response's body, kept in the dead letter
ERROR_DETAIL_MAX_CHARS = 200  # of a failing response's body, in a transient error
RESPONSE_MAX_BYTES = 64 * 1024  # read at most this much of any response body
BATCH_KEY_NAMESPACE = uuid.UUID("0d6f3c52-8a51-5e0b-b7a4-3c9e1f2a6d40")
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header name


class HttpSink:
    """Delivers events to one HTTP endpoint; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        cfg: HttpSinkConfig,
        *,
        base_dir: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.name = name
        self.cfg = cfg
        self.batch_max_events = cfg.batch_max_events
        self._base_dir = base_dir
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._url = httpx.URL(cfg.url)
        # For error messages: never echo credentials embedded in the URL.
        self._where = str(self._url.copy_with(username=None, password=None))

    async def start(self) -> None:
        """Create the client; connects to nothing, so a receiver that is down is no error."""
        if self._client is not None:
            return
        headers = {"User-Agent": f"edge-agent/{__version__}", **self._extra_headers()}
        token = self._read_token()
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        n = self.cfg.max_connections
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.cfg.timeout_secs),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            transport=self._transport,
            follow_redirects=False,  # a redirect means a wrong url; see _outcome
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, items: list[Pending]) -> list[Result]:
        if not items:
            return []
        results: list[Result] = []
        try:
            if self.cfg.mode == "single":
                for it in items:
                    res, _ = await self._post(it.body.encode(), SINGLE_CONTENT_TYPE, it.id, it.subject)
                    results.append(res)
            else:
                await self._send_batch(items, results)
        except RetriableError as exc:
            # In order: what has a result is settled, the rest is retried by the dispatcher.
            if not results:
                raise
            raise SendIncomplete(results, exc) from exc
        return results

    # --- internals -------------------------------------------------------------------------

    async def _send_batch(self, items: list[Pending], results: list[Result]) -> None:
        """POST ``items`` as one batch; on a permanent rejection, isolate the bad events.
        Appends one result per item to ``results``, in order; raises on the first transient
        failure (``results`` then holds the settled prefix)."""
        result, body = await self._post(
            b"[" + b",".join(it.body.encode() for it in items) + b"]",
            BATCH_CONTENT_TYPE,
            _batch_key(items),
            items[0].subject,
        )
        if result is None:
            results.extend([None] * len(items))
        elif len(items) == 1:
            results.append(result)
        elif named := _rejected_ids(body, items):
            await self._send_all_but(items, named, result, results)
        else:
            # Some event(s) of it are bad (or the batch is too large for the receiver):
            # halves, in order, keep the good events batched.
            mid = len(items) // 2
            await self._send_batch(items[:mid], results)
            await self._send_batch(items[mid:], results)

    async def _send_all_but(
        self, items: list[Pending], rejected: set[str], reason: str, results: list[Result]
    ) -> None:
        """Dead-letter the events the receiver named, send the others again as one batch."""
        rest = [it for it in items if it.id not in rejected]
        sub: list[Result] = []
        try:
            if rest:
                await self._send_batch(rest, sub)
        finally:
            # In order, up to the first event of ``rest`` without a result (on a failure).
            it_sub = iter(sub)
            for it in items:
                if it.id in rejected:
                    results.append(reason)
                else:
                    res = next(it_sub, _MISSING)
                    if res is _MISSING:
                        break
                    results.append(res)  # type: ignore[arg-type]

    async def _post(
        self, content: bytes, content_type: str, key: str, subject: str
    ) -> tuple[Result, bytes]:
        """The outcome of one POST and the (capped) response body."""
        client = self._client
        if client is None:
            raise RuntimeError(f"HttpSink {self.name!r} used before start()")
        headers = {
            "Content-Type": content_type,
            "Idempotency-Key": key,
            "X-Correlation-ID": _header_value(subject),
        }
        request = client.build_request("POST", self._url, content=content, headers=headers)
        try:
            # httpx times each phase (connect, write, read); this bounds the whole exchange.
            async with asyncio.timeout(self.cfg.timeout_secs):
                response = await client.send(request, stream=True)
                try:
                    body = await _read_capped(response)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise RetriableError(
                f"POST {self._where}: no complete response within {self.cfg.timeout_secs}s"
            ) from exc
        except httpx.RequestError as exc:
            raise RetriableError(
                f"POST {self._where}: {type(exc).__name__}: {peer_text(str(exc))}"
            ) from exc
        return self._outcome(response, body), body

    def _outcome(self, response: httpx.Response, body: bytes) -> Result:
        status = response.status_code
        if 200 <= status < 300 or status == 409:  # 409: the receiver already has it
            return None
        # Decode only what can be kept (the body may be 64 KB of anything).
        text = body[: REASON_MAX_CHARS * 4].decode("utf-8", "replace").strip()
        phrase = peer_text(response.reason_phrase, 100)
        if 400 <= status < 500 and status not in (408, 425, 429, 401, 403):
            return f"HTTP {status}: {peer_text(text, REASON_MAX_CHARS) or phrase}"
        # 408/425/429/5xx by contract; 1xx/3xx are not an answer about the event (a redirect
        # means the url is wrong), and 401/403 say our credentials are wrong, not the event:
        # dead-lettering every event for an expired token would bury the operator. Keep the
        # events until an operator fixes the config.
        detail = peer_text(text, ERROR_DETAIL_MAX_CHARS) or phrase
        if status in (401, 403):
            detail = f"{detail} (check the sink's credentials)"
        if 300 <= status < 400 and "location" in response.headers:
            where = peer_text(response.headers["location"], ERROR_DETAIL_MAX_CHARS)
            detail = f"redirect to {where} (check the sink url)"
        raise RetriableError(
            f"POST {self._where}: HTTP {status}: {detail}",
            retry_after_secs=parse_retry_after(response.headers.get("retry-after")),
        )

    def _extra_headers(self) -> dict[str, str]:
        """``cfg.headers``, checked once: a header httpx cannot send would fail every request."""
        bad = [
            name
            for name, value in self.cfg.headers.items()
            if not _TOKEN_CHARS.fullmatch(name) or _header_value(value) != value
        ]
        if bad:
            raise ConfigError(
                [
                    ConfigProblem(
                        f"sinks.{self.name}.headers",
                        None,
                        f"cannot send header {name!r} (names are tokens, values printable ASCII)",
                    )
                    for name in bad
                ]
            )
        return dict(self.cfg.headers)

    def _read_token(self) -> str | None:
        path = self.cfg.bearer_token_file
        if path is None:
            return None
        if not path.is_absolute() and self._base_dir is not None:
            path = self._base_dir / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [
                    ConfigProblem(
                        str(path), None, f"sink {self.name}: cannot read bearer token: {exc}"
                    )
                ]
            ) from exc
        if not token or not (token.isascii() and token.isprintable()):
            msg = f"sink {self.name}: bearer token is empty or not one line of printable ASCII"
            raise ConfigError([ConfigProblem(str(path), None, msg)])
        return token


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        pass
    else:
        return secs if math.isfinite(secs) and secs >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_MISSING = object()


def _rejected_ids(body: bytes, items: list[Pending]) -> set[str] | None:
    """The batch's event ids a rejection names (``{"rejected_ids": [...]}``), or None when
    it names none of them or anything else (then the sink bisects)."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    ids = parsed.get("rejected_ids") if isinstance(parsed, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return None
    named = set(ids)
    if not named <= {it.id for it in items}:
        return None  # not about this batch: do not trust it
    return named


def _batch_key(items: list[Pending]) -> str:
    """Deterministic Idempotency-Key of a batch; a batch of one is keyed like its event."""
    if len(items) == 1:
        return items[0].id
    return str(uuid.uuid5(BATCH_KEY_NAMESPACE, "\x1f".join(it.id for it in items)))


def _header_value(text: str) -> str:
    """``text`` as it is, or percent-encoded if it is not printable ASCII (a header cannot
    carry it, and a malformed request would be retried forever)."""
    if text.isascii() and text.isprintable() and text == text.strip():
        return text
    return quote(text, safe=_HEADER_SAFE)


async def _read_capped(response: httpx.Response) -> bytes:
    """The response body, at most ``RESPONSE_MAX_BYTES`` of it (a receiver cannot make us
    buffer an unbounded error page)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= RESPONSE_MAX_BYTES:
            break
    return b"".join(chunks)
