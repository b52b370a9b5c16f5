"""Runs a component forever, restarting it with backoff when it fails transiently.

Components (connectors, links) raise ``RetriableError`` when they lose their peer; the
supervisor logs once per change of state (loud when it breaks, once when it recovers),
waits a capped, jittered, growing delay, and starts it again. Anything else is a bug: it
propagates and stops the agent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import RetriableError
from ..outbox.dispatcher import backoff_delay

log = logging.getLogger(__name__)


@dataclass
class Health:
    """What an operator sees of one component."""

    state: str = "starting"  # starting | online | degraded | offline | stopped
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    restarts: int = 0
    on_change: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
            if self.on_change is not None:
                self.on_change(state)
        if error is not None:
            self.last_error = error


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    health: Health,
    *,
    initial_backoff_secs: float = 0.5,
    max_backoff_secs: float = 30.0,
    stable_secs: float = 30.0,
) -> None:
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            await run()
            health.set("stopped")
            return
        except RetriableError as exc:
            if time.monotonic() - started > stable_secs:
                attempt = 0
            if health.state != "offline":
                log.warning("%s went offline, reconnecting with backoff: %s", name, exc)
            health.set("offline", str(exc))
            health.restarts += 1
            delay = backoff_delay(attempt, initial_backoff_secs, max_backoff_secs)
            attempt += 1
            await asyncio.sleep(max(delay, 0.05))
