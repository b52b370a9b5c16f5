"""Modbus device profiles: register maps, poll groups, and which change makes an event.

A profile names every *signal* of an equipment model (table, address, data type, byte and
word order, scale/offset, unit, enum table, poll group) and every *event*: a trigger on
one signal (a counter that advances, a new-data handshake bit, an edge, a change beyond a
deadband) and the signals read with it as the event's fields. Pure models; the codecs are
in ``codecs.py``, the read planner in ``connectors/modbus_plan.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .config import Model, Name

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
DataType = Literal[
    "bool", "bit", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64", "string",
]
ByteOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]

BIT_TABLES = ("coil", "discrete_input")
REGISTERS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4,
             "float32": 2, "float64": 4, "bit": 1}


class Signal(Model):
    table: Table = Field(description="Modbus table the signal is in.")
    address: int = Field(ge=0, le=65536, description="Address, 0- or 1-based per the profile.")
    type: DataType = Field(description="Data type; bool is a coil/discrete input, bit is one "
                           "bit of a register.")
    bit: int | None = Field(None, ge=0, le=15, description="Bit number (0 = least significant), "
                            "for type bit.")
    length: int | None = Field(None, ge=1, le=125, description="Registers, for type string.")
    order: ByteOrder | None = Field(None, description="Byte/word order of multi-register "
                                    "values; default the profile's byte_order. ABCD is big "
                                    "endian, DCBA little endian, BADC byte-swapped, CDAB "
                                    "word-swapped.")
    scale: float = Field(1.0, description="value = raw * scale + offset.")
    offset: float = Field(0.0, description="See scale.")
    unit: str = Field("", description="Engineering unit, for documentation and field names.")
    enum: dict[int, str] | None = Field(None, description="Raw value -> text (e.g. fault codes).")
    group: Name = Field("default", description="Poll group this signal is read in.")

    @model_validator(mode="after")
    def _shape(self) -> Signal:
        bits = self.table in BIT_TABLES
        if bits and self.type != "bool":
            raise ValueError(f"a {self.table} holds one bit: type must be bool")
        if not bits and self.type == "bool":
            raise ValueError("type bool is for coils and discrete inputs; use bit for a register bit")
        if (self.type == "bit") != (self.bit is not None):
            raise ValueError("'bit' is required for type bit, and only for it")
        if (self.type == "string") != (self.length is not None):
            raise ValueError("'length' (registers) is required for type string, and only for it")
        return self

    def registers(self) -> int:
        """How many registers (or bits, for bit tables) the signal spans."""
        if self.table in BIT_TABLES:
            return 1
        return self.length if self.type == "string" else REGISTERS[self.type]  # type: ignore[return-value]


class PollGroup(Model):
    interval_ms: int = Field(ge=10, le=3_600_000, description="How often the group is read.")


class Ack(Model):
    table: Literal["coil", "holding_register"] = Field(description="Where to write the ack.")
    address: int = Field(ge=0, le=65536, description="Address (profile addressing).")
    value: int = Field(1, ge=0, le=65535, description="Value written once the event is durable.")


class Trigger(Model):
    kind: Literal["counter", "handshake", "rising", "falling", "deadband"] = Field(
        description="counter: an event per increment (gaps reported); handshake: new-data bit "
        "set (ack written back after commit when asked); rising/falling: an edge of a "
        "bool; deadband: a change of more than `deadband` since the last event."
    )
    signal: Name = Field(description="The signal watched.")
    modulus: int | None = Field(None, ge=2, description="Counter wrap-around modulus; default "
                                "2^bits of its type.")
    deadband: float | None = Field(None, gt=0, description="For kind deadband.")
    ack: Ack | None = Field(None, description="For kind handshake: the acknowledge to write.")
    sequence: Name | None = Field(
        None, description="For kind handshake: a signal the device advances with every new "
        "data it flags (a key-press sequence). A changed sequence with the flag still set is "
        "new data, so a second press before the flag was seen cleared is not missed; it is "
        "also part of the event's identity.")


class ModbusEvent(Model):
    trigger: Trigger = Field(description="Which change makes an event.")
    fields: list[Name] | dict[Name, Name] = Field(
        description="Signals read with it, as the event's fields: a list of signal names, or "
        "event field -> signal (so the events of several positions share field names).")
    constants: dict[Name, Any] = Field(default_factory=dict,
                                       description="Literal fields added to every event "
                                       "(e.g. a pick position).")
    identity: list[Name] | None = Field(
        None, description="Signals whose values identify one occurrence of the event (e.g. "
        "[press_seq] or [seq, weigh_time]): the same occurrence read again, after a failed "
        "acknowledge or an agent restart, gets the same id and is dropped as a duplicate. "
        "Default: the trigger's sequence (handshake) or the counter (counter), the `time` "
        "signal, then the event's field values. Never a poll count or the agent's clock.")
    time: Name | None = Field(
        None, description="Signal holding the device's own time of the event, in epoch "
        "seconds after scale (an epoch-ms register: scale 0.001); 0 or absent means the "
        "poll's time.")

    def signal_map(self) -> dict[str, str]:
        """Event field -> signal."""
        if isinstance(self.fields, dict):
            return dict(self.fields)
        return {f: f for f in self.fields}


class ModbusProfile(Model):
    version: int = Field(ge=1, description="Version of this profile file.")
    vendor: str = Field(description="Equipment vendor.")
    model: str = Field(description="Equipment model.")
    description: str = Field("", description="What the device is and does.")
    protocol: Literal["modbus"] = Field(description="Protocol the device speaks.")
    addressing: Literal[0, 1] = Field(0, description="Whether addresses in this file are 0- "
                                      "(protocol) or 1-based (most manuals).")
    byte_order: ByteOrder = Field("ABCD", description="Default order of multi-register values.")
    max_registers_per_read: int = Field(125, ge=1, le=125, description="Device's own limit.")
    max_bits_per_read: int = Field(2000, ge=1, le=2000, description="Device's own limit.")
    poll_groups: dict[Name, PollGroup] = Field(
        default_factory=lambda: {"default": PollGroup(interval_ms=100)},
        description="Poll groups by name.")
    signals: dict[Name, Signal] = Field(min_length=1, description="Signals by name.")
    events: dict[Name, ModbusEvent] = Field(default_factory=dict, description="Events.")

    @model_validator(mode="after")
    def _references(self) -> ModbusProfile:
        for name, s in self.signals.items():
            if s.group not in self.poll_groups:
                raise ValueError(f"signal '{name}' is in unknown poll group '{s.group}'")
            if self.addressing == 1 and s.address == 0:
                raise ValueError(f"signal '{name}': address 0 in a 1-based profile")
        for name, e in self.events.items():
            if e.trigger.signal not in self.signals:
                raise ValueError(f"event '{name}': trigger names unknown signal '{e.trigger.signal}'")
            for f in e.signal_map().values():
                if f not in self.signals:
                    raise ValueError(f"event '{name}': field '{f}' is not a signal")
            t = e.trigger
            for what, names in (("identity", e.identity or ()), ("time", [e.time] if e.time else ()),
                                ("sequence", [t.sequence] if t.sequence else ())):
                for n in names:
                    if n not in self.signals:
                        raise ValueError(f"event '{name}': {what} names unknown signal '{n}'")
            if t.sequence is not None and t.kind != "handshake":
                raise ValueError(f"event '{name}': 'sequence' is only for handshake triggers")
            if t.kind == "deadband" and t.deadband is None:
                raise ValueError(f"event '{name}': a deadband trigger needs 'deadband'")
            if t.ack is not None and t.kind != "handshake":
                raise ValueError(f"event '{name}': 'ack' is only for handshake triggers")
        return self
