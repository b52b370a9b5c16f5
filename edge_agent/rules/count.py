"""The ``count`` rule: an event when a key has had ``threshold`` matching device events
within a window (e.g. a carton recirculated too often on a sorter).

Per key it keeps the first event's time and the ids of the events counted (at most
``threshold``), persisted with every group commit; it emits once per window, with an id made
of the counted messages' ids, so a replay gives the same event. Keys expire on event time
(the watermark the engine drives, or the latest device time seen when standing alone),
never on the agent's clock, so a live run and a replay of the same inputs agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import CountRule
from ..events import BusinessEvent, DeviceEvent, event_id
from .base import Output, input_triples
from .correlate import _condition, _Emit, _subject

LATENESS_SECS = 1.0  # how long after its window a key waits for events out of order


class Count:
    kind = "count"

    def __init__(self, cfg: CountRule, *, site: str):
        self.cfg = cfg
        self.name = cfg.name
        self.site = site
        self.source = f"edge-agent/{site}/rules/{cfg.name}"
        self.when = _condition(cfg.when) if cfg.when else None
        self.emit_spec = _Emit(cfg.emit)
        self.window = cfg.window_secs
        self.state: dict[str, dict[str, Any]] = {}  # key -> {"t0", "ids", "emitted"}
        self.lateness = LATENESS_SECS
        self.watermark = float("-inf")
        self.max_time = float("-inf")
        self.driven = False  # the engine calls advance(); else on_event advances on its own

    def inputs(self) -> list[tuple[str, str, str]]:
        return input_triples(self.cfg.inputs)

    def open_keys(self) -> int:
        return len(self.state)

    def load_state(self, items: Mapping[str, Any]) -> None:
        self.state = {k: dict(v) for k, v in items.items()}

    def on_tick(self, now: float, out: Output) -> None:
        """Nothing: keys expire on event time (``advance``)."""

    def advance(self, watermark: float, out: Output) -> None:
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        horizon = watermark - self.window
        for key in [k for k, s in self.state.items() if s["t0"] < horizon]:
            del self.state[key]
            out.state_changed(self.name, key, None)

    def on_event(self, ev: DeviceEvent, input_name: str, out: Output) -> None:
        if self.when is not None and not self.when(ev):
            return
        key = ev.fields.get(self.cfg.key)
        if key is None or key == "":
            return
        key = str(key)
        if ev.time > self.max_time:
            self.max_time = ev.time
            if not self.driven:
                self.advance(ev.time - self.lateness, out)
        s = self.state.get(key)
        if s is None or ev.time - s["t0"] > self.window:
            s = self.state[key] = {"t0": ev.time, "ids": [], "emitted": False}
        if s["emitted"]:
            return
        s["ids"].append(ev.msg_id)
        if len(s["ids"]) >= self.cfg.threshold:
            s["emitted"] = True
            e = self.emit_spec
            ctx: dict[str, Any] = {input_name: ev, "rule": self.name, "site": self.site,
                                   "key": key, "reason": None, "missing": ""}
            out.emit(BusinessEvent(
                id=event_id(self.site, self.name, e.type, key, *sorted(s["ids"])),
                type=e.type, subject=_subject(e.subject(ctx), key), time=ev.time,
                source=self.source, data=e.data(ctx),
            ))
        out.state_changed(self.name, key, s)
