"""Runs a component forever, restarting it with backoff whenever it fails.

One component's failure never stops the agent. Components (connectors, links) raise
``RetriableError`` when they lose their peer: an expected failure, logged once as a warning
when it goes offline. Any other ``Exception`` is an internal error of that component (a bug
of ours or a library's, e.g. a bare ``AssertionError``): logged at ERROR with its traceback
once (again only if a different error comes), and then handled like a lost peer, so the
other devices keep running and an operator sees the reason in the component's health.
``asyncio.CancelledError`` (shutdown) and ``BaseException``s propagate.

Backoff: capped, full-jitter, growing with each failed restart; it starts over as soon as
the component has been *online* again (its ``Health`` reached "online"), so a device that
answers again after a long outage and then drops is retried within the initial delay, not
after the outage's grown delay. A component that never reports "online" starts over after
``stable_secs`` of running.
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
    onlines: int = 0  # times it came online (the supervisor resets its backoff on a change)
    on_change: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
            if state == "online":
                self.onlines += 1
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
    """Run ``run()`` until it returns (then "stopped"); restart it after every failure."""
    attempt = 0
    last_internal: tuple[type, str] | None = None  # logged with its traceback already
    while True:
        started = time.monotonic()
        onlines = health.onlines
        try:
            await run()
            health.set("stopped")
            return
        except RetriableError as exc:
            reason = str(exc)
            if health.state != "offline":
                log.warning("%s went offline, reconnecting with backoff: %s", name, reason)
        except Exception as exc:  # CancelledError is a BaseException: it propagates
            reason = f"internal error: {exc!r}"
            if (type(exc), str(exc)) != last_internal:
                last_internal = (type(exc), str(exc))
                log.error("%s stopped on an internal error; restarting it with backoff: %r",
                          name, exc, exc_info=exc)
            elif health.state != "offline":
                log.warning("%s went offline again on the same internal error: %r", name, exc)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Shutdown cancelled us, but the component turned the cancel into a failure
            # (asyncio.wait_for in Python 3.11 can): never restart it then.
            raise asyncio.CancelledError
        if health.onlines != onlines or time.monotonic() - started > stable_secs:
            attempt = 0  # it was online (or ran a good while) since the last failure
        if health.onlines != onlines:
            last_internal = None
        health.set("offline", reason)
        health.restarts += 1
        delay = backoff_delay(attempt, initial_backoff_secs, max_backoff_secs)
        attempt += 1
        await asyncio.sleep(max(delay, 0.05))
