"""The fault scenarios: each runs the real agent under load through one kind of fault, bounded
in time, and is judged by the ledger against its targets.

Every scenario has a full size (``make faults``) and a quick size (the short tier in
``make test``); ``Size`` holds both. A scenario never decides by itself that a miss is fine:
``Result.misses`` lists every target it missed, and ``faults.run`` exits non-zero on any.

Targets (issue 8): lost 0, invented 0, duplicate facts 0 (also wrong values 0 and events of a
business key in the order they happened), re-sends to a healthy receiver 0, no agent exit
except our kill -9s; where measured: peak RSS <= 150 MB through a WMS outage, outbox never
above its quota + one commit, drain after an outage >= 10x the ingest rate, no raw control
characters from a peer in the agent's log.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ledger import LedgerResult, account_sink, summary_counts
from .rig import Rig, log_control_chars

RSS_LIMIT_MB = 150.0
DRAIN_FACTOR = 10.0
# "One commit" over the quota: commit_max_items (2000) inputs, each with its events and
# delivery rows and WAL frames, is well under this.
ONE_COMMIT_MB = 4.0


@dataclass
class Size:
    rate: float
    secs: float
    kills: int = 0
    outage_secs: float = 0.0
    restarts: int = 0


@dataclass
class Result:
    name: str
    title: str
    status: str = "PASS"  # PASS, FAIL, ERROR, SKIP
    reason: str = ""
    rate: float = 0.0
    secs: float = 0.0
    cartons: int = 0
    obligations: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    exits: int = 0
    exit_tails: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_limit_mb: float | None = None
    max_disk_mb: float = 0.0
    quota_mb: float | None = None
    drain_per_s: float | None = None
    drain_target: bool = False  # judged only after a whole outage (wms_down)
    under_fault_per_s: float | None = None  # WMS throughput while it rejected 5%
    ingest_per_s: float | None = None
    recovery_secs: float | None = None
    log_control_lines: int | None = None
    settle_problem: str | None = None
    misses: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ledger_lines: list[str] = field(default_factory=list)

    def judge(self) -> None:
        c = self.counts
        for name in ("lost", "invented", "wrong", "dup_facts", "out_of_order", "healthy_resends"):
            if c.get(name, 0):
                self.misses.append(f"{name.replace('_', ' ')} {c[name]}")
        if self.exits:
            self.misses.append(f"agent exited {self.exits}x")
        if self.settle_problem:
            self.misses.append(f"did not settle: {self.settle_problem}")
        if self.rss_limit_mb is not None and self.peak_rss_mb > self.rss_limit_mb:
            self.misses.append(f"peak RSS {self.peak_rss_mb:.0f} MB > {self.rss_limit_mb:.0f} MB")
        if self.quota_mb is not None and self.max_disk_mb > self.quota_mb + ONE_COMMIT_MB:
            self.misses.append(
                f"outbox {self.max_disk_mb:.1f} MB > quota {self.quota_mb:.0f} MB + one commit")
        if self.under_fault_per_s is not None and self.ingest_per_s and \
                self.under_fault_per_s < 0.9 * self.ingest_per_s:
            self.misses.append(f"WMS took {self.under_fault_per_s:.0f} events/s while rejecting "
                               f"5%, below the ingest rate {self.ingest_per_s:.0f}/s")
        if self.drain_target and self.drain_per_s is not None and self.ingest_per_s:
            if self.drain_per_s < DRAIN_FACTOR * self.ingest_per_s:
                self.misses.append(f"drain {self.drain_per_s:.0f}/s < {DRAIN_FACTOR:.0f}x ingest "
                                   f"{self.ingest_per_s:.0f}/s")
        if self.log_control_lines:
            self.misses.append(f"{self.log_control_lines} log lines with raw control characters")
        if self.misses and self.status == "PASS":  # (a body may have added misses itself)
            self.status = "FAIL"


class Skip(Exception):
    """The scenario cannot run here (e.g. it needs root); the message says why."""


@dataclass
class Scenario:
    name: str
    title: str
    full: Size
    quick: Size
    body: Callable[[Rig, Size, Result], None]
    site: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Path], dict[str, Any]] | None = None  # extra Rig kwargs, may raise Skip
    teardown: Callable[[dict[str, Any]], None] | None = None
    # device -> seconds of run time -> how far that device's clock is off, given the run's length
    clock: Callable[[str, float, float], float] | None = None


def hold(secs: float) -> None:
    """Keep a fault (or the load) going for ``secs``: a duration, not a synchronisation."""
    time.sleep(secs)


def run(sc: Scenario, workdir: Path, *, quick: bool) -> Result:
    size = sc.quick if quick else sc.full
    res = Result(sc.name, sc.title, rate=size.rate)
    extra: dict[str, Any] = {}
    t0 = time.monotonic()
    rig: Rig | None = None
    try:
        if sc.setup is not None:
            extra = sc.setup(workdir)
        clock = sc.clock
        rig = Rig(workdir, name=sc.name, rate=size.rate,
                  clock_offset=None if clock is None else (
                      lambda d, t: clock(d, t, size.secs)),  # type: ignore[misc]
                  **{**sc.site, **{k: v for k, v in extra.items() if not k.startswith("_")}})
        rig.extra = extra
        rig.start()
        rig.run_line()
        sc.body(rig, size, res)
        rig.stop_line()
        res.settle_problem = rig.settle()
        led = rig.ledger()
        _record(res, rig, led)
    except Skip as exc:
        res.status, res.reason = "SKIP", str(exc)
    except Exception as exc:  # a scenario that breaks is reported, not hidden
        res.status = "ERROR"
        res.reason = f"{type(exc).__name__}: {exc}"
        res.notes.append(traceback.format_exc()[-3000:])
        if rig is not None:
            res.notes.append("agent log tail:\n" + rig.agent.log()[-3000:])
    finally:
        if rig is not None:
            res.kills = rig.kills
            res.exits = len(rig.exits)
            res.exit_tails = [e.log_tail[-1500:] for e in rig.exits[:2]]
            res.peak_rss_mb = rig.samples.peak_rss_mb
            res.max_disk_mb = rig.samples.max_disk_mb
            try:
                rig.close()
            except Exception as exc:
                res.notes.append(f"closing the rig: {exc!r}")
        if sc.teardown is not None:
            sc.teardown(extra)
        res.secs = time.monotonic() - t0
    if res.status in ("PASS", "FAIL"):
        res.judge()
    elif res.status == "ERROR":
        res.misses.append(res.reason)
    return res


def _record(res: Result, rig: Rig, led: LedgerResult) -> None:
    assert rig.publisher is not None
    res.cartons = len(rig.publisher.cartons)
    res.obligations = rig.publisher.stats.acked
    res.counts = dict(summary_counts(led))
    res.ledger_lines = led.lines()
    res.log_control_lines = log_control_chars(rig.agent.log())
    if rig.facts is not None:  # the other devices' facts alone (the table counts them too)
        book = rig.facts()
        per = []
        for sink, ds in rig.holdings().items():
            if not book.for_sink(sink)[1]:
                continue
            r = account_sink(sink, [d for d in ds if d.type in book.sinks], [], rig.windows,
                             (), book)
            per.append(f"{sink} {r.unique} held / {r.required} required (lost {r.lost}, "
                       f"invented {r.invented}, wrong {r.wrong}, dup deliveries "
                       f"{r.dup_deliveries}, dup facts {r.dup_facts})")
        res.notes.append(f"device facts ({', '.join(sorted(book.sinks))}), of the table's "
                         f"counts: {'; '.join(per)}")


# --- helpers used by scenario bodies ----------------------------------------------------------


def wms_fault(rig: Rig, secs: float, **control: Any) -> None:
    t = time.time()
    rig.wms.control(**control)
    hold(secs)
    rig.wms.control(mode="ok")
    rig.window(t, time.time(), f"wms {control}", {"wms"})


SAMPLE_SECS = 0.25


def measure_drain(rig: Rig, res: Result, since: float, timeout_secs: float = 600) -> None:
    """After a WMS outage ends at ``since``: seconds until the first delivery, and the WMS's
    receive rate from then until it caught up with the line (the backlog drained)."""
    assert rig.publisher is not None
    samples: list[tuple[float, int, int]] = []  # (time, wms unique, cartons scanned & acked)
    deadline = time.monotonic() + timeout_secs
    start_unique = rig.wms.stats()["unique"]
    first: tuple[float, int] | None = None
    while time.monotonic() < deadline:
        now = time.time()
        u = rig.wms.stats()["unique"]
        samples.append((now, u, rig.publisher.acked_cartons()))
        if first is None and u > start_unique:
            first = (now, u)
        # Caught up: the WMS holds two events (scanned, closed/no-read) for every carton the
        # line had scanned two seconds earlier.
        earlier = [a for t, _, a in samples if t <= now - 2.0]
        if first is not None and earlier and u >= 2 * earlier[-1] - 2 * rig.rate * 0.5:
            res.recovery_secs = first[0] - since
            # Sampled every 0.25 s: a backlog drained between two samples gives a lower
            # bound of its rate, never no figure.
            res.drain_per_s = (u - start_unique) / max(now - first[0], SAMPLE_SECS)
            res.ingest_per_s = 2 * rig.rate
            return
        time.sleep(SAMPLE_SECS)
    res.notes.append(f"the WMS backlog did not drain within {timeout_secs:.0f} s")
    res.drain_per_s = 0.0
    res.ingest_per_s = 2 * rig.rate


# --- scenario bodies ------------------------------------------------------------------------


def body_baseline(rig: Rig, size: Size, res: Result) -> None:
    hold(size.secs)


def body_kill9(rig: Rig, size: Size, res: Result) -> None:
    rnd = random.Random(9)
    hold(2.0)
    ready = []
    for _ in range(size.kills):
        ready.append(rig.kill9())
        hold(rnd.uniform(1.0, 3.0))
    res.notes.append(f"restart to ready after kill -9: max {max(ready):.1f} s")


def body_power_cut(rig: Rig, size: Size, res: Result) -> None:
    rnd = random.Random(6)
    hold(2.0)
    for _ in range(size.kills):
        rig.freeze_copy_kill()
        hold(rnd.uniform(1.0, 3.0))
    res.notes.append(
        "approximation: SIGSTOP, copy of the outbox files as the kernel holds them, kill -9, "
        "restart from the copy; not an O_DIRECT copy of a block device, so writes the kernel "
        "had not flushed to the disk are not lost here as they would be in a power cut")


def body_wms_down(rig: Rig, size: Size, res: Result) -> None:
    hold(2.0)
    third = size.outage_secs / 3
    t = time.time()
    rig.wms.control(mode="refuse")
    hold(third)
    rig.wms.control(mode="ok")
    rig.wms.control(mode="status", status=503)
    hold(third)
    rig.wms.control(mode="ok")
    rig.wms.control(mode="status", status=429, retry_after_secs=5)
    hold(third)
    rig.wms.control(mode="ok")
    end = time.time()
    rig.window(t, end, "wms refused, 503, 429", {"wms"})
    res.rss_limit_mb = RSS_LIMIT_MB
    res.drain_target = True
    measure_drain(rig, res, end)
    hold(2.0)


def body_slow_wms(rig: Rig, size: Size, res: Result) -> None:
    hold(2.0)
    t = time.time()
    rig.wms.control(delay_ms=3000)  # the site's timeout_secs is 2
    hold(size.outage_secs)
    rig.wms.control(mode="ok")
    rig.window(t, time.time() + 3.5, "wms slower than the timeout", {"wms"})
    measure_drain(rig, res, time.time())
    hold(2.0)


def body_rejects(rig: Rig, size: Size, res: Result) -> None:
    hold(2.0)
    t = time.time()
    taken0 = _wms_taken(rig)
    rig.wms.control(reject_fraction=0.05, reject_status=422)
    hold(size.outage_secs / 2)
    rig.wms.control(mode="ok")
    rig.wms.control(reject_fraction=0.05, reject_status=400, body="garbage")
    hold(size.outage_secs / 2)
    res.under_fault_per_s = (_wms_taken(rig) - taken0) / (time.time() - t)
    rig.wms.control(mode="ok")
    rig.window(t, time.time(), "wms rejects", {"wms"})
    measure_drain(rig, res, time.time())
    res.notes.append("5% of WMS events rejected (422, then 400 with a garbage body); rejected "
                     "events are dead by contract and counted as dead, not lost")


def _wms_taken(rig: Rig) -> int:
    """Events the WMS accepted or rejected for good: what the agent got through to it."""
    doc = rig.wms.received()
    return len(doc["events"]) + len(doc["rejected"])


def body_broker_restart(rig: Rig, size: Size, res: Result) -> None:
    hold(2.0)
    for _ in range(size.restarts):
        rig.broker_restart(3.0, hold)
        hold(max(3.0, size.secs / max(1, size.restarts)))


def body_quota(rig: Rig, size: Size, res: Result) -> None:
    hold(1.0)
    t = time.time()
    rig.wms.control(mode="refuse")
    deadline = time.monotonic() + size.outage_secs
    while time.monotonic() < deadline and not rig.samples.paused_seen:
        time.sleep(0.25)
    if rig.samples.paused_seen:
        hold(3.0)  # keep the line running against the paused agent for a while
    else:  # the scenario proved nothing about the quota: that is a miss, not a pass
        res.misses.append(f"the agent never said ingest paused within {size.outage_secs:.0f} s "
                          f"(outbox reached {rig.samples.max_disk_mb:.1f} MB)")
    rig.wms.control(mode="ok")
    rig.window(t, time.time(), "wms refused until the quota paused ingest", {"wms"})
    res.quota_mb = rig.max_disk_mb
    hold(size.secs)


def body_disk_full(rig: Rig, size: Size, res: Result) -> None:
    hold(1.0)
    t = time.time()
    rig.wms.control(mode="refuse")
    deadline = time.monotonic() + size.outage_secs
    disk = {"disk_low", "disk_full"}
    while time.monotonic() < deadline and not rig.samples.pause_causes & disk:
        time.sleep(0.25)
    if not rig.samples.pause_causes & disk:
        res.misses.append(f"the agent never paused ingest for the disk within "
                          f"{size.outage_secs:.0f} s (causes seen: {sorted(rig.samples.pause_causes)})")
    hold(5.0)  # paused for a while, the line still running
    rig.wms.control(mode="ok")
    rig.window(t, time.time(), "wms refused until ingest paused for the disk", {"wms"})
    hold(size.secs)
    res.notes.append(f"ingest paused for {sorted(rig.samples.pause_causes)}; lowest free space "
                     f"{rig.samples.min_free_mb:.2f} MB; disk sizes include <outbox>-reserve")
    if rig.samples.min_free_mb < 0.25:
        res.misses.append(f"the filesystem ran full ({rig.samples.min_free_mb:.2f} MB free): the "
                          "free-space floor did not hold")


def body_clock(rig: Rig, size: Size, res: Result) -> None:
    hold(size.secs)
    res.notes.append("device clocks: scanner 1 h ahead, checkweigher 3 h behind; the scanner "
                     "jumps back 30 s at a third of the run and forward 2 min at two thirds "
                     "(the machine's clock is not touched)")


def clock_offsets(device: str, run_secs: float, total: float) -> float:
    from .publisher import SCANNER

    if device == SCANNER:
        jump = 0.0
        if run_secs > total / 3:
            jump -= 30.0
        if run_secs > 2 * total / 3:
            jump += 150.0
        return 3600.0 + jump
    return -10800.0


def setup_disk_full(workdir: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise Skip("needs root to mount a small tmpfs for the outbox")
    mnt = Path(tempfile.mkdtemp(prefix="faults-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        raise Skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    return {"outbox_dir": mnt, "_mount": mnt}


def teardown_disk_full(extra: dict[str, Any]) -> None:
    mnt = extra.get("_mount")
    if mnt is not None:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            mnt.rmdir()
        except OSError:
            pass


# --- power cut on a block device --------------------------------------------------------------

BLOCK_IMAGE_MB = 256


def _sh(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _umount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def setup_power_cut_block(workdir: Path) -> dict[str, Any]:
    """The outbox on ext4 (data=ordered, the default) on a loop device over a 256 MB file."""
    if os.geteuid() != 0:
        raise Skip("needs root to attach a loop device and mount an ext4 filesystem")
    missing = [t for t in ("losetup", "mkfs.ext4", "e2fsck", "dd", "mount", "umount")
               if shutil.which(t) is None]
    if missing:
        raise Skip(f"missing tools: {', '.join(missing)}")
    workdir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"images": [], "loops": [], "fsck": [], "mnt": None,
                             "journal_replays": 0, "behind": []}
    img = workdir / "powercut-0.img"
    with open(img, "wb") as f:
        f.truncate(BLOCK_IMAGE_MB * 2**20)
    state["images"].append(img)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        img.unlink()
        raise Skip(f"cannot attach a loop device: {r.stderr.strip()}")
    loop = r.stdout.strip()
    state["loops"].append(loop)
    state["loop"] = loop
    try:
        _sh("mkfs.ext4", "-q", "-F", loop)
        mnt = Path(tempfile.mkdtemp(prefix="faults-pcb-"))
        state["mnt"] = mnt
        _sh("mount", "-t", "ext4", loop, str(mnt))
    except Exception as exc:
        teardown_power_cut_block({"_block": state})
        raise Skip(f"cannot make and mount an ext4 filesystem on {loop}: {exc}") from exc
    return {"outbox_dir": mnt, "_block": state}


def teardown_power_cut_block(extra: dict[str, Any]) -> None:
    state = extra.get("_block")
    if state is None:
        return
    mnt = state.get("mnt")
    if mnt is not None:
        _umount(mnt)
    for loop in state["loops"]:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    if mnt is not None:
        try:
            mnt.rmdir()
        except OSError:
            pass
    for img in state["images"]:
        Path(img).unlink(missing_ok=True)


def _outbox_bytes(rig: Rig) -> int:
    return sum(p.stat().st_size for p in rig.outbox_dir.iterdir()
               if p.name.startswith(rig.db.name))


def block_power_cut(rig: Rig, state: dict[str, Any], n: int,
                    ready_timeout_secs: float = 90) -> float:
    """One power cut: SIGSTOP the agent, copy the block device with O_DIRECT (no sync: only
    what reached the device), kill -9, unmount and detach, e2fsck the copy, mount the copy at
    the same place and start the agent on it. Returns seconds until the agent was ready."""
    mnt: Path = state["mnt"]
    old_loop: str = state["loop"]
    old_img: Path = state["images"][-1]
    img = rig.workdir / f"powercut-{n}.img"
    with rig._lock:
        rig._expect_down = True
        t = time.time()
        assert rig.agent.proc is not None
        os.kill(rig.agent.pid, signal.SIGSTOP)
        cached = _outbox_bytes(rig)  # as the page cache holds them
        state["images"].append(img)
        _sh("dd", f"if={old_loop}", f"of={img}", "bs=1M", "iflag=direct", "status=none")
        rig.agent.kill9()
        rig.kills += 1
        rig.window(t, t, "power cut (block device)")
        _umount(mnt)
        _sh("losetup", "-d", old_loop)
        state["loops"].remove(old_loop)
        old_img.unlink(missing_ok=True)
        state["images"].remove(old_img)
        fsck = subprocess.run(["e2fsck", "-fy", str(img)], capture_output=True, text=True)
        state["fsck"].append(fsck.returncode)
        state["journal_replays"] += "recovering journal" in fsck.stdout
        if fsck.returncode not in (0, 1):
            raise RuntimeError(f"e2fsck -fy on the power-cut image exited with "
                               f"{fsck.returncode}: {fsck.stdout[-800:]}")
        loop = _sh("losetup", "--find", "--show", str(img)).stdout.strip()
        state["loops"].append(loop)
        state["loop"] = loop
        _sh("mount", "-t", "ext4", loop, str(mnt))
        state["behind"].append(cached - _outbox_bytes(rig))  # what never reached the device
        rig.agent.start()
        rig._expect_down = False
    rig.agent.wait_ready(ready_timeout_secs, covered=False)
    return time.time() - t


def body_power_cut_block(rig: Rig, size: Size, res: Result) -> None:
    state = rig.extra["_block"]
    rnd = random.Random(6)
    hold(2.0)
    ready = []
    for i in range(size.kills):
        ready.append(block_power_cut(rig, state, i + 1))
        hold(rnd.uniform(1.0, 3.0))
    res.notes.append(
        f"ext4 (data=ordered) on a {BLOCK_IMAGE_MB} MB loop device; each cut: SIGSTOP, "
        f"dd iflag=direct of the device (no sync), kill -9, e2fsck -fy of the copy (exit codes "
        f"{state['fsck']}, journal recovered {state['journal_replays']} of {size.kills}), "
        f"restart on the copy; outbox file sizes, page cache minus device, at each "
        f"cut (bytes): {state['behind']}; ready after restart: max {max(ready):.1f} s")


def until(pred: Callable[[], Any], timeout_secs: float, every: float = 0.1) -> Any:
    """Poll ``pred`` until it gives something true (returned) or the time is up (None)."""
    deadline = time.monotonic() + timeout_secs
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def teardown_sims(extra: dict[str, Any]) -> None:
    sims = extra.get("_sims")
    if sims is not None:
        sims.close()


# --- an OPC UA server refusing our certificate ------------------------------------------------

SORTER_RATE = 5.0  # scripted sorter cartons per second once the agent is trusted
DEVICE_TIMEOUT_SECS = 60.0  # for a device state to show in the agent's status
# The agent's reconnect backoff for a device (edge_agent.runtime.supervisor.supervise's
# defaults): full jitter, the n-th failure in a row waits up to min(cap, first * 2^(n-1)),
# and it starts over once the device was online.
BACKOFF_FIRST_SECS, BACKOFF_CAP_SECS = 0.5, 30.0


def backoff_bound(failures: int) -> float:
    """The longest wait after ``failures`` failures in a row, if the backoff started over at
    the first of them."""
    return min(BACKOFF_CAP_SECS, BACKOFF_FIRST_SECS * 2 ** max(0, failures - 1))


def setup_opcua_cert(workdir: Path) -> dict[str, Any]:
    from .devices import INDUCTED, SORTED, OpcuaSorter, SimLoop

    sims = SimLoop(workdir / "sims.log")
    try:
        sorter = OpcuaSorter(sims, workdir)
    except BaseException:
        sims.close()
        raise
    return {"_sims": sims, "_sorter": sorter, "devices": sorter.site_device(),
            "rules": sorter.site_rules(), "wms_types": (INDUCTED, SORTED),
            "offline_at_start": frozenset({sorter.DEVICE})}


def body_opcua_cert(rig: Rig, size: Size, res: Result) -> None:
    """The sorter's server (Basic256Sha256/SignAndEncrypt) refuses the agent's certificate at
    CreateSession while the MQTT line runs: the agent must keep running and retrying, show
    the sorter offline with an error naming its certificate file and saying the server must
    trust it; once the server trusts it, the sorter comes online by itself and its scripted
    cartons (induct, then divert) are obligations like the line's."""
    from .devices import OpcuaSorter

    sorter: OpcuaSorter = rig.extra["_sorter"]
    rig.facts = sorter.facts
    dev, cert = sorter.CONNECTOR, str(sorter.agent_cert)

    def refused_clearly() -> dict[str, Any] | None:
        c = rig.connector(dev)
        err = (c or {}).get("last_error") or ""
        ok = (c is not None and sorter.refused() >= 2 and c["state"] == "offline"
              and cert in err and "must trust" in err)
        return c if ok else None

    seen = until(refused_clearly, DEVICE_TIMEOUT_SECS, 0.2)
    if seen is None:
        res.misses.append(f"{dev} not shown offline with an error naming {cert} and saying the "
                          f"server must trust it within {DEVICE_TIMEOUT_SECS:.0f} s (server "
                          f"refused {sorter.refused()} sessions); status: {rig.connector(dev)}")
    else:
        res.notes.append(f"server refused {sorter.refused()} sessions in the agent's first "
                         f"{time.time() - rig.started_at:.0f} s; agent status: {dev} "
                         f"{seen['state']} (restarts {seen['restarts']}), last_error: "
                         f"{seen['last_error']}")
    hold(2.0)  # refused a while longer, the line running
    t = time.time()
    sorter.trust_agent()
    online = until(lambda: (c := rig.connector(dev)) is not None and c["state"] == "online"
                   and c, DEVICE_TIMEOUT_SECS)
    if not online:
        res.misses.append(f"{dev} not online within {DEVICE_TIMEOUT_SECS:.0f} s of the server "
                          f"trusting the agent's certificate; status: {rig.connector(dev)}")
        return
    took, bound = online["since"] - t, backoff_bound(online["restarts"])
    res.notes.append(f"{dev} online {took:.1f} s after the server trusted the agent's "
                     f"certificate, without a restart of the agent ({online['restarts']} "
                     f"refusals in a row: its backoff then waits up to {bound:.0f} s)")
    if took > bound + TRUST_SLACK_SECS:
        res.misses.append(f"{dev} online {took:.1f} s after the server trusted the agent's "
                          f"certificate: more than its backoff ({bound:.0f} s) + "
                          f"{TRUST_SLACK_SECS:.0f} s")
    sorter.start_line(SORTER_RATE)
    hold(size.secs)
    if not sorter.stop_line(30):
        res.misses.append("the sorter did not confirm every scripted carton in 30 s")
    book = sorter.facts()
    res.notes.append(f"sorter: {len(sorter.scripted)} scripted cartons at {SORTER_RATE:.0f}/s once "
                     f"online (known ids, barcodes and lanes): {len(book.required)} facts "
                     f"(carton_inducted, carton_sorted with its lane) required at the WMS and "
                     f"the bus, counted in the table with the line's")


# --- Modbus exception responses and silence ---------------------------------------------------

WEIGH_RATE = 2.0  # checkweigher weighings per second
EXCEPTION_RATE = 0.25  # of the reads answered SERVER DEVICE BUSY in the exception phase
ANSWER_SECS = 4.0  # the device answering between two silences
# Online again after the device answers again: within the wait of a backoff that started
# over at the silence (a few seconds after a 5 s silence, not ~30 s), plus a connect and a
# poll. With a backoff that starts over only after 30 s online, a second silence goes on
# from the first one's wait.
RECOVERY_SLACK_SECS = 1.5
TRUST_SLACK_SECS = 4.0  # a secure channel, a session and the subscription


def setup_modbus(workdir: Path) -> dict[str, Any]:
    from .devices import WEIGHED, ModbusCheckweigher, SimLoop

    sims = SimLoop(workdir / "sims.log")
    try:
        cw = ModbusCheckweigher(sims, rate=WEIGH_RATE)
    except BaseException:
        sims.close()
        raise
    return {"_sims": sims, "_cw": cw, "devices": cw.site_device(), "rules": cw.site_rules(),
            "wms_types": (WEIGHED,)}


def body_modbus(rig: Rig, size: Size, res: Result) -> None:
    """A Modbus checkweigher (CW2) weighing twice a second beside the MQTT line: first it
    answers a quarter of the reads with SERVER DEVICE BUSY (it answers: never offline, every
    exception counted in the status), then ``size.restarts`` times it goes silent (requests
    swallowed), answers again, its server goes down (connections refused), answers again.
    Every weighing the device answered a read of is an obligation; offline while silent;
    online again within a few seconds of answering (the backoff starts over once online)."""
    from .devices import ModbusCheckweigher

    cw: ModbusCheckweigher = rig.extra["_cw"]
    rig.facts = cw.facts
    dev = cw.CONNECTOR
    cw.start_line()
    try:
        _modbus_phases(rig, size, res, cw, dev)
    finally:
        cw.stop_line()


def _modbus_phases(rig: Rig, size: Size, res: Result, cw: Any, dev: str) -> None:
    hold(2.0)
    c0 = rig.connector(dev)
    if c0 is None or c0["state"] != "online":
        res.misses.append(f"{dev} not online before the faults: {c0}")
        return
    # 1. exception responses: an answer, not the device being offline
    t = time.time()
    cw.exceptions(EXCEPTION_RATE)
    states: set[str] = set()
    deadline = time.monotonic() + size.secs
    while time.monotonic() < deadline:
        c = rig.connector(dev)
        if c is not None:
            states.add(c["state"])
        time.sleep(0.1)
    cw.exceptions(0)
    sent = cw.exceptions_sent()
    counted = until(lambda: (c := rig.connector(dev)) is not None
                    and sum(c.get("exception_responses", {}).values()) == sent and c, 10)
    c1 = counted or rig.connector(dev) or {}
    n_exc = sum(c1.get("exception_responses", {}).values())
    res.notes.append(f"exception phase {size.secs:.0f} s: {sent} reads answered SERVER DEVICE "
                     f"BUSY ({EXCEPTION_RATE:.0%}); agent status counts "
                     f"{c1.get('exception_responses')}; states seen {sorted(states)}, "
                     f"restarts {c0['restarts']} -> {c1.get('restarts')}")
    if sent == 0:
        res.misses.append("the device sent no exception response: the phase proved nothing")
    if n_exc != sent:
        res.misses.append(f"status counts {n_exc} exception responses, the device sent {sent}")
    left = c1.get("restarts") != c0["restarts"] or (c1.get("since") or 0) > t
    if states != {"online"} or left:
        res.misses.append(f"{dev} left online while answering with exceptions: states "
                          f"{sorted(states)}, restarts {c0['restarts']} -> {c1.get('restarts')}")
    # 2. silences: offline while silent, online again soon after it answers again
    recoveries: list[str] = []
    silences: list[tuple[float, float]] = []
    for _ in range(max(1, size.restarts)):
        for mode in ("silent", "down"):
            before = (rig.connector(dev) or {}).get("restarts", 0)
            t = time.time()
            cw.silent(True) if mode == "silent" else cw.server_down()
            offline_at: float | None = None
            deadline = time.monotonic() + size.outage_secs
            while time.monotonic() < deadline:
                c = rig.connector(dev)
                if offline_at is None and c is not None and c["state"] == "offline":
                    offline_at = time.time()
                time.sleep(0.1)
            back = time.time()
            cw.silent(False) if mode == "silent" else cw.server_up()
            what = ("requests swallowed" if mode == "silent" else "server down, refused")
            if offline_at is None:
                res.misses.append(f"{dev} never shown offline while silent ({what}) for "
                                  f"{size.outage_secs:.0f} s")
            up = until(lambda back=back: (c := rig.connector(dev)) is not None
                       and c["state"] == "online" and c["since"] >= back and c,
                       DEVICE_TIMEOUT_SECS)
            if not up:
                res.misses.append(f"{dev} not online within {DEVICE_TIMEOUT_SECS:.0f} s of "
                                  f"answering again ({what})")
                recoveries.append(f"{what}: not online")
                silences.append((t, time.time()))
                continue
            silences.append((t, up["since"]))
            rec = up["since"] - back
            failures = up["restarts"] - before
            target = backoff_bound(failures) + RECOVERY_SLACK_SECS
            recoveries.append(f"{what} {size.outage_secs:.0f} s: offline after "
                              f"{(offline_at or back) - t:.1f} s, online {rec:.1f} s after it "
                              f"answered again ({failures} reconnects failed while silent: a "
                              f"backoff started over then waits up to "
                              f"{backoff_bound(failures):.1f} s)")
            if rec > target:
                res.misses.append(f"{dev} online {rec:.1f} s after answering again ({what}): "
                                  f"more than a backoff started over at the silence allows "
                                  f"after {failures} failures ({target:.1f} s)")
            hold(ANSWER_SECS)
    res.notes += recoveries
    ws = list(cw.weighings)
    # From a second before a silence until the agent had the device online again, a
    # weighing may be overwritten before the agent could read it (it sees a counter gap).
    # Outside those, every weighing must have been read: the agent polls 10x faster.
    quiet = [w for w in ws if any(a - 1.0 <= w.at <= b + 0.5 for a, b in silences)]
    recent = time.time() - 1.0  # the line still runs: the latest may not be read yet
    unread = [w.tracking_id for w in ws if not w.served and w not in quiet and w.at < recent]
    res.notes.append(f"checkweigher: {len(ws)} weighings at {WEIGH_RATE:.0f}/s, "
                     f"{sum(w.served for w in ws)} answered to the agent (obligations, required "
                     f"at the WMS and the bus), {sum(not w.served for w in quiet)} overwritten "
                     f"unread while silent or until the agent was back (a counter gap)")
    if unread:
        res.misses.append(f"weighings overwritten unread while the device answered (outside "
                          f"the silences and the reconnects after them): {unread[:5]} "
                          f"({len(unread)})")


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in [
        Scenario("baseline", "no fault, every answer 200",
                 Size(rate=300, secs=60), Size(rate=100, secs=8), body_baseline),
        Scenario("kill9", "kill -9 under load",
                 Size(rate=300, secs=0, kills=20), Size(rate=100, secs=0, kills=3), body_kill9),
        Scenario("wms_down", "WMS refused, then 503, then 429 + Retry-After",
                 Size(rate=300, secs=0, outage_secs=600), Size(rate=100, secs=0, outage_secs=15),
                 body_wms_down),
        Scenario("slow_wms", "WMS answers after 3 s, the agent's timeout is 2 s",
                 Size(rate=300, secs=0, outage_secs=60), Size(rate=100, secs=0, outage_secs=8),
                 body_slow_wms, site={"http_timeout_secs": 2}),
        Scenario("rejects", "WMS rejects 5% (422), then 5% with garbage 400 bodies",
                 Size(rate=300, secs=0, outage_secs=60), Size(rate=300, secs=0, outage_secs=12),
                 body_rejects),
        Scenario("broker_restart", "the broker restarts (3 s down each time)",
                 Size(rate=300, secs=30, restarts=3), Size(rate=100, secs=6, restarts=1),
                 body_broker_restart),
        Scenario("quota", "outbox quota 16 MB, WMS down until ingest pauses",
                 Size(rate=300, secs=30, outage_secs=180), Size(rate=300, secs=10,
                                                               outage_secs=60),
                 body_quota, site={"max_disk_mb": 16}),
        Scenario("disk_full", "outbox on a 24 MB tmpfs, WMS down until it is full",
                 Size(rate=300, secs=30, outage_secs=180), Size(rate=300, secs=10,
                                                               outage_secs=60),
                 body_disk_full, setup=setup_disk_full, teardown=teardown_disk_full),
        Scenario("clock", "device clocks off by hours, and jumping",
                 Size(rate=300, secs=60), Size(rate=100, secs=10), body_clock,
                 clock=clock_offsets),
        Scenario("power_cut", "power-cut approximation (freeze, copy, kill -9, restore)",
                 Size(rate=300, secs=0, kills=6), Size(rate=100, secs=0, kills=2),
                 body_power_cut),
        Scenario("power_cut_block",
                 "power cut on a block device (freeze, O_DIRECT copy, kill -9, fsck, restart)",
                 Size(rate=300, secs=0, kills=6), Size(rate=100, secs=0, kills=2),
                 body_power_cut_block, setup=setup_power_cut_block,
                 teardown=teardown_power_cut_block),
        Scenario("opcua_cert", "an OPC UA server refusing our certificate, then trusting it",
                 Size(rate=300, secs=60), Size(rate=100, secs=8), body_opcua_cert,
                 setup=setup_opcua_cert, teardown=teardown_sims),
        Scenario("modbus", "Modbus exception responses (25% busy), then silent, then down",
                 Size(rate=300, secs=60, outage_secs=5, restarts=3),
                 Size(rate=100, secs=8, outage_secs=5, restarts=1), body_modbus,
                 setup=setup_modbus, teardown=teardown_sims),
    ]
}
