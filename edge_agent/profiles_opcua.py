"""OPC UA device profiles: which nodes to watch, how, and which change makes an event.

Nodes are addressed by namespace *URI*, never by index (indexes change when a server is
reconfigured): either a NodeId ``nsu=<uri>;s=<id>`` (or ``i=``/``g=``/``b=``), or a
browse path from the Objects folder whose names carry a namespace alias
(``sorter:Sorter1/sorter:Induct/sorter:Count``). Both are resolved at every connect.
An event comes either from state (a ``trigger`` on a signal, with the same kinds as Modbus,
``connectors/triggers.py``, and ``fields`` read from other signals) or from an OPC UA event
(``opcua_event``: a notifier and an event type whose properties are the fields), the
consistent form when a server has one. How the fields of a trigger are bound, and why an
OPC UA event is preferred, is in ``connectors/opcua.py``.

Defaults are chosen not to lose data on a well-behaved server: sampling interval 0
(exception-based: the server reports every change, or samples as fast as it can), a queue
of 1000 notifications per monitored item (about 10 s of changes at 100 per second per
item; a publishing interval of 100 ms needs only 10, so a client or network stalled for
seconds still loses nothing) with ``discard_oldest: false`` (an overflowing queue keeps the
earliest notifications and puts the newest value in its last slot, flagged Overflow: the
loss is one contiguous hole that the connector reports, never a silent reordering), and
the DataChangeTrigger StatusValueTimestamp (a value rewritten with a new timestamp is
reported, so a field written again with the same value still counts for its step).
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
    sampling_interval_ms: float = Field(
        0, ge=0, description="Server-side sampling interval; 0 (default): exception-based, every "
        "change reported (or the fastest the server samples). A sampled server can skip values."
    )
    queue_size: int = Field(
        1000, ge=1, le=100_000, description="Server-side queue per item (default 1000: seconds "
        "of changes at a high rate, many publishing intervals); servers may revise it down."
    )
    discard_oldest: bool = Field(
        False, description="Queue overflow: false (default) keeps the earliest values and puts "
        "the newest in the last slot (one reported hole); true drops the oldest."
    )
    trigger_on_timestamp: bool = Field(
        True, description="DataChangeTrigger StatusValueTimestamp (default): a rewrite of the "
        "same value with a new SourceTimestamp is reported too; false: StatusValue."
    )
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


class OpcuaEventSource(Model):
    notifier: str = Field(description="Notifier node that emits the events: nsu=<uri>;s=<id>, or "
                          "a browse path like signals.")
    type: str = Field(
        "nsu=http://opcfoundation.org/UA/;i=2041",
        description="Event type node (nsu=<uri>;s|i=<id>); only events of this type (and its "
        "subtypes) are taken. Default BaseEventType: every event of the notifier.",
    )
    sequence: str | None = Field(
        None, description="Property holding a counter incremented per event: it identifies "
        "the event and a jump is reported as a counter gap. Else the EventId identifies it."
    )
    modulus: int = Field(2**32, ge=2, description="Wrap-around modulus of `sequence`.")
    queue_size: int = Field(10_000, ge=1, le=100_000, description="Server-side event queue.")

    @model_validator(mode="after")
    def _type_address(self) -> OpcuaEventSource:
        if not NODE_RE.match(self.type):
            raise ValueError(f"type {self.type!r} is not nsu=<namespace uri>;s|i|g|b=<id>")
        return self


class OpcuaEvent(Model):
    trigger: OpcuaTrigger | None = Field(
        None, description="Which change of a signal makes an event (or `opcua_event`)."
    )
    opcua_event: OpcuaEventSource | None = Field(
        None, description="Take the event from OPC UA events of this notifier and type: all "
        "fields come in one notification, consistent by construction."
    )
    fields: dict[Name, str] = Field(
        default_factory=dict, description="Event field -> signal (with `trigger`) or event "
        "property (with `opcua_event`, e.g. TrackingId, Message, Severity).",
    )
    fields_from: Literal["notifications", "read"] = Field(
        "notifications", description="With `trigger`: notifications (default) binds each "
        "trigger notification to the field notifications in queue order and reports an "
        "ambiguous binding as inconsistent_snapshot; read: one Read of the field nodes when "
        "the trigger fires (inconsistent_snapshot if the trigger moved on meanwhile)."
    )
    enums: dict[Name, dict[int, str]] = Field(
        default_factory=dict, description="Event field -> (raw value -> text), for "
        "`opcua_event` fields (signals have their own `enum`)."
    )

    @property
    def kind(self) -> str:
        """The trigger's kind; an OPC UA event with a `sequence` reports what it missed like
        a counter ("counter"), one without cannot ("event")."""
        if self.trigger is not None:
            return self.trigger.kind
        return "counter" if self.opcua_event is not None and self.opcua_event.sequence else "event"

    @model_validator(mode="after")
    def _one_source(self) -> OpcuaEvent:
        if (self.trigger is None) == (self.opcua_event is None):
            raise ValueError("an event needs exactly one of 'trigger' or 'opcua_event'")
        return self


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
            if e.trigger is None:
                continue
            for sig in [e.trigger.signal, *e.fields.values()]:
                if sig not in self.signals:
                    raise ValueError(f"event '{name}': unknown signal '{sig}'")
            if e.trigger.kind == "deadband" and e.trigger.deadband is None:
                raise ValueError(f"event '{name}': a deadband trigger needs 'deadband'")
        return self
