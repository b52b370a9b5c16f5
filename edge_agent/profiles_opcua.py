"""OPC UA device profiles: which nodes to watch, how, and which change makes an event.

Nodes are addressed by namespace *URI*, never by index (indexes change when a server is
reconfigured): either a NodeId ``nsu=<uri>;s=<id>`` (or ``i=``/``g=``/``b=``), or a
browse path from the Objects folder whose names carry a namespace alias
(``sorter:Sorter1/sorter:Induct/sorter:Count``). Both are resolved at every connect.
Events come from state, with the same trigger kinds as Modbus (``connectors/triggers.py``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from .config import Model, Name

NODE_RE = re.compile(r"^nsu=([^;]+);([isgb])=(.+)$")


class Deadband(Model):
    kind: Literal["absolute", "percent"] = Field(description="OPC UA deadband type.")
    value: float = Field(gt=0, description="Absolute units, or percent of the EU range.")


class OpcuaSignal(Model):
    node: str | None = Field(None, description="NodeId with namespace URI: nsu=<uri>;s=<id>.")
    path: str | None = Field(
        None, description="Browse path from Objects: alias:Name/alias:Name/... (aliases from "
        "`namespaces`)."
    )
    mode: Literal["subscribe", "poll"] = Field("subscribe", description="Monitored item or read.")
    sampling_interval_ms: float = Field(50, ge=0, description="Server-side sampling interval.")
    queue_size: int = Field(10, ge=1, le=10_000, description="Server-side queue per item.")
    discard_oldest: bool = Field(True, description="Queue overflow drops the oldest value.")
    deadband: Deadband | None = Field(None, description="Report only changes beyond this.")
    enum: dict[int, str] | None = Field(None, description="Raw value -> text.")

    @model_validator(mode="after")
    def _one_address(self) -> OpcuaSignal:
        if (self.node is None) == (self.path is None):
            raise ValueError("a signal needs exactly one of 'node' or 'path'")
        if self.node is not None and not NODE_RE.match(self.node):
            raise ValueError(f"node {self.node!r} is not nsu=<namespace uri>;s|i|g|b=<id>")
        return self


class OpcuaTrigger(Model):
    kind: Literal["counter", "change", "rising", "falling", "deadband"] = Field(
        description="counter: an event per increment (gaps reported); change: any new value; "
        "rising/falling: an edge; deadband: a change beyond `deadband`."
    )
    signal: Name = Field(description="The signal watched.")
    modulus: int = Field(2**32, ge=2, description="Counter wrap-around modulus.")
    deadband: float | None = Field(None, gt=0, description="For kind deadband.")


class OpcuaEvent(Model):
    trigger: OpcuaTrigger = Field(description="Which change makes an event.")
    fields: dict[Name, Name] = Field(description="Event field -> signal read with it.")


class OpcuaAlarm(Model):
    source: str = Field(description="Notifier node: nsu=<uri>;s=<id>, or a browse path like signals.")
    fields: dict[Name, str] = Field(
        default_factory=lambda: {"message": "Message", "severity": "Severity"},
        description="Event field -> property of the OPC UA event (Message, Severity, SourceName, ...).",
    )


class OpcuaProfile(Model):
    version: int = Field(ge=1, description="Version of this profile file.")
    vendor: str = Field(description="Equipment vendor.")
    model: str = Field(description="Equipment model.")
    description: str = Field("", description="What the device is and does.")
    protocol: Literal["opcua"] = Field(description="Protocol the device speaks.")
    namespaces: dict[Name, str] = Field(
        default_factory=dict, description="Alias -> namespace URI, for browse paths."
    )
    publishing_interval_ms: float = Field(100, ge=10, description="Subscription publishing interval.")
    poll_interval_ms: float = Field(1000, ge=10, description="Interval of mode: poll signals.")
    items_per_call: int = Field(500, ge=1, le=10_000, description="Monitored items created per call.")
    signals: dict[Name, OpcuaSignal] = Field(min_length=1, description="Signals by name.")
    events: dict[Name, OpcuaEvent] = Field(default_factory=dict, description="Events.")
    alarms: dict[Name, OpcuaAlarm] = Field(
        default_factory=dict, description="OPC UA events (alarms, AutoID reads) as device events."
    )

    @model_validator(mode="after")
    def _references(self) -> OpcuaProfile:
        for name, s in self.signals.items():
            for part in (s.path or "").split("/") if s.path else ():
                alias = part.split(":", 1)[0] if ":" in part else None
                if alias is None or (alias not in self.namespaces and not alias.isdigit()):
                    raise ValueError(
                        f"signal '{name}': path element {part!r} needs a namespace alias "
                        f"(one of {sorted(self.namespaces)}) or 0:"
                    )
        for name, e in self.events.items():
            for sig in [e.trigger.signal, *e.fields.values()]:
                if sig not in self.signals:
                    raise ValueError(f"event '{name}': unknown signal '{sig}'")
            if e.trigger.kind == "deadband" and e.trigger.deadband is None:
                raise ValueError(f"event '{name}': a deadband trigger needs 'deadband'")
        return self
