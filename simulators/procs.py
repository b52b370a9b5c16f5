"""Run the pieces of a local line as real processes: receivers, the agent, the carton line.

Shared by the end-to-end tests, ``edge-agent demo`` and the benchmarks, so all three drive
the same real processes over real sockets. Everything binds to 127.0.0.1. Each process runs
in a session of its own and is stopped with its whole tree (``simulators.broker.spawn``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .broker import kill_process, spawn, stop_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SITE = ROOT / "edge_agent" / "examples" / "site.yaml"
PROFILES = ROOT / "device_profiles"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ReceiverProc:
    """A stand-in WMS/ERP (simulators.receiver) in its own process."""

    def __init__(self, name: str, workdir: Path, port: int = 0, control_port: int = 0):
        self.name = name
        self.log_path = workdir / f"receiver-{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = spawn(
            [sys.executable, "-m", "simulators.receiver", "--name", name,
             "--port", str(port), "--control-port", str(control_port)],
            stdout=subprocess.PIPE, stderr=self._log, env=_env(), cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"receiver {name} did not start: {line!r}; see {self.log_path}")
        parts = dict(p.split("=") for p in line.split()[2:])
        self.port = int(parts["events"])
        self.control_port = int(parts["control"])
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.control_port}", timeout=10)

    def control(self, **settings: Any) -> dict[str, Any]:
        r = self.http.post("/_control", json=settings)
        r.raise_for_status()
        return r.json()

    def received(self) -> dict[str, Any]:
        return self.http.get("/_received").json()

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_stats").json()

    def wait_unique(self, count: int, timeout_secs: float) -> int:
        deadline = time.monotonic() + timeout_secs
        n = 0
        while time.monotonic() < deadline:
            n = self.stats()["unique"]
            if n >= count:
                return n
            time.sleep(0.1)
        return n

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        if hasattr(self, "http"):
            self.http.close()


def site_text(
    source: Path,
    *,
    broker_port: int,
    wms_url: str,
    erp_url: str,
    protocol: str = "5",
    replace: dict[str, str] | None = None,
) -> str:
    """A shipped site file's text, pointed at this run's broker, receivers and profiles.

    Every value to replace must stand exactly once; all are replaced in one pass, so a new
    value (``port: 18830``) can never be matched again by an old one (``port: 1883``).
    """
    text = source.read_text()
    subs = {
        "port: 1883": f"port: {broker_port}",
        "http://127.0.0.1:8081/events": wms_url,
        "http://127.0.0.1:8082/events": erp_url,
        "profiles_dir: ../../device_profiles": f"profiles_dir: {PROFILES}",
        'protocol: "5"': f'protocol: "{protocol}"',
        **(replace or {}),
    }
    for old in subs:
        if len(re.findall(re.escape(old) + r"(?!\w)", text)) != 1:
            raise ValueError(f"{source.name} has no single {old!r} to replace")
    pattern = re.compile("|".join(re.escape(old) + r"(?!\w)" for old in subs))
    return pattern.sub(lambda m: subs[m.group(0)], text)


def write_site(
    workdir: Path,
    *,
    broker_port: int,
    wms_url: str,
    erp_url: str,
    protocol: str = "5",
    extra: str = "",
    replace: dict[str, str] | None = None,
) -> Path:
    """The example site file, pointed at this run's broker, receivers and work directory."""
    text = site_text(EXAMPLE_SITE, broker_port=broker_port, wms_url=wms_url, erp_url=erp_url,
                     protocol=protocol, replace=replace)
    path = workdir / "site.yaml"
    path.write_text(text + extra)
    return path


def _covered(st: dict[str, Any]) -> bool:
    eng = st.get("engine", {})
    sources = eng.get("sources", {})
    since = [s.get("covered_since") for s in sources.values()]
    if any(c is None for c in since):
        return False
    return all(st["time"] - c > eng.get("max_window_secs", 0) for c in since)


class AgentProc:
    """``edge-agent run`` in its own process (so it can be SIGTERMed or kill -9ed)."""

    def __init__(self, config: Path, workdir: Path, *, log_level: str = "INFO"):
        self.config = config
        self.workdir = workdir
        self.status_file = workdir / "status.json"
        self.log_path = workdir / "agent.log"
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        log = open(self.log_path, "ab")
        self.proc = spawn(
            [sys.executable, "-m", "edge_agent.cli", "run", "-c", str(self.config),
             "--status-file", str(self.status_file), "--log-level", self.log_level],
            stdout=log, stderr=log, env=_env(), cwd=self.workdir,
        )
        log.close()
        return self

    def wait_ready(self, timeout_secs: float = 45, *, covered: bool = True) -> dict[str, Any]:
        """Wait until every connector is online; returns the status.

        ``covered``: also until the agent has watched every device for a whole window, so
        that no exception it makes can be about something from before it connected (those
        are gaps): a line started after that is judged in full.
        """
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            st = self.status()
            if st and st.get("pid") == self.pid and all(
                c["state"] == "online" for c in st["connectors"].values()
            ) and (not covered or _covered(st)):
                return st
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready in {timeout_secs}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None

    def kill9(self) -> None:
        assert self.proc is not None
        kill_process(self.proc)

    def stop(self, timeout_secs: float = 20) -> int:
        """SIGTERM and wait for it to exit; returns the exit code. Raises TimeoutError
        (after a SIGKILL) if it did not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            stop_process(self.proc)  # reaped, untracked
            return self.proc.returncode if self.proc else 0
        rc = stop_process(self.proc, timeout_secs)
        if rc == -9:
            raise TimeoutError(f"the agent did not exit within {timeout_secs} s of SIGTERM; "
                               f"killed; see {self.log_path}")
        assert rc is not None
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class LineProc:
    """The simulated carton line (scanner + checkweigher) publishing to the broker."""

    def __init__(self, workdir: Path, *, port: int, count: int | None, rate: float, seed: int = 1,
                 fractions: dict[str, float] | None = None, start_index: int = 0,
                 protocol: str = "5", ground_truth: Path | None = None,
                 clocks: dict[str, float] | None = None, ideal_clocks: bool = False):
        self.ground_truth = ground_truth or workdir / "ground_truth.json"
        args = [sys.executable, "-m", "simulators.carton_line", "--port", str(port),
                "--rate", str(rate), "--seed", str(seed), "--start-index", str(start_index),
                "--protocol", protocol, "--ground-truth", str(self.ground_truth)]
        args += ["--count", str(count)] if count is not None else ["--forever"]
        for k, v in (fractions or {}).items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        for device, offset in (clocks or {}).items():  # e.g. {"checkweigher": -10800}
            args += ["--clock", f"{device}={offset}"]
        if ideal_clocks:
            args.append("--ideal-clocks")
        self.log_path = workdir / f"line-{start_index}.log"
        log = open(self.log_path, "wb")
        self.proc = spawn(args, stdout=log, stderr=log, env=_env(), cwd=ROOT)
        log.close()

    def wait(self, timeout_secs: float) -> dict[str, Any]:
        rc = self.proc.wait(timeout_secs)
        if rc != 0:
            raise RuntimeError(f"carton line failed ({rc}): {self.log_path.read_text()[-2000:]}")
        return json.loads(self.ground_truth.read_text())

    def stop(self) -> None:
        stop_process(self.proc, 10)
