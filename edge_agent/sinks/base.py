"""The sink contract, shared by every destination and checked by ``edge_agent.testing``.

``send(items)`` delivers a batch *in order* and returns one result per item: ``None`` if
the destination accepted it (or already had it), or a short reason string if it rejected it
for good (the dispatcher dead-letters it). A transient failure raises ``RetriableError``
(nothing of the batch counts as delivered) or ``SendIncomplete`` (the first
``len(results)`` items have results, the rest must be retried). A sink never retries or
sleeps on its own: timing belongs to the dispatcher. The dispatcher's retry after a
transient failure is the same items (or the unsettled rest) again; a sink may recognise
them (e.g. the MQTT sink's publishes still in flight) so that what the destination already
acknowledged is not sent again. A batch's idempotency key is a function of its event ids.

Whatever a peer sent (a response body, a reason phrase, a header) is untrusted text: a sink
passes it through ``peer_text`` before it becomes part of a rejection reason or an error
message, so logs and the outbox's ``last_error`` stay one printable, bounded line.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import RetriableError
from ..outbox.store import Pending

Result = str | None  # None delivered; str = permanent rejection reason

PEER_TEXT_MAX_CHARS = 300  # default bound of untrusted text in a log line or error


def peer_text(text: str, limit: int = PEER_TEXT_MAX_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters (+ a "…" marker).

    Whitespace runs (newlines, tabs) become one space; other characters that are not
    printable (NUL, escape sequences, bidi overrides, unpaired surrogates) are shown
    escaped (``\\x00``), so a log line can neither be split nor forged nor recolored.
    """
    if len(text) <= limit and text.isprintable():
        return text
    out: list[str] = []
    n = 0
    space = False
    for ch in text[: limit * 2]:  # escapes only lengthen: this is enough to fill ``limit``
        if ch.isprintable():
            piece, space = ch, False
        elif ch.isspace():
            if space:
                continue
            piece, space = " ", True
        else:
            o, space = ord(ch), False
            piece = f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
        if n + len(piece) > limit:
            return "".join(out) + "…"
        out.append(piece)
        n += len(piece)
    if len(text) > limit * 2:
        return "".join(out) + "…"
    return "".join(out)


class SendIncomplete(RetriableError):
    """A transient failure after part of the batch got its results."""

    def __init__(self, results: list[Result], cause: RetriableError):
        self.results = results
        self.cause = cause
        super().__init__(str(cause), retry_after_secs=cause.retry_after_secs)


class Sink(Protocol):
    name: str
    batch_max_events: int

    async def start(self) -> None:
        """Prepare (clients, pools). Must not fail because the destination is down."""
        ...

    async def send(self, items: list[Pending]) -> list[Result]: ...

    async def close(self) -> None: ...
