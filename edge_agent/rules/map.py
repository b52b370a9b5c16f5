"""The ``map`` rule: one business event for each matching device event, no state.

For equipment whose own signal already is the business fact (a pick confirmed at a
pick-to-light position, a conveyor jam), the rule only filters (``when``) and shapes the
event (``emit``). The id comes from the device message's id, so a replayed message gives
the same event id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import MapRule
from ..events import BusinessEvent, DeviceEvent, event_id
from .base import Output, input_triples
from .correlate import _condition, _Emit, _subject


class Map:
    kind = "map"

    def __init__(self, cfg: MapRule, *, site: str):
        self.cfg = cfg
        self.name = cfg.name
        self.site = site
        self.source = f"edge-agent/{site}/rules/{cfg.name}"
        self.when = _condition(cfg.when) if cfg.when else None
        self.emit_spec = _Emit(cfg.emit)
        self.counters = {"filtered": 0}
        self.lateness = 0.0
        self.watermark = float("-inf")
        self.driven = False

    def inputs(self) -> list[tuple[str, str, str]]:
        return input_triples(self.cfg.inputs)

    def open_keys(self) -> int:
        return 0

    def load_state(self, items: Mapping[str, Any]) -> None:
        """Stateless."""

    def on_tick(self, now: float, out: Output) -> None:
        """Nothing expires."""

    def advance(self, watermark: float, out: Output) -> None:
        """Nothing waits for time."""

    def on_event(self, ev: DeviceEvent, input_name: str, out: Output) -> None:
        if self.when is not None and not self.when(ev):
            self.counters["filtered"] += 1
            return
        e = self.emit_spec
        ctx: dict[str, Any] = {input_name: ev, "rule": self.name, "site": self.site,
                               "key": ev.device, "reason": None, "missing": ""}
        out.emit(
            BusinessEvent(
                id=event_id(self.site, self.name, e.type, ev.msg_id),
                type=e.type,
                subject=_subject(e.subject(ctx), ev.device),
                time=ev.time,
                source=self.source,
                data=e.data(ctx),
            )
        )
