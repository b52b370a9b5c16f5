"""Unit-test fixtures: a real small filesystem for the outbox's disk-full tests, and the
smallest site an ``Agent`` can be built from for them."""

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


# One Modbus conveyor (never reached: port 1), one map rule, HTTP sinks that are never
# called: enough to build an Agent whose outbox the disk tests drive.
OUTBOX_SITE = """
site: outbox-unit
profiles_dir: {profiles}
devices:
  CONV3:
    profile: acme_conveyor_section
    connection: {{kind: modbus, host: 127.0.0.1, port: 1, timeout_ms: 500}}
rules:
  - name: conveyor-faults
    kind: map
    inputs:
      jam: {{device: CONV3, event: jam}}
    emit:
      type: equipment_fault
      subject: CONV3
      data: {{equipment: CONV3, reason: "${{jam.fault_code}}"}}
sinks:
  wms:
    kind: http
    url: http://127.0.0.1:1/events
  erp:
    kind: http
    url: http://127.0.0.1:1/erp
outbox:
  path: {db}
{extra}"""


def outbox_site(db: Path, extra: str = "") -> str:
    """The text of that site, its outbox at ``db``; ``extra``: more ``outbox:`` lines."""
    from simulators.procs import PROFILES

    return OUTBOX_SITE.format(profiles=PROFILES, db=db, extra=extra)
