"""The supervisor: one component's failure, expected or not, never stops the agent; it is
restarted with backoff, and its backoff starts over as soon as it has been online again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edge_agent.errors import NotConnected
from edge_agent.runtime import supervisor
from edge_agent.runtime.supervisor import Health, supervise


async def until(pred, secs: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + secs
    while asyncio.get_running_loop().time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


@pytest.fixture
def attempts(monkeypatch):
    """The backoff attempt number the supervisor asked a delay for, in order (delay 0)."""
    seen: list[int] = []

    def record(attempt: int, initial: float, cap: float) -> float:
        seen.append(attempt)
        return 0.0

    monkeypatch.setattr(supervisor, "backoff_delay", record)
    return seen


async def test_an_unexpected_exception_is_an_internal_error_of_that_component_not_a_crash(
        attempts, caplog):
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise AssertionError("a library's bare assert")

    h = Health()
    task = asyncio.create_task(supervise("opcua:SORTER1", broken, h))
    try:
        assert await until(lambda: runs >= 4 or task.done())
        assert not task.done(), task.exception()  # still supervising: restarted, not propagated
        assert h.state == "offline"
        assert "internal error" in h.last_error and "AssertionError" in h.last_error
        assert "a library's bare assert" in h.last_error
        assert h.restarts >= 3
        # Backoff grows while it keeps failing.
        assert attempts[:3] == [0, 1, 2]
        # The traceback is logged once, not at every restart.
        tracebacks = [r for r in caplog.records if r.exc_info and r.name == supervisor.__name__]
        assert len(tracebacks) == 1
        assert "opcua:SORTER1" in tracebacks[0].getMessage()
        assert tracebacks[0].levelno == logging.ERROR
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_different_unexpected_error_is_logged_again(attempts, caplog):
    errors = [ValueError("one"), ValueError("one"), KeyError("two"), KeyError("two")]

    async def broken() -> None:
        if errors:
            raise errors.pop(0)
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("x", broken, Health()))
    try:
        assert await until(lambda: not errors)
        await asyncio.sleep(0)
        tracebacks = [r for r in caplog.records if r.exc_info and r.name == supervisor.__name__]
        assert [type(r.exc_info[1]) for r in tracebacks] == [ValueError, KeyError]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancellation_still_propagates(attempts):
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("x", forever, Health()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_backoff_starts_over_once_the_component_was_online_again(attempts):
    """Three failed connects, then a connect that comes online and drops at once: the
    next retry is the first of a new series, not the fourth of the old one (a device that
    answers again is back within the initial backoff, whatever happened before)."""
    h = Health()
    script = ["fail", "fail", "fail", "online", "fail", "fail", "online", "park"]

    async def component() -> None:
        step = script.pop(0)
        if step == "park":
            await asyncio.Event().wait()
        if step == "online":
            h.set("online")
        raise NotConnected(f"step {step}")

    task = asyncio.create_task(supervise("modbus:CW2", component, h))
    try:
        assert await until(lambda: not script)
        assert attempts == [0, 1, 2, 0, 1, 2, 0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_clean_return_stops_supervision():
    async def done() -> None:
        return None

    h = Health()
    await asyncio.wait_for(supervise("x", done, h), 5)
    assert h.state == "stopped"


async def test_a_component_that_turns_the_shutdown_cancel_into_a_failure_is_not_restarted():
    """asyncio.wait_for (Python 3.11) can swallow a cancel and raise the inner error instead:
    the MQTT connector did, and the supervisor reconnected it forever during shutdown."""
    runs = 0
    started = asyncio.Event()

    async def swallows_cancel() -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise NotConnected("link closed") from None  # the cancel is lost here

    task = asyncio.create_task(supervise("mqtt:plant", swallows_cancel, Health()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert task in done and task.cancelled()
    assert runs == 1
