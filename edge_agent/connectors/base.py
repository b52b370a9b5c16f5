"""The connector contract.

A connector speaks one protocol and knows nothing of business meaning. ``run(ingest)``
connects, streams decoded ``DeviceEvent``s (and malformed payloads) into ``ingest`` with an
ack callback per message, and returns only on ``stop()``. When the connection is lost it
raises ``RetriableError`` (usually ``NotConnected``); the supervisor restarts it with
backoff, so every connector fails and recovers the same way. It must never acknowledge a
message itself: the ack callback runs after the message's effects are durably committed.
"""

from __future__ import annotations

from typing import Protocol

from ..rules.engine import Ingest


class Connector(Protocol):
    name: str

    async def run(self, ingest: Ingest) -> None: ...

    async def stop(self) -> None: ...
