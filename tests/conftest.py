"""Shared fixtures: a real mosquitto broker for the whole session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from simulators.broker import Mosquitto

# `make test` is reproducible: property tests draw the same examples on every run, so a CI
# verdict does not depend on luck. `make explore` (HYPOTHESIS_PROFILE=explore) searches anew,
# with more examples; every case it finds is added to the test as an @example.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def broker():
    with Mosquitto() as m:
        yield m
