"""The connector contract.

A connector speaks one protocol and knows nothing of business meaning. ``run(ingest)``
connects, streams decoded ``DeviceEvent``s (and malformed payloads) into ``ingest`` with an
ack callback per message, and returns only on ``stop()``. When the connection is lost it
raises ``RetriableError`` (usually ``NotConnected``); the supervisor restarts it with
backoff, so every connector fails and recovers the same way. Any other exception is taken
as an internal error of that connector (logged with its traceback, restarted the same way):
one device never stops the agent. It must never acknowledge a message itself: the ack
callback runs after the message's effects are durably committed.

Backpressure: ``pause_reading()`` and ``resume_reading()`` are called by the agent (from
the event loop, synchronous, idempotent) when the outbox is over its quota or the disk is
full, and when it is not any more. While paused a connector ingests nothing new and leaves
what it has not read where it is: on the broker (MQTT: unacknowledged, unread), on the
device (Modbus: no polls, handshakes not acknowledged), in the server's queues (OPC UA:
publishing disabled on the subscription). The pause holds across reconnects until resumed.
Where the device's own buffer is bounded (an OPC UA monitored item's queue, a counter
register holding only the latest value), a long pause can overflow it: that shows as a
counter gap or an overflow, never as a silent loss.
"""

from __future__ import annotations

from typing import Protocol

from ..rules.engine import Ingest


class Connector(Protocol):
    name: str

    async def run(self, ingest: Ingest) -> None: ...

    async def stop(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...
