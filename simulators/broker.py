"""A local MQTT broker for tests and the demo: a real mosquitto on 127.0.0.1.

``Mosquitto`` starts one on a free port (or a given one) with settings sized for a busy
line: a deep per-client queue so a persistent session survives a long agent outage, and a
large in-flight window so manual acknowledgement does not throttle ingest.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every process `spawn` started that `stop_process` has not stopped yet, by pid.
_LIVE: dict[int, subprocess.Popen[Any]] = {}


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a helper process (broker, receiver, agent, simulator) in a session of its own.

    Its own session (and process group): a Ctrl-C at the terminal, which signals the whole
    foreground group, does not reach it, so whoever started it stops it, in order; and
    `stop_process` signals its whole group, so anything it started goes with it. Tracked
    until stopped: `stop_all` stops whatever is left (the demo's last step).
    """
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    _LIVE[proc.pid] = proc
    return proc


def _signal(proc: subprocess.Popen[Any], sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _wait_exited(proc: subprocess.Popen[Any], timeout: float | None) -> bool:
    """Until the process has exited, without reaping it (its pid, which is also its group's
    id, stays taken: a signal to the group cannot reach a stranger)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped already
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5.0, *,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stop a helper process with its whole tree: ``sig`` (SIGTERM) to the process, up to
    ``timeout`` for it to exit, then SIGKILL to its group, which also ends anything it
    started and left behind. Returns its exit code (None if there was none)."""
    if proc is None:
        return None
    group = _LIVE.pop(proc.pid, None) is proc
    if proc.returncode is None:
        _signal(proc, sig, group=False)
        if not _wait_exited(proc, timeout):
            _signal(proc, signal.SIGKILL, group=group)
            _wait_exited(proc, None)
        if group:
            _signal(proc, signal.SIGKILL, group=True)  # what it started and left behind
    return proc.wait()


def kill_process(proc: subprocess.Popen[Any] | None) -> int | None:
    """SIGKILL a helper process and its whole tree at once (``kill -9``)."""
    if proc is None:
        return None
    if _LIVE.get(proc.pid) is proc and proc.poll() is None:  # not reaped: its pid is its own
        _signal(proc, signal.SIGKILL, group=True)
    return stop_process(proc, 0, sig=signal.SIGKILL)


def stop_all(timeout: float = 5.0) -> list[str]:
    """Stop every helper process still running, newest first; returns what each was."""
    stopped = []
    for proc in reversed(list(_LIVE.values())):
        if proc.poll() is None:
            stopped.append(" ".join(map(str, proc.args))[:120])  # type: ignore[arg-type]
        stop_process(proc, timeout)
    return stopped


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


class Mosquitto:
    protocol = "5"

    def __init__(
        self, port: int | None = None, *, workdir: Path | None = None, verbose: bool = False,
        persistent: bool = False,
    ):
        exe = find_mosquitto()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (make installs it with apt-get)")
        self.exe = exe
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mosq-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self.persistent = persistent  # keep sessions and queued messages across restarts
        self.proc: subprocess.Popen[bytes] | None = None

    def _conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    # Started as root, mosquitto drops to user 'mosquitto', which cannot write
                    # its persistence file into our (private) work directory: stay who we are.
                    f"user {getpass.getuser()}",
                    "persistence true" if self.persistent else "persistence false",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 1",
                    "max_inflight_messages 1000",
                    "max_queued_messages 2000000",
                    "max_queued_bytes 0",
                    "max_packet_size 1048576",
                    "log_dest stderr",
                    "log_type error" if not self.verbose else "log_type all",
                    "",
                ]
            )
        )
        return conf

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = spawn(
            [self.exe, "-c", str(self._conf())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if not self.verbose else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_amqtt() -> str | None:
    """The embedded Python broker (amqtt), when installed."""
    exe = Path(sys.executable).parent / "amqtt"
    return str(exe) if exe.exists() else shutil.which("amqtt")


class EmbeddedBroker:
    """amqtt, a pure-Python MQTT 3.1.1 broker: the demo's fallback where mosquitto cannot be
    installed. Enough for live traffic; it does not queue messages for offline persistent
    sessions, so the tests (which kill the agent) always use mosquitto."""

    protocol = "3.1.1"

    def __init__(self, port: int | None = None, *, workdir: Path | None = None):
        exe = find_amqtt()
        if exe is None:
            raise RuntimeError("neither mosquitto nor amqtt is installed")
        self.exe = exe
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="amqtt-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        self._log = open(self.workdir / "amqtt.log", "wb")
        self.proc = spawn([self.exe, "-c", str(conf)], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"amqtt exited at start; see {self.workdir / 'amqtt.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"amqtt did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None


def local_broker(workdir: Path) -> Mosquitto | EmbeddedBroker:
    """mosquitto when installed, else the embedded amqtt broker (MQTT 3.1.1).

    ``EDGE_AGENT_DEMO_BROKER=amqtt`` picks the embedded one even where mosquitto is there.
    """
    if find_mosquitto() is not None and os.environ.get("EDGE_AGENT_DEMO_BROKER") != "amqtt":
        return Mosquitto(workdir=workdir).start()
    return EmbeddedBroker(workdir=workdir).start()
