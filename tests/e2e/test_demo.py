"""End to end: `edge-agent demo` as a user runs it (not a TTY here), checked by its summary.

The demo brings its own broker, receivers, agent and line, and reconciles every destination
against the line's ground truth; these tests check it does so, stops cleanly on a timer and
on SIGINT, and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

RESULT_OK = "result: every simulated carton is accounted for exactly once at wms, erp and bus"
LEDGER = re.compile(r"^\s+(wms|erp|bus)\s+ok\s+([\d,]+)/([\d,]+) cartons;", re.MULTILINE)


def _demo_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("edge-agent")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent.cli"]
    return [*base, "demo", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Demo:
    """A running demo whose output is collected line by line by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 cmd: list[str] | None = None):
        self.proc = subprocess.Popen(
            [*cmd, *args] if cmd is not None else _demo_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**_env(), **(env or {})}, start_new_session=True,  # its own process group, as in a terminal
        )
        self.lines: list[str] = []
        self.running = threading.Event()
        self.children: dict[int, psutil.Process] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("running "):
                self.running.set()

    def note_children(self) -> None:
        """Remember every process the demo started, to check later that none outlives it."""
        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self.children[c.pid] = c
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout_secs: float) -> int:
        try:
            rc = self.proc.wait(timeout_secs)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"demo did not finish in {timeout_secs} s:\n{self.output()[-4000:]}")
        self._reader.join(5)
        return rc

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for c in self.children.values():
            if c.is_running():
                c.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def assert_all_accounted(out: str) -> None:
    assert RESULT_OK in out, out[-4000:]
    cartons = int(re.search(r"cartons simulated\s+([\d,]+)", out).group(1).replace(",", ""))
    assert cartons > 0, out[-4000:]
    ledgers = {m[0]: (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) for m in
               LEDGER.findall(out)}
    assert ledgers == {d: (cartons, cartons) for d in ("wms", "erp", "bus")}, out[-4000:]
    delivered = re.search(r"delivered\s+wms ([\d,]+), erp ([\d,]+), bus ([\d,]+)", out)
    assert delivered and all(int(n.replace(",", "")) > 0 for n in delivered.groups()), out[-4000:]
    assert re.search(r"dead letters\s+wms 0, erp 0, bus 0", out), out[-4000:]


def assert_no_child_left(demo: Demo) -> None:
    assert demo.children, "saw no child processes of the demo"
    _gone, alive = psutil.wait_procs(list(demo.children.values()), timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def _watch(demo: Demo, secs: float) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline and demo.proc.poll() is None:
        demo.note_children()
        time.sleep(0.5)


@pytest.mark.timeout(90)
def test_demo_runs_for_seconds_and_accounts_for_every_carton(tmp_path):
    demo = Demo("--seconds", "8", "--rate", "100", "--workdir", str(tmp_path / "demo"))
    try:
        assert demo.running.wait(30), demo.output()
        _watch(demo, 60)
        rc = demo.wait(60)
        out = demo.output()
        assert rc == 0, out[-4000:]
        assert_all_accounted(out)
        # The Modbus conveyor and pick-to-light zone were polled, and the picker's presses
        # became pick events at the WMS and on the bus.
        assert re.search(r"modbus devices\s+CONV1 online \(polls [1-9][\d,]*.*PTL1 online", out), out
        picks = re.search(r"pick/fault events\s+wms pick_confirmed ([\d,]+)", out)
        assert picks and int(picks.group(1).replace(",", "")) > 0, out[-4000:]
        # The OPC UA sorter was online, its carton_sorted events reached the WMS, and they
        # match the sorter's own ground truth.
        sorter = re.search(r"sorter SORTER1\s+([\d,]+) cartons inducted, ([\d,]+) carton_sorted, "
                           r"([\d,]+) sort_exception at wms \(online at stop\)", out)
        assert sorter and int(sorter.group(2).replace(",", "")) > 0, out[-4000:]
        assert re.search(r"SORTER1 online notifications [1-9]", out), out[-4000:]
        assert re.search(r"sorter vs its plan\s+ok\s", out), out[-4000:]
        # Plain progress lines, not a live view, when stdout is not a terminal.
        assert re.search(r"^\[\s*[\d.]+s\] running\s+cartons \d+", out, re.MULTILINE), out
        assert "\x1b[" not in out
        assert_no_child_left(demo)
    finally:
        demo.kill()


@pytest.mark.timeout(90)
def test_demo_stops_cleanly_on_ctrl_c(tmp_path):
    demo = Demo("--rate", "100", "--workdir", str(tmp_path / "demo"))
    try:
        assert demo.running.wait(30), demo.output()
        _watch(demo, 5)
        assert demo.proc.poll() is None, demo.output()
        # Ctrl-C in a terminal signals the whole foreground process group, children included:
        # the demo must still stop them itself, in order.
        os.killpg(demo.proc.pid, signal.SIGINT)
        _watch(demo, 40)
        rc = demo.wait(40)
        out = demo.output()
        assert rc == 0, out[-4000:]
        assert_all_accounted(out)
        assert_no_child_left(demo)
    finally:
        demo.kill()


@pytest.mark.timeout(90)
def test_demo_with_the_modbus_checkweigher_accounts_for_every_carton(tmp_path):
    args = ("--checkweigher", "modbus", "--seconds", "8", "--rate", "5",
            "--workdir", str(tmp_path / "demo"))
    demo = Demo(*args)
    try:
        assert demo.running.wait(30), demo.output()
        _watch(demo, 60)
        rc = demo.wait(60)
        out = demo.output()
        assert rc == 0, out[-4000:]
        assert_all_accounted(out)
        # The weights came over Modbus (CW2 polled, no weighing missed), not from CW1 on MQTT.
        assert re.search(r"modbus devices\s+.*CW2 online \(polls [1-9]", out), out[-4000:]
        weighed = re.search(r"checkweigher CW2\s+([\d,]+) weighings on Modbus, 0 missed", out)
        assert weighed and int(weighed.group(1).replace(",", "")) > 0, out[-4000:]
        site = (tmp_path / "demo" / "site.yaml").read_text()
        assert "\n  CW1:" not in site and "device: CW1" not in site
        assert "\n  CW2:\n    profile: acme_checkweigher_mb" in site
        assert "weight: {device: CW2, event: weight}" in site
        assert_no_child_left(demo)
    finally:
        demo.kill()


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = subprocess.run(
        _demo_cmd("--seconds", "1", "--workdir", str(tmp_path)),
        capture_output=True, text=True, timeout=30, env=_env(), check=False,
    )
    assert r.returncode == 2
    assert "refusing to wipe" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.timeout(90)
def test_demo_falls_back_to_the_embedded_broker(tmp_path):
    demo = Demo(
        "--seconds", "6", "--rate", "50", "--workdir", str(tmp_path / "demo"),
        env={"EDGE_AGENT_DEMO_BROKER": "amqtt"},
    )
    try:
        assert demo.running.wait(30), demo.output()
        _watch(demo, 60)
        rc = demo.wait(60)
        out = demo.output()
        assert rc == 0, out[-4000:]
        assert "embedded amqtt broker" in out
        assert_all_accounted(out)
        assert_no_child_left(demo)
    finally:
        demo.kill()


def test_demo_without_any_broker_says_how_to_install_one(tmp_path, monkeypatch, capsys):
    from edge_agent import demo

    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    monkeypatch.setattr(demo, "find_amqtt", lambda: None)
    assert demo.run_demo(rate=100, seconds=1, workdir=tmp_path / "demo") == 2
    err = capsys.readouterr().err
    assert "apt-get install mosquitto" in err and len(err.strip().splitlines()) == 1
