"""The ``correlate`` rule: join device events of several inputs by a business key in a window.

Time is *event time*: a window opens at the device time of the first input of a key and
closes when the rule's watermark passes ``t0 + window``. In the agent the engine drives the
watermark (``advance``) from every input device's own progress (``rules.sources``): the
slowest active input minus ``allowed_lateness_secs``, held while a source is down or the
agent is behind. Standing alone (tests), the rule advances it from the latest device time
it has seen. Because replayed messages carry their original device times, a restart after
an outage re-plays the same correlations instead of expiring every open window at once.

After a key is resolved (complete or terminated) it stays *closed* until its window would
have ended; after it timed out, for one more window: a late partner or a repeated message
of the same carton is absorbed (counted) instead of opening a second window that would
invent a second exception.

A window that closes without an input whose device the agent could not see for part of
the window (before it first connected, while it was down, a counter gap) is a *gap*, not an
exception: the agent cannot know the carton is missing it. Gaps are counted per rule
(``unseen``) and logged once.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from typing import Any

from ..config import Condition, CorrelateRule
from ..events import BusinessEvent, DeviceEvent, event_id
from .base import Output, compile_data, compile_template, input_triples
from .sources import Sources

log = logging.getLogger(__name__)

WM_SAVE_SECS = 1.0
WM_KEY = ""  # state key under which the watermark is persisted (business keys are non-empty)


class _Open:
    __slots__ = ("t0", "deadline", "parts", "closed", "timed_out")

    def __init__(self, t0: float, deadline: float):
        self.t0 = t0
        self.deadline = deadline
        self.parts: dict[str, DeviceEvent] = {}
        self.closed = False
        self.timed_out = False

    def to_json(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "deadline": self.deadline,
            "closed": self.closed,
            "timed_out": self.timed_out,
            "parts": {
                n: [p.device, p.event, p.fields, p.time, p.received_at, p.msg_id]
                for n, p in self.parts.items()
            },
        }

    @classmethod
    def from_json(cls, v: Mapping[str, Any]) -> _Open:
        o = cls(v["t0"], v["deadline"])
        o.closed = v["closed"]
        o.timed_out = v.get("timed_out", False)
        o.parts = {n: DeviceEvent(*p) for n, p in v["parts"].items()}
        return o


def _condition(c: Condition):
    f = c.field
    if c.in_ is not None:
        values = list(c.in_)
        return lambda ev: ev.fields.get(f) in values
    eq = c.equals
    return lambda ev: ev.fields.get(f) == eq


class _Emit:
    """A compiled EmitSpec."""

    def __init__(self, spec: Any):
        self.type = spec.type
        self.subject = compile_template(spec.subject)
        self.data = compile_data(spec.data)


def _subject(value: Any, key: str) -> str:
    # A subject template naming an input that never came (a timeout) falls back to the key.
    return key if value is None or value == "" else str(value)


class Correlate:
    kind = "correlate"

    def __init__(self, cfg: CorrelateRule, *, site: str, max_open_keys: int = 200_000):
        self.cfg = cfg
        self.name = cfg.name
        self.site = site
        self.source = f"edge-agent/{site}/rules/{cfg.name}"
        self.key_field = cfg.key
        self.window = cfg.window_secs
        self.lateness = cfg.allowed_lateness_secs
        self.needed = frozenset(cfg.inputs)
        self.devices_of = {
            n: frozenset([sp.device] if isinstance(sp.device, str) else sp.device)
            for n, sp in cfg.inputs.items()
        }
        self.emit_ok = _Emit(cfg.emit) if cfg.emit else None
        self.emit_timeout = _Emit(cfg.on_timeout) if cfg.on_timeout else None
        self.reasons = dict(cfg.on_timeout.reasons) if cfg.on_timeout else {}
        self.terminators: dict[str, list[tuple[Any, _Emit]]] = {}
        for t in cfg.terminate_on:
            self.terminators.setdefault(t.input, []).append((_condition(t.when), _Emit(t.emit)))
        self.max_open_keys = max_open_keys
        self.open: dict[str, _Open] = {}
        self.heap: list[tuple[float, str]] = []  # (deadline, key); stale entries skipped
        self.max_time = 0.0  # latest trusted device time seen
        self.watermark = 0.0
        self._wm_saved = 0.0
        self._wm_saved_at = 0.0
        self.driven = False  # the engine calls advance(); else on_event advances on its own
        self.sources: Sources | None = None  # what the agent could not see (set by the engine)
        self.counters = {"absorbed": 0, "late_after_timeout": 0, "no_key": 0,
                         "forced_expiry": 0, "unseen": 0}

    # --- Rule protocol ---------------------------------------------------------------------

    def inputs(self) -> list[tuple[str, str, str]]:
        return input_triples(self.cfg.inputs)

    def open_keys(self) -> int:
        return len(self.open)

    def load_state(self, items: Mapping[str, Any]) -> None:
        for key, v in items.items():
            if key == WM_KEY:
                self.max_time = v["max_time"]
                self.watermark = v["watermark"]
                continue
            o = _Open.from_json(v)
            self.open[key] = o
            heapq.heappush(self.heap, (o.deadline, key))

    def on_event(self, ev: DeviceEvent, input_name: str, out: Output) -> None:
        key = ev.fields.get(self.key_field)
        if key is None or key == "":
            self.counters["no_key"] += 1
            return
        key = str(key)
        t = ev.time
        o = self.open.get(key)
        if o is None:
            o = _Open(t, t + self.window)
            self.open[key] = o
            heapq.heappush(self.heap, (o.deadline, key))
            if len(self.open) > self.max_open_keys:
                self._force_expire(out)
        elif not o.closed and t > o.t0 + self.window:
            # Beyond its window: the window had ended (a replay brings both at once); decide
            # it as the live run did, then this input is its late partner.
            self._timeout(key, o, out)
        if o.closed or input_name in o.parts:
            # Late partner of a resolved key, or a second message for the same input.
            self.counters["late_after_timeout" if o.timed_out else "absorbed"] += 1
            return
        o.parts[input_name] = ev
        for cond, emit in self.terminators.get(input_name, ()):
            if cond(ev):
                self._resolve(key, o, emit, out, reason=None, use=[input_name])
                break
        else:
            if len(o.parts) == len(self.needed):
                self._resolve(key, o, self.emit_ok, out, reason=None, use=list(o.parts))
            else:
                out.state_changed(self.name, key, o)  # serialized at commit, in its latest form
        if t > self.max_time:
            self.max_time = t
            if not self.driven:
                self.advance(t - self.lateness, out)

    def advance(self, watermark: float, out: Output) -> None:
        """Event time has surely reached ``watermark`` for every input: close what ended."""
        if watermark > self.watermark:
            self.watermark = watermark
            self._expire(out)

    def on_tick(self, now: float, out: Output) -> None:
        if self.watermark != self._wm_saved and now - self._wm_saved_at >= WM_SAVE_SECS:
            # A stale persisted watermark is only conservative; no need to write it per tick.
            self._wm_saved, self._wm_saved_at = self.watermark, now
            out.state_changed(
                self.name, WM_KEY, {"max_time": self.max_time, "watermark": self.watermark}
            )

    # --- internals -------------------------------------------------------------------------

    def _expire(self, out: Output) -> None:
        heap, wm = self.heap, self.watermark
        while heap and heap[0][0] < wm:
            deadline, key = heapq.heappop(heap)
            o = self.open.get(key)
            if o is None or o.deadline != deadline:
                continue
            self._timeout(key, o, out)

    def _force_expire(self, out: Output) -> None:
        while len(self.open) > self.max_open_keys and self.heap:
            deadline, key = heapq.heappop(self.heap)
            o = self.open.get(key)
            if o is not None and o.deadline == deadline:
                if not o.closed:
                    self.counters["forced_expiry"] += 1
                    self._timeout(key, o, out)
                del self.open[key]  # no room to absorb its stragglers
                out.state_changed(self.name, key, None)

    def _timeout(self, key: str, o: _Open, out: Output) -> None:
        if o.closed:
            del self.open[key]  # its absorbing time is over
            out.state_changed(self.name, key, None)
            return
        # Stay closed for one more window: a late partner must not open a second window.
        missing = sorted(self.needed - o.parts.keys())
        parts = o.parts
        o.closed, o.timed_out, o.parts = True, True, {}
        o.deadline += self.window
        heapq.heappush(self.heap, (o.deadline, key))
        out.state_changed(self.name, key, o)
        if self.emit_timeout is None:
            return
        src = self.sources
        if src is not None:
            devices = [d for m in missing for d in self.devices_of[m]]
            if src.unseen(devices, o.t0 - self.window, o.t0 + self.window):
                self.counters["unseen"] += 1
                if self.counters["unseen"] == 1:
                    log.warning(
                        "rule %s: a window closed without %s while %s was not seen by the agent; "
                        "reported as a gap, not an exception (counted as unseen)",
                        self.name, ",".join(missing), ",".join(sorted(devices)),
                    )
                return
        reason = ",".join(self.reasons.get(m, f"no_{m}") for m in missing)
        ctx: dict[str, Any] = dict(parts)
        ctx.update(key=key, rule=self.name, site=self.site, reason=reason, missing=",".join(missing))
        ids = sorted(p.msg_id for p in parts.values())
        self._out(self.emit_timeout, ctx, o.t0 + self.window, ids, key, out)

    def _resolve(
        self, key: str, o: _Open, emit: _Emit | None, out: Output, reason: str | None,
        use: list[str],
    ) -> None:
        if emit is not None:
            ctx: dict[str, Any] = dict(o.parts)
            ctx.update(key=key, rule=self.name, site=self.site, reason=reason, missing="")
            parts = [o.parts[n] for n in use]
            t = max(p.time for p in parts)
            self._out(emit, ctx, t, sorted(p.msg_id for p in parts), key, out)
        o.closed = True
        o.parts = {}
        out.state_changed(self.name, key, o)

    def _out(
        self, emit: _Emit, ctx: dict[str, Any], t: float, ids: list[str], key: str, out: Output
    ) -> None:
        out.emit(
            BusinessEvent(
                id=event_id(self.site, self.name, emit.type, key, *ids),
                type=emit.type,
                subject=_subject(emit.subject(ctx), key),
                time=t,
                source=self.source,
                data=emit.data(ctx),
            )
        )
