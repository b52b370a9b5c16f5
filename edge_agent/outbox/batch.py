"""A group-commit batch: everything that must become durable together, then be acknowledged.

Filled on the event loop by the engine and connectors; ``seal()`` serializes it (still on the
loop, so nothing mutates under the database thread); the store commits the sealed batch in
one transaction; only then are the ``acks`` called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..events import BusinessEvent


def _to_json(o: Any) -> Any:
    return o.to_json()  # rule state objects serialize themselves, once, at seal


def _dumps(v: Any) -> str:
    return orjson.dumps(v, default=_to_json).decode()


@dataclass(slots=True)
class Quarantined:
    device: str
    source: str  # topic, register address, node id: where it came from
    reason: str
    detail: str
    payload: bytes
    received_at: float


@dataclass(slots=True)
class Settle:
    """The outcome of one delivery attempt of (sink, seq)."""

    sink: str
    seq: int
    state: int  # DELIVERED, PENDING (retry later), DEAD
    error: str | None
    at: float


@dataclass(slots=True)
class SealedBatch:
    events: list[tuple[int, str, str, str, float, float, str]]  # seq, id, type, subject, ...
    routes: list[tuple[str, int, str]]  # (sink, seq, event id)
    state_upserts: list[tuple[str, str, str]]
    state_deletes: list[tuple[str, str]]
    inputs: list[tuple[str, float]]
    quarantine: list[tuple[str, str, str, str, bytes, float]]
    settles: list[Settle]


@dataclass(slots=True)
class Batch:
    events: list[BusinessEvent] = field(default_factory=list)
    state: dict[tuple[str, str], Any] = field(default_factory=dict)
    inputs: list[tuple[str, float]] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)
    settles: list[Settle] = field(default_factory=list)
    acks: list[Callable[[], None]] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.inputs) + len(self.events) + len(self.quarantine) + len(self.settles)
            + len(self.state)
        )

    def emit(self, ev: BusinessEvent) -> None:
        self.events.append(ev)

    def state_changed(self, rule: str, key: str, value: Any | None) -> None:
        self.state[(rule, key)] = value

    def seal(self, routes: dict[str, list[str]], now: float, first_seq: int) -> SealedBatch:
        """Serialize; ``routes`` maps event type -> sinks that receive it; events get
        consecutive outbox sequence numbers from ``first_seq``."""
        events = self.events
        ups, dels = [], []
        for (rule, key), v in self.state.items():
            if v is None:
                dels.append((rule, key))
            else:
                ups.append((rule, key, _dumps(v)))
        return SealedBatch(
            events=[
                (first_seq + i, e.id, e.type, e.subject, e.time, now, e.body)
                for i, e in enumerate(events)
            ],
            routes=[
                (s, first_seq + i, e.id)
                for i, e in enumerate(events)
                for s in routes.get(e.type, ())
            ],
            state_upserts=ups,
            state_deletes=dels,
            inputs=self.inputs,
            quarantine=[
                (q.device, q.source, q.reason, q.detail, q.payload, q.received_at)
                for q in self.quarantine
            ],
            settles=self.settles,
        )
