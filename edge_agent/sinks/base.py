"""The sink contract, shared by every destination and checked by ``edge_agent.testing``.

``send(items)`` delivers a batch *in order* and returns one result per item: ``None`` if
the destination accepted it (or already had it), or a short reason string if it rejected it
for good (the dispatcher dead-letters it). A transient failure raises ``RetriableError``
(nothing of the batch counts as delivered) or ``SendIncomplete`` (the first
``len(results)`` items have results, the rest must be retried). A sink never retries or
sleeps on its own: timing belongs to the dispatcher.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import RetriableError
from ..outbox.store import Pending

Result = str | None  # None delivered; str = permanent rejection reason


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
