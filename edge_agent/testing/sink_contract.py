"""The contract every sink passes (see ``edge_agent.sinks.base``), as one reusable check.

A sink's own test suite provides a way to build the sink against a live receiver (a real
server or broker started by the test) and a view of what that receiver got, translated
into ``ReceivedEvent``s; ``check_sink_contract`` then verifies what the dispatcher and the
receivers rely on:

- ``start()`` succeeds, and also when the destination is down (if a factory for that is
  given); a send to a down destination raises ``RetriableError``, nothing else;
- ``send([])`` returns ``[]``; ``send(items)`` returns one ``None`` per item when the
  receiver accepts everything;
- the receiver gets every event once per send, in order, with its envelope unchanged
  (including non-ASCII data) and a non-empty idempotency key;
- sending the same items again (a redelivery) succeeds and carries the same keys, so the
  receiver can deduplicate (a key is a function of the event ids it covers, never of when or
  how often they were sent);
- ``close()`` may be called twice.

Not checked here, but part of the contract (``sinks/base.py``) and tested per sink: a
rejection reason and a transient error's message are one printable line of bounded length
(``peer_text``), whatever the destination sent; a transient failure after part of a batch
reports the settled prefix (``SendIncomplete``), and a retry of the rest re-sends only what
was not acknowledged.

It raises ``AssertionError`` with a readable message and depends on nothing but the agent,
so any test runner can use it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RetriableError
from ..events import BusinessEvent, envelope, event_id
from ..outbox.store import Pending
from ..sinks.base import Sink


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event as the receiver saw it.

    ``envelope`` is the parsed CloudEvents object; ``key`` is what the receiver would
    deduplicate on for this event (an HTTP ``Idempotency-Key``, an MQTT user property).
    """

    envelope: dict[str, Any]
    key: str | None


ReceiverView = Callable[[], Sequence[ReceivedEvent] | Awaitable[Sequence[ReceivedEvent]]]


def sample_items(n: int, *, first_seq: int = 1, site: str = "test-site") -> list[Pending]:
    """``n`` outbox rows with real CloudEvents envelopes (some non-ASCII data, two subjects)."""
    items = []
    for seq in range(first_seq, first_seq + n):
        subject = f"C{seq:07d}" if seq % 2 else "C-shared"
        ev = BusinessEvent(
            id=event_id(site, "contract", str(seq)),
            type="carton_closed",
            subject=subject,
            time=1_700_000_000.0 + seq,
            source=f"edge-agent/{site}/rules/contract",
            data={"carton_id": subject, "weight_g": 1000.5 + seq, "station": "Waage-Süd", "n": seq},
        )
        items.append(Pending(seq, ev.id, ev.type, ev.subject, envelope(ev, site), attempts=0))
    return items


async def check_sink_contract(
    make_sink: Callable[[], Sink],
    receiver_events: ReceiverView,
    *,
    make_unreachable_sink: Callable[[], Sink] | None = None,
    events: int = 5,
) -> None:
    """Run the sink contract; ``receiver_events()`` returns everything received so far."""

    async def received() -> list[ReceivedEvent]:
        got = receiver_events()
        if inspect.isawaitable(got):
            got = await got
        return list(got)

    items = sample_items(events)
    sink = make_sink()
    _check(isinstance(sink.name, str) and sink.name, "sink.name must be a non-empty str")
    _check(sink.batch_max_events >= 1, f"batch_max_events must be >= 1, is {sink.batch_max_events}")
    await sink.start()
    try:
        before = len(await received())
        _check(await sink.send([]) == [], "send([]) must return []")
        _check(len(await received()) == before, "send([]) must not deliver anything")

        first = await _send_and_check(sink, items, received, before)
        again = await _send_and_check(sink, items, received, before + len(items))
        _check(
            [e.key for e in first] == [e.key for e in again],
            "a redelivery of the same items must carry the same idempotency keys",
        )
    finally:
        await sink.close()
    await sink.close()  # closing twice is harmless

    if make_unreachable_sink is not None:
        down = make_unreachable_sink()
        await down.start()  # must not fail: the destination being down is not a start error
        try:
            try:
                results = await down.send(items[:2])
            except RetriableError:
                pass
            except Exception as exc:
                raise AssertionError(
                    f"a send to a down destination must raise RetriableError, not {exc!r}"
                ) from exc
            else:
                raise AssertionError(f"a send to a down destination returned {results!r}")
        finally:
            await down.close()


async def _send_and_check(
    sink: Sink,
    items: list[Pending],
    received: Callable[[], Awaitable[list[ReceivedEvent]]],
    before: int,
) -> list[ReceivedEvent]:
    results = await sink.send(items)
    _check(
        results == [None] * len(items),
        f"an accepting receiver must give one None per item, got {results!r}",
    )
    got = (await received())[before:]
    ids = [e.envelope.get("id") for e in got]
    _check(
        ids == [it.id for it in items],
        f"the receiver must get every event once, in order: expected {[it.id for it in items]}, "
        f"got {ids}",
    )
    for it, ev in zip(items, got, strict=True):
        _check(ev.envelope == json.loads(it.body), f"event {it.id} arrived changed: {ev.envelope}")
        _check(bool(ev.key), f"event {it.id} arrived without an idempotency key")
    return got


def _check(ok: object, message: str) -> None:
    if not ok:
        raise AssertionError(message)
