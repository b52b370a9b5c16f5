"""Wiring: builds every component from the config and runs them in one asyncio process.

Starts downstream first (outbox, sinks, dispatchers, rules) and the connectors last; stops
upstream first: connectors stop reading, the last batch is committed and acknowledged,
dispatchers get a bounded drain period, then sinks and the outbox close.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    BrokerConfig,
    HttpSinkConfig,
    ModbusConnection,
    MqttConnection,
    MqttSinkConfig,
    OpcuaConnection,
    SiteConfig,
)
from .connectors.mqtt import MqttConnector
from .errors import StoreError
from .events import iso_time
from .outbox.committer import Committer
from .outbox.dispatcher import Dispatcher
from .outbox.store import OutboxFull, Store
from .profiles import AnyProfile
from .rules import build_rule
from .rules.engine import Engine
from .rules.sources import Sources
from .runtime.clock import Clock, SystemClock
from .runtime.supervisor import Health, supervise
from .sinks.base import Sink
from .sinks.http import HttpSink
from .sinks.mqtt import MqttSink

if TYPE_CHECKING:  # imported when a site has such devices: asyncua alone is ~40 MB
    from .connectors.modbus import ModbusConnector
    from .connectors.opcua import OpcuaConnector

log = logging.getLogger(__name__)

MAINTENANCE_SECS = 30.0
CROWDED_SECS = 1.0  # shortest pause between maintenance rounds while the outbox is crowded
DRAIN_SECS = 5.0  # how long SIGTERM lets the dispatchers deliver what is pending
# Every shutdown step but the drain has a timeout (SHUTDOWN_STEP_SECS, 12 s together): SIGTERM
# ends the process within drain + SHUTDOWN_MARGIN_SECS whatever a device, a peer or a library
# does (the command line enforces it); systemd's TimeoutStopSec is 30 s.
SHUTDOWN_MARGIN_SECS = 15.0
SHUTDOWN_STEP_SECS = {
    "last commit": 2.0, "connectors stop": 2.0, "connectors end": 1.0, "dispatchers end": 2.0,
    "outbox close": 2.0, "tasks end": 1.0, "sinks close": 2.0,
}


class Agent:
    def __init__(
        self,
        site: SiteConfig,
        profiles: dict[str, AnyProfile],
        *,
        base_dir: Path,
        clock: Clock | None = None,
        status_file: Path | None = None,
        drain_secs: float = DRAIN_SECS,
    ):
        self.site = site
        self.profiles = profiles
        self.base_dir = base_dir
        self.clock = clock or SystemClock()
        self.status_file = status_file
        self.drain_secs = drain_secs
        ob = site.outbox
        self.db_path = ob.path if ob.path.is_absolute() else base_dir / ob.path
        self.store: Store | None = None
        self.committer: Committer | None = None
        self.engine: Engine | None = None
        self.sinks: dict[str, Sink] = {}
        self.dispatchers: list[Dispatcher] = []
        self.connectors: list[MqttConnector | ModbusConnector | OpcuaConnector] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.time()
        self.ingest_paused = False
        self.pause_causes: dict[str, dict[str, Any]] = {}  # "quota" | "disk_full" -> since, detail
        self._stop = asyncio.Event()

    # --- building --------------------------------------------------------------------------

    def _routes(self) -> dict[str, list[str]]:
        types: set[str] = set()
        for r in self.site.rules:
            types |= {t.emit.type for t in getattr(r, "terminate_on", ())}
            if r.emit is not None:
                types.add(r.emit.type)
            if getattr(r, "on_timeout", None):
                types.add(r.on_timeout.type)
        return {
            t: [n for n, s in self.site.sinks.items() if s.event_types is None or t in s.event_types]
            for t in sorted(types)
        }

    def _build(self) -> None:
        site = self.site
        self.store = Store(self.db_path)
        ob = site.outbox
        self.committer = Committer(
            self.store, self._routes(), interval_ms=ob.commit_interval_ms, max_items=ob.commit_max_items
        )
        rules = [build_rule(r, site=site.site) for r in site.rules]
        tc = site.time
        sources = Sources(
            idle_secs=tc.idle_source_secs, hold_offline_secs=tc.hold_offline_secs,
            skew_tolerance_secs=tc.clock_skew_tolerance_secs, hole_margin_secs=tc.gap_margin_secs,
        )
        self.engine = Engine(
            rules, self.committer, self.clock, site=site.site,
            dedup_retention_secs=ob.dedup_retention_secs, sources=sources,
        )
        self.engine.restore(
            self.store.load_rule_state(), self.store.load_inputs(self.clock.now() - ob.dedup_retention_secs)
        )
        for name, cfg in site.sinks.items():
            if isinstance(cfg, HttpSinkConfig):
                sink: Sink = HttpSink(name, cfg, base_dir=self.base_dir)
            else:
                assert isinstance(cfg, MqttSinkConfig)
                sink = MqttSink(
                    name, cfg, self._broker(cfg.broker), site=site.site,
                    client_id=f"{self._client_id(cfg.broker)}-sink-{name}",
                )
            self.sinks[name] = sink
            r = cfg.retry
            self.dispatchers.append(
                Dispatcher(
                    sink,
                    self.committer,
                    initial_backoff_secs=r.initial_backoff_ms / 1000,
                    max_backoff_secs=r.max_backoff_ms / 1000,
                    max_retry_after_secs=r.max_retry_after_secs,
                    linger_secs=cfg.batch_linger_ms / 1000,
                )
            )
        by_broker: dict[str, dict[str, Any]] = {}
        for dev_id, dev in site.devices.items():
            if isinstance(dev.connection, MqttConnection):
                by_broker.setdefault(dev.connection.broker, {})[dev_id] = dev
        for dev_id, dev in site.devices.items():
            if isinstance(dev.connection, ModbusConnection):
                from .connectors.modbus import ModbusConnector
                from .profiles_modbus import ModbusProfile

                prof = self.profiles[dev.profile]
                assert isinstance(prof, ModbusProfile)
                self.connectors.append(ModbusConnector(dev_id, dev.connection, prof, self.clock))
            elif isinstance(dev.connection, OpcuaConnection):
                from .connectors.opcua import OpcuaConnector
                from .profiles_opcua import OpcuaProfile

                oprof = self.profiles[dev.profile]
                assert isinstance(oprof, OpcuaProfile)
                self.connectors.append(
                    OpcuaConnector(dev_id, self._resolve_paths(dev.connection), oprof, self.clock)
                )
        for broker, devices in sorted(by_broker.items()):
            self.connectors.append(
                MqttConnector(
                    f"mqtt:{broker}", self._broker(broker), devices, self.profiles, self.clock,
                    client_id=f"{self._client_id(broker)}-in",
                )
            )
        for c in self.connectors:
            self._watch_coverage(c)

    def _watch_coverage(self, c: MqttConnector | ModbusConnector | OpcuaConnector) -> None:
        """Tell the engine when a connector's devices can and cannot be seen."""
        engine = self.engine
        assert engine is not None
        if isinstance(c, MqttConnector):
            devices = list(c.devices)
            for d in devices:
                engine.sources.add(d, buffered=c.buffered[d])
        else:
            devices = [c.device]
            kinds = {getattr(getattr(e, "trigger", None), "kind", None) or getattr(e, "kind", None)
                     for e in c.profile.events.values()}
            # Counters report what was missed; a handshake holds its data until acknowledged.
            engine.sources.add(c.device, lossless_reconnect=kinds <= {"counter", "handshake"})

        def changed(state: str) -> None:
            online = state in ("online", "degraded")
            engine.source_online(devices, online, resumed=getattr(c, "resumed", False))

        c.health.on_change = changed

    def _broker(self, name: str) -> BrokerConfig:
        """The broker's config with file paths resolved against the site file's directory."""
        b = self.site.brokers[name]
        if b.password_file is not None and not b.password_file.is_absolute():
            b = b.model_copy(update={"password_file": self.base_dir / b.password_file})
        return b

    def _resolve_paths(self, conn: OpcuaConnection) -> OpcuaConnection:
        """File paths in a connection are relative to the site file's directory."""
        update = {
            k: self.base_dir / v
            for k in ("certificate_dir", "server_certificate", "password_file",
                      "user_certificate", "user_private_key")
            if isinstance(v := getattr(conn, k), Path) and not v.is_absolute()
        }
        return conn.model_copy(update=update) if update else conn

    def _client_id(self, broker: str) -> str:
        return self.site.brokers[broker].client_id or f"edge-agent-{self.site.site}"

    # --- running ---------------------------------------------------------------------------

    def _task(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        t.set_name(name)
        self.tasks.append(t)
        return t

    async def run(self) -> bool:
        """Run until ``stop()``; then shut down in order, every step bounded.

        Returns whether the shutdown was clean (every step finished in its time); raises if
        a component crashed.
        """
        self._build()
        assert self.committer and self.engine and self.store
        commit_task = asyncio.create_task(self.committer.run(), name="committer")
        for sink in self.sinks.values():
            await sink.start()
            if isinstance(sink, MqttSink):
                self._task(supervise(f"sink {sink.name}", sink.run, sink.health), f"link-{sink.name}")
        dispatch_tasks = [asyncio.create_task(d.run(), name=f"dispatch-{d.name}") for d in self.dispatchers]
        self._task(self.engine.run_ticks(), "ticks")
        self._task(self._maintenance(), "maintenance")
        if self.status_file:
            self._task(self._write_status_loop(), "status")
        self._task(self._device_status_loop(), "device-status")
        conn_tasks = [
            asyncio.create_task(
                supervise(c.name, lambda c=c: c.run(self.engine), c.health), name=c.name
            )
            for c in self.connectors
        ]
        log.info(
            "agent %s running: %d devices, %d rules, sinks %s, outbox %s",
            self.site.site, len(self.site.devices), len(self.site.rules),
            ", ".join(self.sinks), self.db_path,
        )
        watched = [commit_task, *dispatch_tasks, *conn_tasks, *self.tasks]
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_wait, *watched], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stop_wait and not t.cancelled() and t.exception()]
        stop_wait.cancel()
        self._stop.set()  # also after a crash: `stopping()` waiters learn the shutdown began
        clean = await self._shutdown(commit_task, dispatch_tasks, conn_tasks)
        if crashed:
            raise crashed[0].exception()  # type: ignore[misc]
        return clean

    def stop(self) -> None:
        """Begin the shutdown (idempotent; safe from a signal handler on the loop)."""
        self._stop.set()

    async def stopping(self) -> None:
        """Return once the shutdown has begun (``stop()`` or a crashed component)."""
        await self._stop.wait()

    async def _shutdown(
        self, commit_task: asyncio.Task[Any], dispatch_tasks: list[asyncio.Task[Any]],
        conn_tasks: list[asyncio.Task[Any]],
    ) -> bool:
        """Stop upstream first; every step has a timeout. Returns whether all finished.

        What a step abandons is never lost: device messages not yet committed stay
        unacknowledged (the broker redelivers them, devices keep theirs until acknowledged),
        deliveries not yet settled stay pending in the outbox and go out after a restart.
        """
        assert self.committer and self.store
        problems: list[str] = []
        step = functools.partial(_step, problems)
        log.info("stopping: connectors first")
        for c in self.connectors:
            c.pause_reading()  # every kind: MQTT stops reading, Modbus polling, OPC UA publishing
        # Commit and acknowledge what was read, while the links are still up.
        if not commit_task.done():
            await step("last commit", self.committer.flush())
        await step("connectors stop", asyncio.gather(*(c.stop() for c in self.connectors)))
        await step("connectors end", _cancel(conn_tasks))
        # Bounded drain: give the dispatchers a moment to deliver what is pending.
        deadline = time.monotonic() + self.drain_secs
        while time.monotonic() < deadline and any(d.state == "sending" or d.held for d in self.dispatchers):
            await asyncio.sleep(0.05)
        for d in self.dispatchers:
            d.stop()
        await step("dispatchers end", _ended(dispatch_tasks))
        self.committer.close()
        outbox_ok = await step("outbox close", _ended([commit_task]))
        if self.status_file:
            self._write_status()
        await step("tasks end", _cancel(self.tasks))
        await step("sinks close", asyncio.gather(*(s.close() for s in self.sinks.values())))
        if outbox_ok:
            self.committer.shutdown_executor()
            self.store.close()
        # else the database thread may still hold the store: the process exits without
        # closing it (SQLite's WAL keeps every committed transaction).
        if problems:
            log.warning("stopped, not cleanly: %s", "; ".join(problems))
            return False
        log.info("stopped cleanly")
        return True

    async def _maintenance(self) -> None:
        """Keep the outbox within its quota and its disk: prune, give space back, checkpoint
        the WAL.

        Every MAINTENANCE_SECS, and at once (then at most every CROWDED_SECS) when a commit
        finds the outbox crowded (near its quota, its filesystem under the free space kept,
        the disk full, settles made while a batch waits for room), when delivered events
        are pruned whatever their retention. The quota and the free space are checked by
        the committer at every commit, and here after each round (ingest paused makes few
        commits: the space given back here is what lets it resume).
        """
        c, store = self.committer, self.store
        assert c and store
        ob = self.site.outbox
        await c.run_db(store.set_limits, ob.max_disk_mb * 2**20)
        c.quota_bytes = ob.max_disk_mb * 2**20
        c.min_free_bytes = min(
            ob.min_free_disk_mb * 2**20,
            int(store.disk_total_bytes() * ob.min_free_disk_percent / 100),
        )
        c.on_pressure = self._on_pressure
        # The reserve file (see make_reserve): room to settle and prune an outbox of up to
        # the quota, so an eighth of it (as the hard stop over the quota), within the floor.
        reserve = min(c.min_free_bytes, c.quota_bytes // 8)
        if not reserve or store.reserve_path.exists() or store.free_bytes() >= 2 * reserve:
            await c.run_db(store.make_reserve, reserve)
        c.check_quota()
        c.check_disk()
        failing = ""
        while True:
            try:
                await asyncio.wait_for(c.crowded.wait(), MAINTENANCE_SECS)
            except TimeoutError:
                pass
            crowded = c.crowded.is_set() or c.over_quota or c.low_disk or bool(c.full_since)
            c.crowded.clear()
            now = self.clock.now()
            step = functools.partial(
                store.prune_step,
                inputs_before=now - ob.dedup_retention_secs,
                delivered_before=now if crowded else now - ob.delivered_retention_secs,
            )
            try:
                while await c.run_db(step):
                    pass
                await c.run_db(store.compact)
                failing = ""
            except StoreError as exc:  # a full disk is the committer's to report
                if str(exc) != failing and not isinstance(exc, OutboxFull):
                    log.error("outbox maintenance failed (retried): %s", exc)
                failing = str(exc)
            c.check_quota()
            c.check_disk()
            if reserve and not store.reserve_held and not c.low_disk and c.full_since is None:
                await c.run_db(store.make_reserve, reserve)  # room is back: hold it again
            if crowded:
                await asyncio.sleep(CROWDED_SECS)

    def _on_pressure(self, kind: str, detail: str | None) -> None:
        """The outbox asks ingest to pause (``detail``: why) or allows it again (None).

        Every connector stops reading (devices' messages stay unacknowledged, upstream)
        while any cause remains; business events already made are kept and delivered.
        """
        if detail is not None:
            self.pause_causes[kind] = {"since": time.time(), "detail": detail}
            if kind != "disk_full":  # the committer has said that one itself
                log.error(
                    "%s: ingest paused; devices' messages wait upstream until sinks catch up",
                    detail,
                )
        elif self.pause_causes.pop(kind, None) is not None and kind != "disk_full":
            log.warning("outbox back under its quota" if kind == "quota" else
                        "outbox's filesystem has room again")
        paused = bool(self.pause_causes)
        if paused == self.ingest_paused:
            return
        self.ingest_paused = paused
        if self.engine is not None:
            self.engine.paused = paused
        for conn in self.connectors:
            (conn.pause_reading if paused else conn.resume_reading)()
        if not paused:
            log.warning("ingest resumed")

    # --- status ----------------------------------------------------------------------------

    def _device_health(self) -> dict[str, Health]:
        out: dict[str, Health] = {}
        for c in self.connectors:
            if not isinstance(c, MqttConnector):
                out[c.device] = c.health
            else:
                out.update({d: c.health for d in c.devices})
        return out

    async def _device_status_loop(self) -> None:
        """Publish each device's status, retained, whenever it changes (and on reconnect)."""
        sent: dict[tuple[str, str], tuple[str, float]] = {}
        sinks = [s for s in self.sinks.values() if isinstance(s, MqttSink)]
        while True:
            for dev, h in self._device_health().items():
                payload = {"state": h.state, "since": iso_time(h.since), "last_error": h.last_error}
                for s in sinks:
                    key = (s.name, dev)
                    stamp = (h.state, id(s.link))  # a new link (reconnect) republishes
                    if sent.get(key) != stamp and s.publish_device_status(dev, payload):
                        sent[key] = stamp  # type: ignore[assignment]
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        assert self.engine and self.committer
        return {
            "site": self.site.site,
            "pid": os.getpid(),
            "time": time.time(),
            "started_at": self.started_at,
            "ingest_paused": self.ingest_paused,
            "connectors": {c.name: c.status() for c in self.connectors},
            "engine": {
                **self.engine.counters,
                "bad_payloads": {f"{d}:{r}": n for (d, r), n in self.engine.bad.items()},
                "open_keys": {r.name: r.open_keys() for r in self.engine.rules},
                "unseen": {r.name: n for r in self.engine.rules
                           if (n := getattr(r, "counters", {}).get("unseen"))},
                "sources": self.engine.sources.status(),
                # An exception can be about what came before a device was covered up to this
                # long before: until then a missing input is reported as a gap.
                # (only rules that report what did not come: correlate's missing inputs)
                "max_window_secs": max(
                    [r.window + r.lateness for r in self.engine.rules if hasattr(r, "devices_of")],
                    default=0,
                ),
                "recent": self.engine.recent[-20:],
            },
            "ingest_pause": self.pause_causes,
            "outbox": {
                "commits": self.committer.commits,
                "committed_events": self.committer.committed_events,
                "last_commit_ms": round(self.committer.last_commit_ms, 3),
                # as of the last commit or maintenance (no stat per status)
                "used_bytes": self.store.used_bytes if self.store else 0,
                "file_bytes": self.store.file_bytes if self.store else 0,
                "wal_bytes": self.store.wal_bytes if self.store else 0,
                "quota_bytes": self.committer.quota_bytes,
                "disk_full_since": self.committer.full_since,
                # free space on its filesystem as of the last check, and the floor kept
                "disk_free_bytes": self.committer.disk_free_bytes,
                "min_free_disk_bytes": self.committer.min_free_bytes,
            },
            "sinks": {
                d.name: {
                    "state": d.state,
                    "delivered": d.delivered,
                    "dead": d.dead,
                    "failures": d.failures,
                    "last_error": d.last_error,
                    "cursor": d.cursor,
                    **({"link": _health(s.health)} if isinstance(s := d.sink, MqttSink) else {}),
                }
                for d in self.dispatchers
            },
        }

    def _write_status(self) -> None:
        assert self.status_file
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, self.status_file)

    async def _write_status_loop(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(0.5)


def _health(h: Health) -> dict[str, Any]:
    return {"state": h.state, "since": h.since, "last_error": h.last_error, "restarts": h.restarts}


async def _step(problems: list[str], what: str, aw: Awaitable[Any]) -> bool:
    """One shutdown step, for at most its ``SHUTDOWN_STEP_SECS``; False (and noted in
    ``problems``) when it failed or overran. An overrunning step is cancelled and left
    behind, never awaited: a library that ignores cancellation cannot hold up the exit."""
    secs = SHUTDOWN_STEP_SECS[what]
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=secs)
    if not done:
        task.cancel()
        problems.append(f"{what}: not done within {secs:g} s")
    elif task.cancelled():
        problems.append(f"{what}: cancelled")
    elif (exc := task.exception()) is not None:
        problems.append(f"{what}: {exc!r}")
    else:
        return True
    log.warning("shutdown step %s", problems[-1])
    return False


async def _ended(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for tasks asked to stop; cancel them if the step's time runs out."""
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks until they end, logging any that had failed.

    Cancels again while it waits: a cancellation can be swallowed (``asyncio.wait_for`` of
    Python 3.11 returns its inner result, or raises its error, when both arrive together),
    and a supervised connector then goes on reconnecting; every later cancel ends it. The
    caller bounds the wait (``_step``).
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for t in tasks:
        if not t.cancelled() and (exc := t.exception()) is not None:
            # A task that had failed: say so, shutdown goes on.
            log.error("task %s failed", t.get_name(), exc_info=exc)
