"""Unit-test fixtures: a real small filesystem for the outbox's disk-full tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """``small_tmpfs("2m")`` mounts a tmpfs of that size and returns its path (unmounted at
    the end); skipped when mounting is not possible here (it needs root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"small{len(mounted)}"
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root (and mount permission in this sandbox)")
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, timeout=10)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)
