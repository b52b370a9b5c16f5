"""Fixtures of the end-to-end tests."""

import pytest

from tests.e2e.harness import Line


@pytest.fixture
def line(broker, tmp_path):
    ln = Line(broker, tmp_path)
    yield ln
    ln.close()
