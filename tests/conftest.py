"""Shared fixtures: a real mosquitto broker for the whole session."""

from __future__ import annotations

import pytest

from simulators.broker import Mosquitto


@pytest.fixture(scope="session")
def broker():
    with Mosquitto() as m:
        yield m
