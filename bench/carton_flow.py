"""One benchmark step of the carton-close flow, and the bus recorder it runs as a subprocess.

A step starts everything fresh on 127.0.0.1: a mosquitto, the stand-in WMS and ERP, an MQTT
bus recorder, and ``edge-agent run`` with a new outbox in a temp dir. Once the agent is ready
and has idled for a second, the simulated line publishes N cartons at R cartons/s with no
faults (every carton is one ``carton_closed``). The step then waits until every sink has all
its events, samples CPU and memory, collects what the receivers got and computes:

- delivered exactly once: the WMS, the ERP and the bus each reconciled against the line's
  ground truth (``simulators.ledger``), plus the redeliveries the receivers deduplicated;
- latency per carton per sink: arrival (``_received_at`` at an HTTP receiver, the recorder's
  arrival time on the bus) minus the later device timestamp of the carton (``scan_time`` /
  ``weigh_time``, which the agent copies from the devices' ``ts``); p50, p99, max;
- the rate the line really achieved, from the device timestamps of the scans
  ((N - 1) / span of scan times); the line's own summary is kept too;
- CPU seconds of the agent (user + system, all threads) between just before the line starts
  and the last delivery, per carton; its peak RSS (VmHWM) before it is stopped; the CPU used
  by the broker, the line, the receivers, the recorder and this harness in the same window.

Everything measured runs in its own process; this process only polls small counters while
cartons flow and parses the big JSON documents after the measurement window closes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from simulators import procs
from simulators.broker import Mosquitto
from simulators.ledger import reconcile
from simulators.procs import AgentProc, LineProc, ReceiverProc

ROOT = Path(__file__).resolve().parents[1]

WMS_TYPES = {"carton_closed", "carton_exception", "scan_no_read"}
ERP_TYPES = {"carton_closed"}
NO_FAULTS = {
    "noread_frac": 0.0,
    "missing_weight_frac": 0.0,
    "missing_scan_frac": 0.0,
    "dup_frac": 0.0,
    "reorder_frac": 0.0,
}
MIN_CARTONS = 2000
P99_TARGET_MS = 250.0
RATE_TOLERANCE = 0.95  # the line must achieve this share of the asked rate
IDLE_SECS = 1.0  # the ready agent idles this long first: its baseline CPU
EXTRA_WAIT_SECS = 1.0  # after the last delivery: anything unexpected would arrive now
NO_PROGRESS_SECS = 20.0  # give up waiting for deliveries when nothing moved this long
MAX_SETTLE_SECS = 600.0
POLL_SECS = 0.05
BUS_PROGRESS_SECS = 0.1
SINKS = ("wms", "erp", "bus")

Log = Callable[[str], None]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- the bus recorder, in its own process ----------------------------------------------------


class BusRecorderProc:
    """``simulators.bus_recorder.BusRecorder`` in a subprocess, so its JSON parsing and its
    paho thread are neither in this process nor hidden in anyone else's CPU figure."""

    def __init__(self, workdir: Path, host: str, port: int, topic: str = "edge/+/events/#",
                 protocol: str = "5"):
        self.out = workdir / "bus.json"
        self.progress = workdir / "bus.progress"
        self.log_path = workdir / "bus-recorder.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.carton_flow", "record-bus", "--host", host,
             "--port", str(port), "--topic", topic, "--protocol", protocol,
             "--out", str(self.out), "--progress", str(self.progress)],
            stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=ROOT,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"bus recorder did not start: {line!r}; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def unique(self) -> int:
        try:
            return int(self.progress.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def finish(self, timeout_secs: float = 60) -> dict[str, Any]:
        """Stop recording; returns {"events": [...], "arrivals": [...]} (same order)."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_secs)
        if rc != 0:
            raise RuntimeError(f"bus recorder exited {rc}; see {self.log_path}")
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class MosqSubRecorder:
    """The bus recorder as ``mosquitto_sub -F '%U %t %p'`` (C, a few % of a core where the
    paho recorder needs a quarter of one at 1,500 events/s): one line per message with its
    receive time (ns), topic and payload, parsed only after the measurement window."""

    PROBE = "bench-probe"

    def __init__(self, workdir: Path, host: str, port: int, topic: str = "edge/+/events/#",
                 protocol: str = "5"):
        exe = shutil.which("mosquitto_sub")
        pub = shutil.which("mosquitto_pub")
        if exe is None or pub is None:
            raise RuntimeError("mosquitto_sub/mosquitto_pub not installed (apt-get install mosquitto-clients)")
        self.out = workdir / "bus.txt"
        self.log_path = workdir / "bus-recorder.log"
        version = "5" if protocol == "5" else "311"
        self._out = open(self.out, "wb")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "-h", host, "-p", str(port), "-t", topic, "-q", "1", "-V", version,
             "-F", "%U %t %p", "-i", f"bench-bus-{os.getpid()}"],
            stdout=self._out, stderr=log,
        )
        log.close()
        self._offset = 0
        self._lines = 0
        # Subscribed once a probe published to a matching topic comes back.
        self.probe_topic = "/".join(
            self.PROBE if part in ("+", "#") else part for part in topic.split("/")
        )
        deadline = time.monotonic() + 10
        while self._count_lines() == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto_sub did not subscribe; see {self.log_path}")
            subprocess.run([pub, "-h", host, "-p", str(port), "-t", self.probe_topic, "-q", "1",
                            "-V", version, "-m", "probe"], capture_output=True, timeout=10, check=False)
            time.sleep(0.1)
        self._probes = self._lines

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _count_lines(self) -> int:
        with open(self.out, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines
        self._lines += chunk.count(b"\n", 0, end)
        self._offset += end
        return self._lines

    def unique(self) -> int:
        """Messages received so far (a redelivery would count twice; the ledger catches it)."""
        return self._count_lines() - self._probes

    def finish(self, timeout_secs: float = 60) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_secs)
        self._out.close()
        events, arrivals = [], []
        probe = self.probe_topic.encode()
        with open(self.out, "rb") as f:
            for line in f:
                stamp, topic, payload = line.rstrip(b"\n").split(b" ", 2)
                if topic == probe:
                    continue
                events.append(json.loads(payload))
                arrivals.append(float(stamp))
        return {"events": events, "arrivals": arrivals}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def make_bus_recorder(kind: str, workdir: Path, host: str, port: int) -> BusRecorderProc | MosqSubRecorder:
    """`kind`: "mosquitto_sub", "paho" (simulators.bus_recorder) or "auto" (the first if
    installed)."""
    if kind == "auto":
        kind = "mosquitto_sub" if shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub") else "paho"
    if kind == "mosquitto_sub":
        return MosqSubRecorder(workdir, host, port)
    if kind == "paho":
        return BusRecorderProc(workdir, host, port)
    raise ValueError(f"unknown bus recorder {kind!r}")


def _record_bus(args: argparse.Namespace) -> int:
    from simulators.bus_recorder import BusRecorder

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = BusRecorder(args.host, args.port, args.topic, args.protocol)
    progress = Path(args.progress)
    tmp = progress.with_suffix(".tmp")
    print("READY", flush=True)
    last = -1
    while not stop.wait(BUS_PROGRESS_SECS):
        n = rec.unique()
        if n != last:
            tmp.write_text(str(n))
            os.replace(tmp, progress)
            last = n
    rec.close()
    with rec.lock:
        doc = {"events": rec.events, "arrivals": [m["arrival"] for m in rec.meta]}
    Path(args.out).write_text(json.dumps(doc))
    return 0


def code_version() -> dict[str, str]:
    """The git commit and a hash of the agent's sources as this step runs them (the tree may
    change between steps while people work; the report flags it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, cwd=ROOT, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    h = hashlib.sha1()
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return {"git_commit": commit or "unknown", "agent_sources": h.hexdigest()[:10]}


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... from /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def _machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) over all cores since boot."""
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


def machine_load_pct(secs: float = 1.0) -> float:
    """Busy CPU over `secs`, in % of one core (200 = both cores of a 2-core machine)."""
    b0, t0 = _machine_busy()
    time.sleep(secs)
    b1, t1 = _machine_busy()
    return 100.0 * (b1 - b0) / max(t1 - t0, 1e-9) * (psutil.cpu_count() or 1)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, math.ceil(q / 100.0 * len(s)) - 1)
    return s[min(k, len(s) - 1)]


class _TimeParser:
    """ISO-8601 UTC -> epoch seconds, cached (device timestamps repeat per millisecond)."""

    def __init__(self) -> None:
        self.cache: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        v = self.cache.get(text)
        if v is None:
            v = self.cache[text] = datetime.fromisoformat(text).timestamp()
        return v


def device_time(ev: dict[str, Any], parse: _TimeParser) -> float:
    """The later of the carton's two device timestamps (the envelope time as a fallback)."""
    data = ev.get("data") or {}
    times = [parse(t) for t in (data.get("scan_time"), data.get("weigh_time")) if t]
    return max(times) if times else parse(ev["time"])


def latency_stats(arrivals_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(arrivals_ms),
        "p50_ms": _r(percentile(arrivals_ms, 50)),
        "p99_ms": _r(percentile(arrivals_ms, 99)),
        "max_ms": _r(max(arrivals_ms) if arrivals_ms else None),
    }


def _r(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def _latencies(
    events: Iterable[tuple[dict[str, Any], float]], parse: _TimeParser
) -> list[tuple[float, float]]:
    """(device time, ms from the later device message to arrival) per carton_closed (the
    first arrival of each id)."""
    seen: set[str] = set()
    out = []
    for ev, arrival in events:
        if ev.get("type") != "carton_closed" or ev["id"] in seen:
            continue
        seen.add(ev["id"])
        t = device_time(ev, parse)
        out.append((t, (arrival - t) * 1000.0))
    return out


def _achieved_rate(events: list[dict[str, Any]], parse: _TimeParser) -> float | None:
    scans = sorted(
        parse(e["data"]["scan_time"])
        for e in events
        if e.get("type") == "carton_closed" and (e.get("data") or {}).get("scan_time")
    )
    if len(scans) < 2 or scans[-1] <= scans[0]:
        return None
    return (len(scans) - 1) / (scans[-1] - scans[0])


class Sampler(threading.Thread):
    """Samples the agent's CPU and the machine's busy time every `period` s (reads /proc only),
    so a latency spike can be told apart from a burst of someone else's load."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(name="bench-sampler", daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, float | None, float, float]] = []
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while True:
            busy, total = _machine_busy()
            self.samples.append((time.monotonic(), cpu_seconds(self.pid), busy, total))
            if self._stop_ev.wait(self.period):
                return

    def stop(self) -> list[dict[str, Any]]:
        self._stop_ev.set()
        self.join(5)
        ncpu = psutil.cpu_count() or 1
        out = []
        for (t0, a0, b0, n0), (t1, a1, b1, n1) in zip(self.samples, self.samples[1:], strict=False):
            dt = max(t1 - t0, 1e-9)
            out.append({
                "t": round(t1 - self.samples[0][0], 2),
                "agent_pct": _r(100.0 * (a1 - a0) / dt) if a0 is not None and a1 is not None else None,
                "machine_busy_pct": _r(100.0 * (b1 - b0) / max(n1 - n0, 1e-9) * ncpu),
            })
        return out


def _timeline(pairs: list[tuple[float, float]], origin: float) -> list[dict[str, Any]]:
    """Per second of device time (from `origin`): cartons, p50, p99 and max latency."""
    buckets: dict[int, list[float]] = {}
    for t, lat in pairs:
        buckets.setdefault(int(t - origin), []).append(lat)
    return [
        {"s": k, "n": len(v), "p50_ms": _r(percentile(v, 50)), "p99_ms": _r(percentile(v, 99)),
         "max_ms": _r(max(v))}
        for k, v in sorted(buckets.items())
    ]


# --- profiling -------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3."):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    else:
        if str(ROOT) in path:
            path = path.split(str(ROOT) + "/", 1)[1]
    return f"{m['func']} ({path})"


def _package(name: str) -> str:
    """"Store.commit (edge_agent/outbox/store.py)" -> "edge_agent/outbox"; "... (paho/mqtt/
    client.py)" -> "paho"; "... (selectors.py)" -> "selectors"."""
    m = re.search(r"\(([^()]*)\)$", name)
    path = m.group(1) if m else name
    parts = path.split("/")
    if parts[0] == "edge_agent" and len(parts) > 1:
        return "/".join(parts[:2]).removesuffix(".py")
    return parts[0].removesuffix(".py")


def summarise_profile(raw_path: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's raw (collapsed stack) output recorded with --threads: the top functions
    by own (leaf) samples; the agent's own functions by inclusive samples (entry points such
    as cli.run left out); own samples per package; the share of each thread."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            thread = frames.pop(0)
            if frames and frames[0].startswith("thread ("):
                thread = frames.pop(0)
            threads[thread] += count
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        own[names[-1]] += count
        packages[_package(names[-1])] += count
        for name in set(names):
            if "(edge_agent/" in name and "(edge_agent/cli.py)" not in name:
                incl[name] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "own": pct(own),
        "inclusive": pct(incl),
        "packages": pct(packages),
        "threads": pct(threads),
    }


class PySpy:
    """``py-spy record`` attached to a pid until stopped (SIGINT makes it write its output)."""

    def __init__(self, pid: int, out: Path, rate: int = 100):
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.out = out
        self.log_path = out.with_suffix(".log")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--threads",
             "--format", "raw", "--output", str(out)],
            stdout=log, stderr=log,
        )
        log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- one step --------------------------------------------------------------------------------


def _wait_delivered(
    counts: Callable[[], dict[str, int]], want: dict[str, int], log: Log
) -> tuple[bool, dict[str, int]]:
    start = last_change = time.monotonic()
    last: dict[str, int] = {}
    while True:
        got = counts()
        if all(got[k] >= want[k] for k in want):
            return True, got
        now = time.monotonic()
        if got != last:
            last, last_change = got, now
        elif now - last_change > NO_PROGRESS_SECS:
            log(f"    no delivery progress for {NO_PROGRESS_SECS:.0f}s: {got} of {want}")
            return False, got
        if now - start > MAX_SETTLE_SECS:
            log(f"    deliveries still incomplete after {MAX_SETTLE_SECS:.0f}s: {got} of {want}")
            return False, got
        time.sleep(POLL_SECS)


def run_step(
    rate: float,
    seconds: float,
    *,
    seed: int = 1,
    keep: bool = False,
    profile_out: Path | None = None,
    bus_recorder: str = "auto",
    log: Log = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run one step; returns its measurements (see the module docstring)."""
    count = max(MIN_CARTONS, round(rate * seconds))
    workdir = Path(tempfile.mkdtemp(prefix=f"edge-bench-{int(rate)}-"))
    res: dict[str, Any] = {"rate": rate, "seconds": seconds, "count": count, "seed": seed,
                           "workdir": str(workdir), "profiled": profile_out is not None,
                           **code_version()}
    broker: Mosquitto | None = None
    receivers: list[ReceiverProc] = []
    bus: BusRecorderProc | MosqSubRecorder | None = None
    agent: AgentProc | None = None
    line: LineProc | None = None
    spy: PySpy | None = None
    sampler: Sampler | None = None
    ok = False
    try:
        broker = Mosquitto(workdir=workdir / "mosquitto").start()
        wms = ReceiverProc("wms", workdir)
        receivers.append(wms)
        erp = ReceiverProc("erp", workdir)
        receivers.append(erp)
        if not procs.EXAMPLE_SITE.exists():
            # The example site moved since this process started (the tree is being worked on).
            importlib.reload(procs)
        config = procs.write_site(
            workdir, broker_port=broker.port, wms_url=wms.url, erp_url=erp.url
        )
        bus = make_bus_recorder(bus_recorder, workdir, broker.host, broker.port)
        res["bus_recorder"] = type(bus).__name__
        agent = AgentProc(config, workdir)
        agent.start().wait_ready(30)
        assert broker.proc is not None
        pids = {
            "agent": agent.pid, "broker": broker.proc.pid, "wms": wms.proc.pid,
            "erp": erp.proc.pid, "bus_recorder": bus.pid, "harness": os.getpid(),
        }

        # Idle baseline, then the measurement window opens just before the line starts.
        idle0 = cpu_seconds(agent.pid) or 0.0
        time.sleep(IDLE_SECS)
        idle1 = cpu_seconds(agent.pid) or 0.0
        res["agent_idle_cpu_pct"] = _r(100.0 * (idle1 - idle0) / IDLE_SECS)
        mem0 = proc_status(agent.pid)
        res["agent_rss_start_mb"] = _r(mem0.get("VmRSS", 0) / 2**20)
        if profile_out is not None:
            spy = PySpy(agent.pid, profile_out)
            time.sleep(0.5)  # attached before the first carton
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        busy0, total0 = _machine_busy()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        sampler = Sampler(agent.pid)
        sampler.start()

        # Exact device clocks: latency is measured from the devices' timestamps.
        line = LineProc(workdir, port=broker.port, count=count, rate=rate, seed=seed,
                        fractions=NO_FAULTS, ideal_clocks=True)
        gt = line.wait(timeout_secs=max(120.0, 10 * count / rate))
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t_line = time.monotonic()
        summary = gt["summary"]
        types = summary["expected_types"]
        want = {
            "wms": sum(n for k, n in types.items() if k in WMS_TYPES),
            "erp": sum(n for k, n in types.items() if k in ERP_TYPES),
            "bus": sum(types.values()),
        }
        delivered, got = _wait_delivered(
            lambda: {"wms": wms.stats()["unique"], "erp": erp.stats()["unique"],
                     "bus": bus.unique()},  # type: ignore[union-attr]
            want, log,
        )
        t1 = time.monotonic()
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        busy1, total1 = _machine_busy()
        mem1 = proc_status(agent.pid)
        samples = sampler.stop()
        if spy is not None:
            spy.stop()
        # The window is closed: from here on nothing is measured, so big JSON is fine.
        time.sleep(EXTRA_WAIT_SECS)
        wms_doc = wms.received()
        erp_doc = erp.received()
        bus_doc = bus.finish()
        status = agent.status() or {}
        rc = agent.stop()
        log_text = agent.log()

        window = t1 - t0
        res.update({
            "line": summary,
            "line_secs": _r(t_line - t0, 3),
            "settle_secs": _r(t1 - t_line, 3),
            "window_secs": _r(window, 3),
            "expected": want,
            "got_unique": got,
            "all_arrived": delivered,
        })
        cpu = {k: (cpu1[k] - cpu0[k]) if cpu0[k] is not None and cpu1[k] is not None else None
               for k in pids}
        cpu["line"] = (children1.ru_utime + children1.ru_stime
                       - children0.ru_utime - children0.ru_stime)
        res["cpu_secs"] = {k: _r(v, 3) for k, v in cpu.items()}
        res["cpu_pct_of_one_core"] = {
            k: _r(100.0 * v / window) for k, v in cpu.items() if v is not None
        }
        ncpu = psutil.cpu_count() or 1
        res["machine_busy_pct"] = _r(100.0 * (busy1 - busy0) / max(total1 - total0, 1e-9) * ncpu)
        res["machine_cores"] = ncpu
        ours = sum(v for v in res["cpu_pct_of_one_core"].values() if v is not None)
        # Whatever else ran on the machine meanwhile (other people's tests, py-spy, ...).
        res["other_load_pct"] = _r(max(0.0, res["machine_busy_pct"] - ours))
        cartons = summary["cartons"] or count
        res["agent_cpu_ms_per_carton"] = _r(1000.0 * (cpu["agent"] or 0.0) / cartons, 4)
        res["agent_peak_rss_mb"] = _r(mem1.get("VmHWM", 0) / 2**20)
        res["agent_rss_end_mb"] = _r(mem1.get("VmRSS", 0) / 2**20)

        # Exactly once, per sink, against the ground truth.
        cartons_gt = gt["cartons"]
        ledgers = {}
        for name, events, tps in (
            ("wms", wms_doc["events"], WMS_TYPES),
            ("erp", erp_doc["events"], ERP_TYPES),
            ("bus", bus_doc["events"], None),
        ):
            led = reconcile(cartons_gt, events, types=tps)
            ledgers[name] = {
                "ok": led.ok, "summary": led.summary(),
                "examples": (led.missing + led.unexpected + led.duplicates + led.wrong_values)[:5],
            }
        bus_ids = Counter(e["id"] for e in bus_doc["events"])
        res["ledgers"] = ledgers
        res["redeliveries"] = {
            "wms": wms_doc["duplicates"], "erp": erp_doc["duplicates"],
            "bus": sum(n - 1 for n in bus_ids.values()),
        }
        res["delivered_ok"] = all(v["ok"] for v in ledgers.values())

        # Latency from the later device message to arrival, per sink.
        parse = _TimeParser()
        lat = {
            "wms": _latencies(((e, e["_received_at"]) for e in wms_doc["events"]), parse),
            "erp": _latencies(((e, e["_received_at"]) for e in erp_doc["events"]), parse),
            "bus": _latencies(zip(bus_doc["events"], bus_doc["arrivals"], strict=True), parse),
        }
        res["latency"] = {k: latency_stats([x for _, x in v]) for k, v in lat.items()}
        origin = min((t for v in lat.values() for t, _ in v), default=0.0)
        res["timeline"] = {
            "latency_per_device_second": {k: _timeline(lat[k], origin) for k in ("wms", "bus")},
            "load_every_half_second": samples,
        }
        achieved = _achieved_rate(wms_doc["events"], parse) or _achieved_rate(bus_doc["events"], parse)
        res["achieved_rate"] = _r(achieved if achieved is not None else summary["carton_rate_per_s"])
        res["rate_ok"] = res["achieved_rate"] >= RATE_TOLERANCE * rate

        res["agent_exit_code"] = rc
        res["agent_log_errors"] = sum(
            1 for ln in log_text.splitlines() if " ERROR " in ln or ln.startswith("Traceback")
        )
        res["agent_status"] = {
            k: status.get(k) for k in ("engine", "outbox", "sinks", "connectors")
        }
        if res["agent_status"].get("engine"):
            res["agent_status"]["engine"].pop("recent", None)

        reasons = []
        if not res["rate_ok"]:
            reasons.append(f"line achieved {res['achieved_rate']:.0f}/s < {RATE_TOLERANCE:.0%} of {rate:g}/s")
        if not res["delivered_ok"]:
            bad = [f"{k}: {v['summary']}" for k, v in ledgers.items() if not v["ok"]]
            reasons.append("not exactly once: " + "; ".join(bad))
        for k in SINKS:
            p99 = res["latency"][k]["p99_ms"]
            if p99 is None or p99 >= P99_TARGET_MS:
                reasons.append(f"{k} p99 {p99} ms >= {P99_TARGET_MS:.0f} ms")
        if rc != 0:
            reasons.append(f"agent exited {rc}")
        res["failures"] = reasons
        res["passed"] = not reasons
        ok = True
        return res
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["passed"] = False
        res["failures"] = [res["error"]]
        log(f"    step failed with an error: {res['error']}; files kept in {workdir}")
        return res
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if spy is not None:
            spy.stop()
        if line is not None:
            line.stop()
        if agent is not None:
            # Best effort: on a timeout AgentProc.stop has already killed it.
            with contextlib.suppress(Exception):
                agent.stop()
        if bus is not None:
            bus.stop()
        for r in receivers:
            r.stop()
        if broker is not None:
            broker.stop()
        # Kept when something is wrong beyond speed (an error, a lost or doubled event), so
        # the logs, outbox and ground truth can be inspected; a step that was only too slow
        # has all it says in the JSON.
        if ok and not keep and res.get("delivered_ok") and res.get("agent_exit_code") == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            res["kept"] = True


def median_step(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the numeric measurements of repeated runs of one step."""
    import statistics

    good = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"rate": runs[0]["rate"], "runs": len(runs), "errors": len(runs) - len(good)}
    if not good:
        out.update(passed=False, delivered_ok=False, failures=[r["error"] for r in runs])
        return out

    def med(get: Callable[[dict[str, Any]], Any]) -> float | None:
        vals = [v for v in (get(r) for r in good) if v is not None]
        return _r(statistics.median(vals), 4) if vals else None

    out["achieved_rate"] = med(lambda r: r["achieved_rate"])
    out["line_max_lag_ms"] = med(lambda r: r["line"]["max_lag_ms"])
    out["delivered_ok"] = len(good) == len(runs) and all(r["delivered_ok"] for r in good)
    out["delivered_runs"] = sum(1 for r in good if r["delivered_ok"])
    out["latency"] = {
        s: {k: med(lambda r, s=s, k=k: r["latency"][s][k]) for k in ("p50_ms", "p99_ms", "max_ms")}
        for s in SINKS
    }
    for k in ("agent_cpu_ms_per_carton", "agent_peak_rss_mb", "agent_rss_start_mb",
              "agent_idle_cpu_pct", "machine_busy_pct", "other_load_pct", "settle_secs"):
        out[k] = med(lambda r, k=k: r.get(k))
    names = sorted({n for r in good for n in r["cpu_pct_of_one_core"]})
    out["cpu_pct_of_one_core"] = {
        n: med(lambda r, n=n: r["cpu_pct_of_one_core"].get(n)) for n in names
    }
    out["redeliveries"] = {s: med(lambda r, s=s: r["redeliveries"][s]) for s in SINKS}
    reasons = []
    if out["achieved_rate"] is None or out["achieved_rate"] < RATE_TOLERANCE * out["rate"]:
        reasons.append(f"line achieved {out['achieved_rate']}/s (median)")
    if not out["delivered_ok"]:
        reasons.append(f"exactly once in {out['delivered_runs']}/{len(runs)} runs")
    for s in SINKS:
        p99 = out["latency"][s]["p99_ms"]
        if p99 is None or p99 >= P99_TARGET_MS:
            reasons.append(f"{s} p99 {p99} ms (median)")
    reasons += sorted({f for r in runs for f in r.get("failures", []) if f.startswith("agent exited")})
    out["failures"] = reasons
    out["passed"] = not reasons
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.carton_flow")
    sub = p.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("record-bus", help="(internal) record the agent's MQTT events")
    rb.add_argument("--host", default="127.0.0.1")
    rb.add_argument("--port", type=int, required=True)
    rb.add_argument("--topic", default="edge/+/events/#")
    rb.add_argument("--protocol", default="5")
    rb.add_argument("--out", required=True)
    rb.add_argument("--progress", required=True)
    st = sub.add_parser("step", help="run one step and print its JSON")
    st.add_argument("--rate", type=float, required=True)
    st.add_argument("--seconds", type=float, default=10.0)
    st.add_argument("--seed", type=int, default=1)
    st.add_argument("--keep", action="store_true")
    st.add_argument("--profile", default=None, help="py-spy raw output path")
    st.add_argument("--bus-recorder", choices=["auto", "mosquitto_sub", "paho"], default="auto")
    args = p.parse_args(argv)
    if args.cmd == "record-bus":
        return _record_bus(args)
    res = run_step(args.rate, args.seconds, seed=args.seed, keep=args.keep,
                   profile_out=Path(args.profile) if args.profile else None,
                   bus_recorder=args.bus_recorder)
    if args.profile:
        res["profile"] = summarise_profile(Path(args.profile))
    print(json.dumps(res, indent=2))
    return 0 if res.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
