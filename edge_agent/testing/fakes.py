"""Fakes for unit tests of rules and connectors (shipped with the package)."""

from __future__ import annotations

import json
from typing import Any

from ..events import BusinessEvent, DeviceEvent


class RecordingOutput:
    """A rule ``Output`` that keeps what was emitted and the latest state per key."""

    def __init__(self) -> None:
        self.events: list[BusinessEvent] = []
        self.state: dict[tuple[str, str], Any] = {}

    def emit(self, ev: BusinessEvent) -> None:
        self.events.append(ev)

    def state_changed(self, rule: str, key: str, value: Any | None) -> None:
        # Serialize now, as the outbox would at commit, so later mutation cannot leak in.
        self.state[(rule, key)] = None if value is None else json.loads(
            json.dumps(value, default=lambda o: o.to_json())
        )

    def persisted(self, rule: str) -> dict[str, Any]:
        """What a restarted rule would load: the live keys of ``rule``."""
        return {k: v for (r, k), v in self.state.items() if r == rule and v is not None}

    def types(self) -> list[str]:
        return [e.type for e in self.events]


class RecordingIngest:
    """An ``Ingest`` that records device events and bad payloads, acking at once."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []
        self.bad: list[tuple[str, str, str, str, bytes]] = []

    def device_event(self, ev: DeviceEvent, ack: Any) -> None:
        self.events.append(ev)
        if ack is not None:
            ack()

    def bad_payload(self, device: str, source: str, reason: str, detail: str, payload: bytes, ack: Any) -> None:
        self.bad.append((device, source, reason, detail, payload))
        if ack is not None:
            ack()
