"""Run rules the way the agent does, without an outbox: for tests of rule behaviour in time.

``RuleHarness`` wires rules into a real ``Engine`` (so event time, device clocks, watermarks
and gaps are exactly the agent's) with a stand-in committer whose batch is never flushed:
``events`` is everything the rules emitted, in order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..events import BusinessEvent, DeviceEvent
from ..outbox.batch import Batch
from ..rules.base import Rule
from ..rules.engine import Engine
from ..rules.sources import Sources
from ..runtime.clock import ManualClock


class _Committer:
    def __init__(self) -> None:
        self.batch = Batch()

    def changed(self) -> None:
        pass

    def stalled_secs(self) -> float:
        return 0.0


class RuleHarness:
    def __init__(
        self, rules: Iterable[Rule], *, start: float = 1_800_000_000.0, site: str = "s1",
        sources: Sources | None = None, tick_secs: float = 0.1,
    ):
        self.clock = ManualClock(start)
        self.committer = _Committer()
        self.engine = Engine(list(rules), self.committer, self.clock, site=site,  # type: ignore[arg-type]
                             sources=sources)
        self.tick_secs = tick_secs

    @property
    def events(self) -> list[BusinessEvent]:
        return self.committer.batch.events

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def source(self, device: str, *, buffered: bool = False, lossless_reconnect: bool = False,
               online: bool = True, resumed: bool = False) -> None:
        """Declare a device as the agent would (and bring it online now)."""
        self.engine.sources.add(device, buffered=buffered, lossless_reconnect=lossless_reconnect)
        if online:
            self.engine.source_online([device], True, resumed=resumed)

    def online(self, device: str, online: bool, *, resumed: bool = False) -> None:
        self.engine.source_online([device], online, resumed=resumed)

    def feed(self, *evs: DeviceEvent, advance_to_arrival: bool = True) -> None:
        """Deliver device events; the clock first moves to each one's arrival time."""
        for ev in evs:
            if advance_to_arrival and ev.received_at > self.clock.now():
                self.run_until(ev.received_at)
            self.engine.device_event(ev, None)

    def run_until(self, t: float) -> None:
        """Let wall time pass up to ``t``, ticking as the agent does."""
        while self.clock.now() + self.tick_secs <= t:
            self.clock.advance(self.tick_secs)
            self.engine.tick()
        if t > self.clock.now():
            self.clock.advance(t - self.clock.now())
            self.engine.tick()

    def counters(self, rule: str) -> dict[str, Any]:
        r = next(r for r in self.engine.rules if r.name == rule)
        return dict(getattr(r, "counters", {}))
