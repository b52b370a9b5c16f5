"""Shared fixtures: a real mosquitto broker for the whole session; and a check, at the end of
the session, that no process a test started outlived it."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from hypothesis import settings

from simulators.broker import Mosquitto

# `make test` is reproducible: property tests draw the same examples on every run, so a CI
# verdict does not depend on luck. `make explore` (HYPOTHESIS_PROFILE=explore) searches anew,
# with more examples; every case it finds is added to the test as an @example.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Every process started from this session inherits this mark in its environment, so a
# survivor is found even when its parent died and it was re-parented away from pytest.
SESSION_MARK = "EDGE_AGENT_TEST_SESSION"
os.environ[SESSION_MARK] = token = f"{os.getpid()}-{time.time_ns()}"
EXIT_GRACE_SECS = 5.0  # a process stopped by the last teardown may still be exiting


def _survivors() -> list[psutil.Process]:
    """Processes of this session still running: descendants of pytest, or any process
    carrying the session's mark."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter():
        if p.pid == me.pid or p.pid in found:
            continue
        try:
            if p.environ().get(SESSION_MARK) == token:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
    alive = []
    for p in found.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {p.pid}: gone"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process a test started outlives the session (then stop it)."""
    if session.config.pluginmanager.hasplugin("dsession"):
        return  # the pytest-xdist controller: each worker checks what its own tests started
    left = _survivors()
    if left:
        _gone, left = psutil.wait_procs(left, timeout=EXIT_GRACE_SECS)
    if not left:
        return
    lines = [_describe(p) for p in left]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=EXIT_GRACE_SECS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = "processes started by the tests outlived them (now killed):\n  " + "\n  ".join(lines)
    if reporter is not None:
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(msg)
    else:
        print(msg)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def broker():
    with Mosquitto() as m:
        yield m
