"""Stand-in WMS / ERP: an HTTP receiver of CloudEvents with switchable failures.

Owns two listeners. The events port takes `POST /events` with one CloudEvent
(`application/cloudevents+json`) or a batch (`application/cloudevents-batch+json`),
deduplicates by event id as a real WMS would (`events`: each unique event once, in arrival
order) and also keeps every repeat of an id (`redelivered`), so a ledger sees every
delivery. The control port stays up whatever the events port does, so a test can make the
events port refuse connections and bring it back:

    POST /_control  {"mode": "ok"}               healthy: clears every failure setting
                    {"mode": "refuse"}           close the events listener (ECONNREFUSED)
                    {"mode": "status", "status": 503}
                    {"mode": "status", "status": 429, "retry_after_secs": 2}
                    {"reject_ids": ["id1"], "reject_status": 422}
                    {"reject_fraction": 0.05}    reject that share of ids (chosen by a hash
                                                 of the id, so the same ids every time)
                    {"body": "garbage"}          failure bodies full of NUL, control and
                                                 escape characters and invalid UTF-8
                    {"delay_ms": 500}
                    {"fail_next": 3, "status": 503}
    GET  /_control  the current failure settings
    GET  /_received {"events": [...], "redelivered": [...], "rejected": [...],
                     "duplicates": n, "requests": n, "statuses": {...}}
    GET  /_stats    the same without "events" and "redelivered"
    POST /_reset    forget received events and counters (failure settings are kept)

Keys combine in one request; `mode` is applied first. Unknown keys are a 400, so a typo in a
test does not silently leave the receiver healthy. `rejected` holds each id rejected on
purpose (by `reject_ids` or `reject_fraction`) once, with its type and business key. The `Idempotency-Key` header is checked
(missing, or not the event id of a single event) and counted, but dedup is per event id.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("simulators.receiver")

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED_ATTRIBUTES = ("id", "type", "subject", "data")
CONTROL_KEYS = frozenset(
    {"mode", "status", "retry_after_secs", "reject_ids", "reject_status", "delay_ms", "fail_next",
     "reject_fraction", "body"}
)
BODIES = ("json", "garbage")
# What a broken WMS front end might answer: NUL, control characters, terminal escapes, a
# fake log line and bytes that are not UTF-8, long enough to flood a log.
GARBAGE = (
    b"\x00\x01\x02<html>\x1b[31mERROR\x1b[0m\r\n2026-01-01 00:00:00 CRITICAL forged log line\n"
    b"\xff\xfe\xc3\x28\x07\x08\x0b\x0c\x7f" + b"\x00garbage" * 4000
)
MODES = ("ok", "refuse", "status")
# Short, so "refuse" drops open keep-alive connections promptly instead of letting a
# client's in-flight request finish.
SHUTDOWN_TIMEOUT_S = 0.5


@dataclass
class Failures:
    """The failure settings; the defaults are a healthy receiver."""

    mode: str = "ok"
    status: int = 200
    retry_after_secs: float | None = None
    reject_ids: frozenset[str] = field(default_factory=frozenset)
    reject_status: int = 422
    delay_ms: float = 0.0
    fail_next: int = 0
    fail_next_status: int = 503
    reject_fraction: float = 0.0
    body: str = "json"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["reject_ids"] = sorted(self.reject_ids)
        return out


def merge_deliveries(
    events: list[dict[str, Any]], redelivered: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The unique events and the repeats as one list in arrival order (by `_arrival`, the
    receiver's count of deliveries)."""
    if not redelivered:
        return list(events)
    return sorted([*events, *redelivered], key=lambda e: e.get("_arrival", 0))


class ControlError(ValueError):
    """A control request that cannot be applied; the message lists every problem."""


def _is_status(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _check_control(settings: Mapping[str, Any]) -> list[str]:
    errors = [f"unknown key {k!r}" for k in sorted(set(settings) - CONTROL_KEYS)]
    mode = settings.get("mode")
    if "mode" in settings and mode not in MODES:
        errors.append(f"mode must be one of {', '.join(MODES)}")
    if "status" in settings and not _is_status(settings["status"]):
        errors.append("status must be an HTTP status code")
    if mode == "status" and "status" not in settings:
        errors.append('mode "status" needs "status"')
    if "status" in settings and mode != "status" and "fail_next" not in settings:
        errors.append('"status" needs mode "status" or "fail_next"')
    if "retry_after_secs" in settings and not _is_number(settings["retry_after_secs"]):
        errors.append("retry_after_secs must be a number >= 0")
    if "reject_ids" in settings:
        ids = settings["reject_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            errors.append("reject_ids must be a list of strings")
    if "reject_status" in settings and not _is_status(settings["reject_status"]):
        errors.append("reject_status must be an HTTP status code")
    if "delay_ms" in settings and not _is_number(settings["delay_ms"]):
        errors.append("delay_ms must be a number >= 0")
    if "reject_fraction" in settings and not (
        _is_number(settings["reject_fraction"]) and settings["reject_fraction"] <= 1
    ):
        errors.append("reject_fraction must be a number within 0..1")
    if "body" in settings and settings["body"] not in BODIES:
        errors.append(f"body must be one of {', '.join(BODIES)}")
    if "fail_next" in settings:
        n = settings["fail_next"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            errors.append("fail_next must be an integer >= 0")
    return errors


def _hash_fraction(event_id: str) -> float:
    """A number in [0, 1) fixed by the id: which ids `reject_fraction` rejects."""
    return int.from_bytes(hashlib.sha1(event_id.encode()).digest()[:8], "big") / 2**64


def _rejected_entry(envelope: Mapping[str, Any], status: int) -> dict[str, Any]:
    data = envelope.get("data")
    key = data.get("tracking_id") if isinstance(data, dict) else None
    return {"id": envelope["id"], "type": envelope.get("type"),
            "key": str(key or envelope.get("subject")), "status": status}


def _json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode("utf-8"),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class Receiver:
    """A WMS or ERP stand-in; start it in the running event loop.

    `events` is the live list of unique envelopes in arrival order, each with
    `_received_at` (time.time()) and `_arrival` (1, 2, ... over every delivery); `redelivered` the repeats of an id already received, in
    arrival order; `deliveries` both, in arrival order (what a ledger is given). Not
    thread-safe: use it from the loop that started it.
    """

    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int = 0, control_port: int = 0
    ) -> None:
        self.name = name
        self.host = host
        self._events_port = port
        self._control_port = control_port
        self.failures = Failures()
        self.events: list[dict[str, Any]] = []
        self.redelivered: list[dict[str, Any]] = []
        self.rejected: dict[str, dict[str, Any]] = {}
        self._arrivals = 0
        self._seen: set[str] = set()
        self.duplicates = 0
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.idempotency_key_errors = 0
        self._events_runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None

    @property
    def events_port(self) -> int:
        return self._events_port

    @property
    def control_port(self) -> int:
        return self._control_port

    @property
    def listening(self) -> bool:
        return self._events_runner is not None

    async def start(self) -> None:
        control = web.Application()
        control.router.add_post("/_control", self._handle_control)
        control.router.add_get("/_control", self._handle_get_control)
        control.router.add_get("/_received", self._handle_received)
        control.router.add_get("/_stats", self._handle_stats)
        control.router.add_post("/_reset", self._handle_reset)
        self._control_runner, self._control_port = await self._serve(control, self._control_port)
        await self._listen()
        log.info("receiver %s events=%d control=%d", self.name, self.events_port, self.control_port)

    async def stop(self) -> None:
        await self._unlisten()
        if self._control_runner is not None:
            await self._control_runner.cleanup()
            self._control_runner = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def control(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Apply control settings (as `POST /_control`); raises ControlError when invalid."""
        errors = _check_control(settings)
        if errors:
            raise ControlError("; ".join(errors))
        f = self.failures
        mode = settings.get("mode")
        if mode == "ok":
            self.failures = f = Failures()
            await self._listen()
        elif mode == "refuse":
            f.mode = "refuse"
            await self._unlisten()
        elif mode == "status":
            f.mode, f.status = "status", settings["status"]
        if "retry_after_secs" in settings:
            f.retry_after_secs = settings["retry_after_secs"]
        if "reject_ids" in settings:
            f.reject_ids = frozenset(settings["reject_ids"])
        if "reject_status" in settings:
            f.reject_status = settings["reject_status"]
        if "delay_ms" in settings:
            f.delay_ms = float(settings["delay_ms"])
        if "fail_next" in settings:
            f.fail_next = settings["fail_next"]
            f.fail_next_status = settings.get("status", 503)
        if "reject_fraction" in settings:
            f.reject_fraction = float(settings["reject_fraction"])
        if "body" in settings:
            f.body = settings["body"]
        return f.to_json()

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unique": len(self.events),
            "duplicates": self.duplicates,
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "idempotency_key_errors": self.idempotency_key_errors,
        }

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        """Every accepted delivery in arrival order, repeats of an id included."""
        return merge_deliveries(self.events, self.redelivered)

    def reset(self) -> None:
        self.events = []
        self.redelivered = []
        self.rejected = {}
        self._seen.clear()
        self.duplicates = self.requests = self.idempotency_key_errors = 0
        self.statuses.clear()

    async def wait_for_events(self, count: int, timeout_secs: float) -> bool:
        """True once at least `count` unique events arrived, False on timeout."""
        deadline = time.monotonic() + timeout_secs
        while len(self.events) < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _serve(self, app: web.Application, port: int) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner, int(runner.addresses[0][1])

    async def _listen(self) -> None:
        if self._events_runner is not None:
            return
        # A fresh app each time: an aiohttp app is frozen by the runner that served it.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/events", self._handle_events)
        # After the first bind the port is fixed, so "ok" listens where "refuse" stopped.
        self._events_runner, self._events_port = await self._serve(app, self._events_port)

    async def _unlisten(self) -> None:
        runner, self._events_runner = self._events_runner, None
        if runner is not None:
            await runner.cleanup()

    def _failure_response(self, status: int) -> web.Response:
        headers = None
        if self.failures.retry_after_secs is not None:
            # HTTP delta-seconds are whole numbers.
            headers = {"Retry-After": str(math.ceil(self.failures.retry_after_secs))}
        if self.failures.body == "garbage":
            return web.Response(body=GARBAGE, status=status, headers=headers,
                                content_type="text/html")
        return _json_response({"error": f"injected failure {status}"}, status, headers)

    async def _handle_events(self, request: web.Request) -> web.Response:
        response = await self._events_response(request)
        self.statuses[response.status] += 1
        return response

    async def _events_response(self, request: web.Request) -> web.Response:
        self.requests += 1
        f = self.failures
        if f.delay_ms:
            await asyncio.sleep(f.delay_ms / 1000.0)
        if f.fail_next > 0:
            f.fail_next -= 1
            return self._failure_response(f.fail_next_status)
        if f.mode == "status":
            return self._failure_response(f.status)

        envelopes, error = await self._parse(request)
        if error:
            return _json_response({"error": error}, 400)
        key = request.headers.get("Idempotency-Key")
        if not key or (request.content_type == SINGLE and key != envelopes[0]["id"]):
            self.idempotency_key_errors += 1
        if f.reject_ids or f.reject_fraction:
            rejected = [e for e in envelopes if e["id"] in f.reject_ids
                        or _hash_fraction(e["id"]) < f.reject_fraction]
            if rejected:
                for e in rejected:
                    self.rejected.setdefault(e["id"], _rejected_entry(e, f.reject_status))
                if f.body == "garbage":
                    return web.Response(body=GARBAGE, status=f.reject_status,
                                        content_type="text/html")
                # A batch is all or nothing: nothing of it is recorded.
                body = {"error": "rejected by test control",
                        "rejected_ids": [e["id"] for e in rejected]}
                return _json_response(body, f.reject_status)

        now = time.time()
        accepted = 0
        for envelope in envelopes:
            self._arrivals += 1
            envelope["_received_at"] = now
            envelope["_arrival"] = self._arrivals
            if envelope["id"] in self._seen:
                self.duplicates += 1
                self.redelivered.append(envelope)
                continue
            self._seen.add(envelope["id"])
            self.events.append(envelope)
            accepted += 1
        return _json_response({"accepted": accepted, "duplicates": len(envelopes) - accepted})

    async def _parse(self, request: web.Request) -> tuple[list[dict[str, Any]], str | None]:
        if request.content_type not in (SINGLE, BATCH):
            return [], f"content type must be {SINGLE} or {BATCH}"
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return [], f"invalid JSON: {exc}"
        if request.content_type == SINGLE:
            if not isinstance(body, dict):
                return [], f"{SINGLE} must be one JSON object"
            envelopes = [body]
        elif not isinstance(body, list) or not body:
            return [], f"{BATCH} must be a non-empty JSON array"
        else:
            envelopes = body
        for i, envelope in enumerate(envelopes):
            if not isinstance(envelope, dict):
                return [], f"event {i} is not an object"
            missing = [a for a in REQUIRED_ATTRIBUTES if a not in envelope]
            if missing:
                return [], f"event {i} lacks {', '.join(missing)}"
            if not isinstance(envelope["id"], str) or not envelope["id"]:
                return [], f"event {i} id must be a non-empty string"
        return envelopes, None

    async def _handle_control(self, request: web.Request) -> web.Response:
        try:
            settings = await request.json()
        except ValueError as exc:
            return _json_response({"error": f"invalid JSON: {exc}"}, 400)
        if not isinstance(settings, dict):
            return _json_response({"error": "control body must be a JSON object"}, 400)
        try:
            return _json_response(await self.control(settings))
        except ControlError as exc:
            return _json_response({"error": str(exc)}, 400)

    async def _handle_get_control(self, _request: web.Request) -> web.Response:
        return _json_response(self.failures.to_json())

    async def _handle_received(self, _request: web.Request) -> web.Response:
        return _json_response(
            {"events": self.events, "redelivered": self.redelivered,
             "rejected": list(self.rejected.values()), **self.stats()}
        )

    async def _handle_stats(self, _request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _handle_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return _json_response(self.stats())


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    receiver = Receiver(args.name, args.host, args.port, args.control_port)
    await receiver.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # One line on stdout that a parent process waits for before it sends anything.
    print(
        f"READY {receiver.name} events={receiver.events_port} control={receiver.control_port}",
        flush=True,
    )
    await stop.wait()
    await receiver.stop()
    log.info("receiver %s stopped: %s", receiver.name, receiver.stats())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulators.receiver",
        description="Stand-in WMS/ERP receiving CloudEvents over HTTP, with failure modes.",
    )
    p.add_argument("--name", default="wms")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="events port (0: pick a free one)")
    p.add_argument("--control-port", type=int, default=0, help="control port (0: pick one)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    asyncio.run(_serve_until_signalled(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
