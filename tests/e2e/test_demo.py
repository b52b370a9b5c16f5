"""End to end: `edge-agent demo` as a user runs it (not a TTY here), checked by its summary.

The demo brings its own broker, receivers, agent and line, and reconciles every destination
against the line's ground truth; these tests check it does so, stops cleanly on a timer and
on SIGINT, and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from simulators.broker import kill_process, spawn

RESULT_OK = "result: exactly once at wms, erp and bus:"
# A row of the ledger table: sink, type, expected, delivered, wrong, missing, invented,
# dup deliveries, dup facts, precision, recall.
LEDGER_ROW = re.compile(
    r"^\s+(wms|erp|bus)\s+([a-z_]+)" + r"\s+(\d+)" * 7 + r"\s+([\d.]+|-)\s+([\d.]+|-)\s*$",
    re.MULTILINE,
)
COLUMNS = ("expected", "delivered", "wrong", "missing", "invented", "dup_deliveries", "dup_facts")


def _demo_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("edge-agent")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent.cli"]
    return [*base, "demo", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


DEMO_MARK = "EDGE_AGENT_TEST_DEMO"  # in the environment of a demo and all it starts


def marked(mark: str) -> list[psutil.Process]:
    """Every running process whose environment carries ``DEMO_MARK=mark``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(DEMO_MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


class Demo:
    """A running demo whose output is collected line by line by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 cmd: list[str] | None = None):
        self.mark = uuid.uuid4().hex
        self.proc = spawn(  # its own process group, as in a terminal
            [*cmd, *args] if cmd is not None else _demo_cmd(*args), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            env={**_env(), **(env or {}), DEMO_MARK: self.mark},
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
        """SIGKILL the demo and everything it started (found by the mark in their
        environment: they run in sessions of their own and outlive their parent)."""
        kill_process(self.proc)
        left = marked(self.mark)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def ledger(out: str) -> dict[tuple[str, str], dict[str, int | float | None]]:
    """The summary's ledger table: (sink, type) -> its columns."""
    rows = {}
    for m in LEDGER_ROW.findall(out):
        row: dict[str, int | float | None] = dict(zip(COLUMNS, map(int, m[2:9]), strict=True))
        row["precision"] = None if m[9] == "-" else float(m[9])
        row["recall"] = None if m[10] == "-" else float(m[10])
        rows[(m[0], m[1])] = row
    return rows


def assert_all_accounted(out: str) -> dict[tuple[str, str], dict[str, int | float | None]]:
    assert RESULT_OK in out, out[-6000:]
    cartons = int(re.search(r"cartons simulated\s+([\d,]+)", out).group(1).replace(",", ""))
    assert cartons > 0, out[-4000:]
    rows = ledger(out)
    assert {s for s, _ in rows} == {"wms", "erp", "bus"}, out[-6000:]
    for (sink, type_), row in rows.items():
        # Nothing missing, wrong, invented or under a second id; every fact delivered.
        assert row["wrong"] == row["missing"] == row["invented"] == row["dup_facts"] == 0, (
            sink, type_, out[-6000:])
        assert row["delivered"] == row["expected"], (sink, type_, out[-6000:])
        assert row["recall"] in (1.0, None) and row["precision"] in (1.0, None), (sink, type_)
    # Every closing-line carton is a fact at each destination it subscribes to.
    carton_facts = sum(rows.get(("wms", t), {}).get("expected", 0)
                       for t in ("carton_closed", "carton_exception", "scan_no_read"))
    assert carton_facts == cartons, out[-6000:]
    assert rows[("erp", "total")]["expected"] == rows[("erp", "carton_closed")]["expected"] > 0
    assert rows[("bus", "total")]["expected"] >= rows[("wms", "total")]["expected"]
    delivered = re.search(r"delivered\s+wms ([\d,]+), erp ([\d,]+), bus ([\d,]+)", out)
    assert delivered and all(int(n.replace(",", "")) > 0 for n in delivered.groups()), out[-4000:]
    assert re.search(r"dead letters\s+wms 0, erp 0, bus 0", out), out[-4000:]
    return rows


def assert_no_child_left(demo: Demo) -> None:
    assert demo.children, "saw no child processes of the demo"
    _gone, alive = psutil.wait_procs(list(demo.children.values()), timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    _gone, alive = psutil.wait_procs(marked(demo.mark), timeout=5)
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
        rows = assert_all_accounted(out)
        # The Modbus conveyor and pick-to-light zone were polled, and the picker's presses
        # (facts of the ledger) became pick events at the WMS and on the bus, one each.
        assert re.search(r"modbus devices\s+CONV1 online \(polls [1-9][\d,]*.*PTL1 online", out), out
        picks = re.search(r"pick/fault events\s+wms pick_confirmed ([\d,]+)", out)
        assert picks and int(picks.group(1).replace(",", "")) > 0, out[-4000:]
        presses = re.search(r"pick-to-light PTL1\s+([\d,]+) presses", out)
        press_facts = sum(rows.get(("wms", t), {}).get("expected", 0)
                          for t in ("pick_confirmed", "pick_short"))
        assert presses and press_facts == int(presses.group(1).replace(",", "")) > 0, out[-4000:]
        assert rows[("bus", "pick_confirmed")]["delivered"] == rows[("wms", "pick_confirmed")]["delivered"]
        # The OPC UA sorter was online, its carton_sorted events reached the WMS, and they
        # match the sorter's own ground truth.
        sorter = re.search(r"sorter SORTER1\s+([\d,]+) cartons inducted \(([\d,]+) finished at "
                           r"stop\), ([\d,]+) carton_sorted, ([\d,]+) sort_exception at wms "
                           r"\(online at stop\)", out)
        assert sorter and int(sorter.group(3).replace(",", "")) > 0, out[-4000:]
        assert re.search(r"SORTER1 online notifications [1-9]", out), out[-4000:]
        # The sorter's finished cartons are facts of the ledger, at the WMS and on the bus.
        assert rows[("wms", "carton_sorted")]["expected"] > 0
        assert rows[("bus", "carton_sorted")]["expected"] == rows[("wms", "carton_sorted")]["expected"]
        # The second packing station weighed on the Modbus checkweigher CW2, none missed.
        stations = re.search(r"stations\s+CLOSE1 ([\d,]+), CLOSE2 ([\d,]+)", out)
        assert stations and int(stations.group(2).replace(",", "")) > 0, out[-4000:]
        assert re.search(r"checkweigher CW2\s+[1-9][\d,]* weighings on Modbus, 0 missed", out)
        # The same outcome, machine-readable.
        doc = json.loads((tmp_path / "demo" / "ledger.json").read_text())
        assert doc["ok"] and doc["cartons"] == int(
            re.search(r"cartons simulated\s+([\d,]+)", out).group(1).replace(",", ""))
        assert {(r["sink"], r["type"]) for r in doc["rows"]} >= set(rows)
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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_demo_signalled_alone_stops_everything_it_started(tmp_path, sig):
    """SIGTERM (systemd, kill) or SIGHUP (its terminal closed) to the demo process only, not
    its group: it still stops every process it started, in order, and exits."""
    demo = Demo("--rate", "50", "--workdir", str(tmp_path / "demo"))
    try:
        assert demo.running.wait(30), demo.output()
        _watch(demo, 3)
        demo.proc.send_signal(sig)
        _watch(demo, 60)
        demo.wait(60)
        assert_no_child_left(demo)
    finally:
        demo.kill()


@pytest.mark.timeout(90)
def test_a_killed_demo_leaves_no_process(tmp_path):
    """What a test does when it fails early: kill the demo. Nothing it started survives."""
    demo = Demo("--rate", "50", "--workdir", str(tmp_path / "demo"))
    try:
        assert demo.running.wait(30), demo.output()
        assert marked(demo.mark)[1:], "saw no child processes of the demo"
    finally:
        demo.kill()
    _gone, alive = psutil.wait_procs(marked(demo.mark), timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = subprocess.run(
        _demo_cmd("--seconds", "1", "--workdir", str(tmp_path)),
        capture_output=True, text=True, timeout=30, env=_env(), check=False,
    )
    assert r.returncode == 2
    assert "refusing to wipe" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(("args", "message"), [
    (("--fault", "broker-outage@soon:5"), "expected broker-outage@AT:SECS"),
    (("--fault", "restart:CW1@5:1"), "the demo can restart CONV1, PTL1, SORTER1"),
    (("--fault", "power-cycle:SORTER1@5:1"), "the demo can power-cycle CONV1, PTL1"),
    (("--clock", "weigher=5"), "expected DEVICE=SECS"),
])
def test_demo_refuses_a_fault_or_clock_it_cannot_inject(tmp_path, args, message):
    r = subprocess.run(
        _demo_cmd("--seconds", "1", "--workdir", str(tmp_path / "demo"), *args),
        capture_output=True, text=True, timeout=30, env=_env(), check=False,
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "demo").exists()


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
