"""Events from state: decides, value by value, when a watched signal makes a device event.

Shared by the connectors that read *state* rather than receive messages (Modbus polls,
OPC UA subscriptions). Pure: no I/O, no clock. Kinds:

- counter: an event per increment; wraps at ``modulus``; a step of more than one means
  events were missed, reported as ``missed`` (never silently absorbed);
- handshake: a new-data flag; an event when it is set, none again until it has been *seen*
  cleared (the acknowledge is written by the connector after the commit; writing it does
  not re-arm: the device may show the flag for a while after it). With a ``seq`` (a
  sequence the device advances per new data) a changed sequence while the flag is still set
  is new data too, so a second press before the clear was seen is not missed;
- rising / falling: an edge of a boolean;
- deadband: a change of more than ``deadband`` since the last event;
- change: any change of value.

The first value seen only sets the baseline (after a reconnect too), so a server or device
re-sending its current state is never taken for a new event.
"""

from __future__ import annotations

from typing import Any


class Watch:
    __slots__ = ("kind", "modulus", "deadband", "last", "armed", "missed_total", "seq")

    def __init__(self, kind: str, *, modulus: int = 65536, deadband: float | None = None):
        self.kind = kind
        self.modulus = modulus
        self.deadband = deadband
        self.last: Any = None  # last value seen (deadband: last value that made an event)
        self.armed = True  # handshake: ready for the next set flag
        self.missed_total = 0
        self.seq: Any = None  # handshake: the sequence of the last event made

    def observe(self, v: Any, seq: Any = None) -> tuple[bool, int]:
        """(make an event?, events missed before this one). ``seq``: handshake sequence."""
        last = self.last
        kind = self.kind
        if kind == "handshake":
            self.last = v
            if not v:
                self.armed = True
                return False, 0
            if not self.armed and (seq is None or seq == self.seq):
                return False, 0  # the same data, not yet seen cleared
            self.armed = False
            self.seq = seq
            return True, 0
        if kind == "deadband":
            if last is None or abs(float(v) - float(last)) > (self.deadband or 0):
                self.last = v
                return last is not None, 0
            return False, 0
        self.last = v
        if last is None:
            return False, 0
        if kind == "counter":
            if v == last:
                return False, 0
            step = (int(v) - int(last)) % self.modulus
            missed = max(step - 1, 0)
            self.missed_total += missed
            return True, missed
        if kind == "rising":
            return bool(v and not last), 0
        if kind == "falling":
            return bool(last and not v), 0
        return v != last, 0  # change
