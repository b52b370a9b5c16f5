"""Modbus profile keys for device-event identity and time: defaults and validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from edge_agent.connectors.modbus import identity_signals
from edge_agent.profiles_modbus import ModbusProfile

SIGNALS = {
    "flag": {"table": "coil", "address": 0, "type": "bool"},
    "seq": {"table": "holding_register", "address": 0, "type": "uint16"},
    "qty": {"table": "holding_register", "address": 1, "type": "uint16"},
    "t": {"table": "holding_register", "address": 2, "type": "uint64", "scale": 0.001},
}


def profile(event: dict[str, Any]) -> ModbusProfile:
    return ModbusProfile.model_validate({
        "version": 1, "vendor": "Acme", "model": "T", "protocol": "modbus",
        "signals": SIGNALS, "events": {"e": event},
    })


def test_default_identity_of_a_handshake_is_sequence_time_and_data():
    p = profile({"trigger": {"kind": "handshake", "signal": "flag", "sequence": "seq"},
                 "fields": {"picked": "qty"}, "time": "t"})
    assert identity_signals(p.events["e"]) == ["seq", "t", "qty"]
    p = profile({"trigger": {"kind": "handshake", "signal": "flag"}, "fields": ["qty"]})
    assert identity_signals(p.events["e"]) == ["qty"]


def test_default_identity_of_a_counter_is_the_counter_and_data():
    p = profile({"trigger": {"kind": "counter", "signal": "seq"}, "fields": ["seq", "qty"]})
    assert identity_signals(p.events["e"]) == ["seq", "qty"]


def test_identity_named_in_the_profile_wins():
    p = profile({"trigger": {"kind": "handshake", "signal": "flag", "sequence": "seq"},
                 "fields": ["qty"], "identity": ["seq"]})
    assert identity_signals(p.events["e"]) == ["seq"]


@pytest.mark.parametrize("event, message", [
    ({"trigger": {"kind": "counter", "signal": "seq"}, "fields": [], "identity": ["nope"]},
     "identity names unknown signal 'nope'"),
    ({"trigger": {"kind": "counter", "signal": "seq"}, "fields": [], "time": "nope"},
     "time names unknown signal 'nope'"),
    ({"trigger": {"kind": "handshake", "signal": "flag", "sequence": "nope"}, "fields": []},
     "sequence names unknown signal 'nope'"),
    ({"trigger": {"kind": "rising", "signal": "flag", "sequence": "seq"}, "fields": []},
     "'sequence' is only for handshake triggers"),
])
def test_references_are_checked(event: dict[str, Any], message: str):
    with pytest.raises(ValidationError, match=message):
        profile(event)
