"""What every rule kind implements, and the output it writes into.

A rule is deterministic: given the same state and the same sequence of device events and
clock readings it emits the same business events with the same ids. It never does I/O and
never reads the time itself; the engine passes ``now`` in. Its state is a mapping of
business key -> JSON-able value that the engine persists with every group commit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..events import BusinessEvent, DeviceEvent, iso_time


class Output(Protocol):
    """Where rules put what they produce (the engine's current group-commit batch)."""

    def emit(self, ev: BusinessEvent) -> None: ...

    def state_changed(self, rule: str, key: str, value: Any | None) -> None:
        """``value`` None deletes the key; else JSON-able, or an object with ``to_json()``
        that the outbox calls once at commit (so state may change until then)."""
        ...


class Rule(Protocol):
    name: str
    lateness: float  # how far behind the inputs' progress the watermark stays
    watermark: float
    driven: bool  # set by the engine: it calls advance(); standing alone a rule advances itself

    def inputs(self) -> list[tuple[str, str, str]]:
        """(device id, profile event name, input name) triples this rule consumes."""
        ...

    def on_event(self, ev: DeviceEvent, input_name: str, out: Output) -> None: ...

    def on_tick(self, now: float, out: Output) -> None:
        """Called periodically with the wall-clock time: housekeeping only (persisting the
        watermark); never decides on the wall clock that something did not happen."""
        ...

    def advance(self, watermark: float, out: Output) -> None:
        """Event time has surely reached ``watermark`` for every input: close what ended."""
        ...

    def load_state(self, items: Mapping[str, Any]) -> None:
        """Restore state persisted by earlier ``state_changed`` calls (at start)."""
        ...

    def open_keys(self) -> int: ...


def input_triples(inputs: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(device, event, input name) for each input spec, expanding device and event lists."""
    out = []
    for name, spec in inputs.items():
        devices = [spec.device] if isinstance(spec.device, str) else spec.device
        events = [spec.event] if isinstance(spec.event, str) else spec.event
        out += [(d, e, name) for d in devices for e in events]
    return out


# --- templates -----------------------------------------------------------------------------

REF_RE = re.compile(r"\$\{([^}]*)\}")

Context = Mapping[str, Any]  # "key", "rule", "reason", "missing", "site" and input name -> part
Getter = Callable[[Context], Any]


def _ref_getter(ref: str) -> Getter:
    inp, dot, fld = ref.partition(".")
    if not dot:
        return lambda ctx: ctx.get(inp)
    if fld == "time":
        return lambda ctx: iso_time(ctx[inp].time) if ctx.get(inp) is not None else None
    if fld == "device":
        return lambda ctx: ctx[inp].device if ctx.get(inp) is not None else None

    def get(ctx: Context) -> Any:
        part = ctx.get(inp)
        return None if part is None else part.fields.get(fld)

    return get


def compile_template(value: Any) -> Getter:
    """'${a.b}' alone keeps the referenced value's type; mixed text interpolates; else literal."""
    if not isinstance(value, str) or "${" not in value:
        return lambda ctx: value
    refs = REF_RE.findall(value)
    if len(refs) == 1 and value == "${" + refs[0] + "}":
        return _ref_getter(refs[0])
    getters = {r: _ref_getter(r) for r in refs}

    def render(ctx: Context) -> str:
        return REF_RE.sub(lambda m: "" if (v := getters[m.group(1)](ctx)) is None else str(v), value)

    return render


def compile_data(data: Mapping[str, Any]) -> Callable[[Context], dict[str, Any]]:
    items = [(k, compile_template(v)) for k, v in data.items()]
    return lambda ctx: {k: g(ctx) for k, g in items}
