"""The ``edge-agent`` command line: run, validate, outbox, status, profiles, schema, demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ConfigError, StoreError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _load(config: str) -> tuple[Any, dict[str, Any]]:
    from .config import load_site

    try:
        return load_site(config)
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(str(p), err=True)
        click.echo(f"{len(exc.problems)} problem(s) found", err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__)
def main() -> None:
    """edge-agent: warehouse machine signals in, durable business events out."""


# Exit codes of `edge-agent run`: 0 stopped cleanly, 1 a component crashed (after a bounded
# shutdown), 2 bad configuration, 3 the outbox failed, 4 stopped but not cleanly (a shutdown
# step overran, a second signal, or the shutdown deadline). Nothing unacknowledged is lost
# in any of them: the broker and the devices redeliver it, the outbox keeps what is pending.
EXIT_NOT_CLEAN = 4
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _StopGuard:
    """SIGTERM and SIGINT, received on a thread of their own (``sigwait``), so that they
    work even when the event loop is stuck. The first stops the agent (it drains); a second
    exits at once. Once the shutdown has begun (a signal or a crashed component) the process
    exits by ``deadline_secs`` whatever holds it up, so systemd sees it gone and restarts it.

    The signals are blocked in every thread (``block``, before any thread starts: threads
    inherit the mask), which is what lets one thread take them all.
    """

    def __init__(self, stop: Any, deadline_secs: float):
        self._stop = stop
        self._deadline_secs = deadline_secs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = threading.Lock()
        self._timer: threading.Timer | None = None

    @staticmethod
    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        threading.Thread(target=self._wait_signals, name="stop-signals", daemon=True).start()

    def arm(self) -> None:
        """The shutdown began: exit by the deadline (once; later calls do nothing)."""
        with self._armed:
            if self._timer is None:
                self._timer = threading.Timer(self._deadline_secs, self._expired)
                self._timer.daemon = True
                self._timer.start()

    def _wait_signals(self) -> None:
        first = True
        while True:
            sig = signal.Signals(signal.sigwait(STOP_SIGNALS))
            if first:
                first = False
                logging.getLogger("edge_agent").info(
                    "%s: stopping (exit within %.0f s; a second signal exits at once)",
                    sig.name, self._deadline_secs)
                self.arm()
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._stop)
                except RuntimeError:  # the loop has closed: we are exiting anyway
                    pass
            else:
                _exit_now(f"second signal ({sig.name}): exiting at once")

    def _expired(self) -> None:
        _exit_now(f"shutdown did not finish within {self._deadline_secs:.0f} s: exiting now")


def _exit_now(why: str) -> None:
    log = logging.getLogger("edge_agent")
    log.warning("%s; stopped, not cleanly (nothing unacknowledged is lost: it is redelivered)",
                why)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(EXIT_NOT_CLEAN)


@main.command()
@click.option("-c", "--config", "config", required=True, type=click.Path(dir_okay=False), help="Site file.")
@click.option("--status-file", type=click.Path(dir_okay=False), help="Write live status JSON here.")
@click.option("--log-level", default=None, help="Override the config's log level.")
def run(config: str, status_file: str | None, log_level: str | None) -> None:
    """Run the agent (the service).

    SIGTERM or SIGINT drains and exits within the drain time plus 15 s; a second one exits
    at once. Exit code 0: stopped cleanly; 1: a component crashed; 3: the outbox failed;
    4: stopped, but not cleanly (nothing unacknowledged is lost: it is redelivered).
    """
    from .agent import SHUTDOWN_MARGIN_SECS, Agent

    _StopGuard.block()
    site, profiles = _load(config)
    _setup_logging(log_level or site.log.level)
    agent = Agent(
        site, profiles, base_dir=Path(config).resolve().parent,
        status_file=Path(status_file) if status_file else None,
    )
    # A little under the promised bound, so the process is gone by then.
    guard = _StopGuard(agent.stop, agent.drain_secs + SHUTDOWN_MARGIN_SECS - 1)

    async def go() -> bool:
        guard.start(asyncio.get_running_loop())
        running = asyncio.create_task(agent.run(), name="agent")
        stopping = asyncio.create_task(agent.stopping(), name="stopping")
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        guard.arm()  # from here on, the process ends by the deadline
        stopping.cancel()
        return await running

    try:
        clean = asyncio.run(go())
    except StoreError as exc:
        logging.getLogger("edge_agent").error("%s", exc)
        sys.exit(3)
    sys.exit(0 if clean else EXIT_NOT_CLEAN)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def validate(config: str) -> None:
    """Check a site file and its profiles without connecting; every error as file:line."""
    site, profiles = _load(config)
    click.echo(
        f"{config}: ok ({len(site.devices)} devices, {len(profiles)} profiles, "
        f"{len(site.rules)} rules, {len(site.sinks)} sinks)"
    )


def _store(config: str):
    from .outbox.store import Store

    site, _ = _load(config)
    base = Path(config).resolve().parent
    path = site.outbox.path if site.outbox.path.is_absolute() else base / site.outbox.path
    if not path.exists():
        click.echo(f"no outbox at {path} yet", err=True)
        sys.exit(1)
    return Store(path)


@main.group()
def outbox() -> None:
    """Inspect and repair the durable outbox."""


@outbox.command("stats")
@click.option("-c", "--config", "config", required=True)
def outbox_stats(config: str) -> None:
    """Events, deliveries per sink and state, quarantined payloads."""
    click.echo(json.dumps(_store(config).stats(), indent=2))


@outbox.command("list")
@click.option("-c", "--config", "config", required=True)
@click.option("--sink", default=None)
@click.option("--state", type=click.Choice(["pending", "delivered", "dead"]), default=None)
@click.option("--limit", default=50, show_default=True)
def outbox_list(config: str, sink: str | None, state: str | None, limit: int) -> None:
    """Latest deliveries, newest first."""
    from .outbox.store import STATE_NAMES

    st = {v: k for k, v in STATE_NAMES.items()}.get(state) if state else None
    for row in _store(config).list_events(sink=sink, state=st, limit=limit):
        click.echo(json.dumps(row))


@outbox.command("dead")
@click.option("-c", "--config", "config", required=True)
@click.option("--sink", default=None)
@click.option("--limit", default=50, show_default=True)
def outbox_dead(config: str, sink: str | None, limit: int) -> None:
    """Dead-lettered deliveries with the receiver's response."""
    for row in _store(config).list_events(sink=sink, state=2, limit=limit):
        click.echo(json.dumps(row))


@outbox.command("retry")
@click.option("-c", "--config", "config", required=True)
@click.option("--sink", default=None, help="Only this sink's dead letters.")
@click.option("--id", "ids", multiple=True, help="Only these event ids (repeatable).")
def outbox_retry(config: str, sink: str | None, ids: tuple[str, ...]) -> None:
    """Send dead-lettered events again (the running agent picks them up within seconds)."""
    n = _store(config).retry_dead(sink=sink, ids=ids)
    click.echo(f"{n} deliveries put back to pending")


@outbox.command("quarantine")
@click.option("-c", "--config", "config", required=True)
@click.option("--limit", default=50, show_default=True)
def outbox_quarantine(config: str, limit: int) -> None:
    """Malformed device payloads that were set aside."""
    for row in _store(config).quarantined(limit):
        click.echo(json.dumps(row))


@main.command()
@click.option("--status-file", required=True, type=click.Path(dir_okay=False))
def status(status_file: str) -> None:
    """Print the running agent's status (from its --status-file)."""
    p = Path(status_file)
    if not p.exists():
        click.echo("no status file: is the agent running with --status-file?", err=True)
        sys.exit(1)
    data = json.loads(p.read_text())
    age = time.time() - data["time"]
    if age > 5:
        click.echo(f"warning: status is {age:.0f}s old (agent stopped?)", err=True)
    click.echo(json.dumps(data, indent=2))


@main.command()
@click.option("--dir", "directory", default="device_profiles", show_default=True)
def profiles(directory: str) -> None:
    """List the device profiles in a directory and check each one."""
    from .profiles import load_profiles

    found, problems = load_profiles(Path(directory))
    for name, p in sorted(found.items()):
        click.echo(f"{name}: {p.vendor} {p.model} v{p.version} ({p.protocol}; events: {', '.join(p.events)})")
    for pr in problems:
        click.echo(str(pr), err=True)
    if problems:
        sys.exit(2)


@main.command()
@click.argument("what", type=click.Choice(["events", "site", "profile"]), default="events")
def schema(what: str) -> None:
    """Print JSON Schemas: business event data, the site file, or the profile file."""
    from .config import SiteConfig
    from .events import EVENT_SCHEMAS
    from .profiles import Profile

    if what == "events":
        click.echo(json.dumps(EVENT_SCHEMAS, indent=2))
    elif what == "site":
        click.echo(json.dumps(SiteConfig.model_json_schema(), indent=2))
    else:
        click.echo(json.dumps(Profile.model_json_schema(), indent=2))


@main.command()
@click.option("--rate", default=200.0, show_default=True, help="Cartons per second.")
@click.option("--seconds", default=0.0, help="Stop after this long (0 = until Ctrl-C).")
@click.option("--workdir", default=".demo", show_default=True)
@click.option("--checkweigher", type=click.Choice(["mqtt", "modbus"]), default="mqtt",
              show_default=True, help="Where the packing station's weights come from.")
@click.option("--modbus-station/--no-modbus-station", default=True, show_default=True,
              help="A second packing station, CLOSE2, weighing on the Modbus checkweigher CW2 "
                   "(4 cartons/s; not with --checkweigher modbus).")
@click.option("--sorter-rate", default=3.0, show_default=True,
              help="Cartons per second through the OPC UA sorter SORTER1.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject a fault (repeatable): broker-outage@AT:SECS, restart:DEVICE@AT:SECS "
                   "or power-cycle:DEVICE@AT:SECS; AT counts from the line's start (examples above).")
@click.option("--clock", "clocks", multiple=True, metavar="DEVICE=SECS",
              help="Set a packing-station device's clock offset (scanner or checkweigher), e.g. "
                   "checkweigher=-10800 for 3 h behind (repeatable).")
@click.option("--live/--no-live", default=None,
              help="The live view (default: when stdout is a terminal); --no-live prints plain "
                   "progress lines instead.")
def demo(rate: float, seconds: float, workdir: str, checkweigher: str, modbus_station: bool,
         sorter_rate: float, faults: tuple[str, ...], clocks: tuple[str, ...],
         live: bool | None) -> None:
    """Run everything on this machine: broker, simulated line, stand-in WMS/ERP, agent, live view.

    At the end it prints a ledger per destination and event type (every delivery against
    the simulators' ground truth) and writes it to WORKDIR/ledger.json; the exit code is 0
    when every fact arrived exactly once everywhere.

    \b
    Faults (--fault SPEC, AT and SECS in seconds):
      broker-outage@15:5      the MQTT broker stops for 5 s at 15 s and comes back on the
                              same port with its sessions and queued messages
      restart:PTL1@25:2       a Modbus device (PTL1, CONV1) restarts, down 2 s
      restart:SORTER1@30:2    the OPC UA sorter's server restarts, down 2 s, after its
                              induct stopped, its belt emptied and the agent has every
                              event (a restart drops what a server has queued); induct
                              opens again once the agent is subscribed again
      power-cycle:PTL1@25:2   a Modbus device loses power: registers back to power-up
                              values; a key press not yet acknowledged is lost with it
    """
    from .demo import run_demo

    sys.exit(run_demo(rate=rate, seconds=seconds, workdir=Path(workdir), checkweigher=checkweigher,
                      faults=list(faults), clocks=list(clocks), modbus_station=modbus_station,
                      sorter_rate=sorter_rate, live=live))


if __name__ == "__main__":
    main()
