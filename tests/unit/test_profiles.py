"""Device profiles: the shipped ones load, broken ones are located in their own file, and the
JSON decoder turns every malformed payload into a PayloadError with a stable reason."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.connectors.modbus_plan import plan
from edge_agent.errors import ConfigError, ConfigProblem, PayloadError
from edge_agent.profiles import (
    MqttEventSpec,
    Profile,
    compile_json_decoder,
    load_profile,
    load_profiles,
)
from edge_agent.profiles_modbus import ModbusProfile
from edge_agent.profiles_opcua import OpcuaProfile

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "device_profiles").glob("*.yaml"))


# --- loading -------------------------------------------------------------------------------


def test_there_are_shipped_profiles() -> None:
    assert {p.stem for p in SHIPPED} >= {"generic_json_scanner", "generic_json_checkweigher"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.events
    if isinstance(profile, ModbusProfile):
        requests = [r for reqs in plan(profile).values() for r in reqs]
        planned = {name for r in requests for name, *_ in r.items}
        assert planned == set(profile.signals)  # every signal is read, by some request
        return
    if isinstance(profile, OpcuaProfile):
        used = {s for e in profile.events.values() if e.trigger is not None  # else OPC UA events
                for s in [e.trigger.signal, *e.fields.values()]}
        assert used <= set(profile.signals)
        return
    assert isinstance(profile, Profile)
    for spec in profile.events.values():
        compile_json_decoder(spec)  # every event compiles to a decoder


def test_load_profiles_loads_the_whole_directory_without_problems() -> None:
    profiles, problems = load_profiles(REPO / "device_profiles")
    assert problems == []
    assert set(profiles) == {p.stem for p in SHIPPED}


def test_load_profiles_reports_a_missing_directory(tmp_path: Path) -> None:
    profiles, problems = load_profiles(tmp_path / "nope")
    assert profiles == {}
    assert [p.message for p in problems] == ["profiles directory does not exist"]


GOOD = """\
version: 1
vendor: Acme
model: S1
protocol: mqtt
events:
  read:
    topic: read
    id_fields: [seq]
    time: {field: ts, format: iso8601}
    fields:
      seq: {path: seq, type: int, min: 0}
      barcode: {path: barcode, type: string, max_length: 64}
"""


def broken(tmp_path: Path, text: str) -> list[ConfigProblem]:
    path = tmp_path / "acme.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert all(p.file == str(path) for p in info.value.problems)
    return info.value.problems


def line(text: str, snippet: str) -> int:
    [n] = [i for i, ln in enumerate(text.splitlines(), 1) if snippet in ln]
    return n


def test_good_profile_text_loads(tmp_path: Path) -> None:
    (tmp_path / "acme.yaml").write_text(GOOD)
    assert load_profile(tmp_path / "acme.yaml").events["read"].id_fields == ["seq"]


def test_profile_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    text = GOOD.replace("max_length: 64", "max_len: 64")
    [p] = broken(tmp_path, text)
    assert p.line == line(text, "max_len")
    assert p.message == (
        "events.read.fields.barcode: unknown key 'max_len' (did you mean 'max_length'?)"
    )


def test_profile_id_fields_names_an_unknown_field(tmp_path: Path) -> None:
    text = GOOD.replace("id_fields: [seq]", "id_fields: [sequence]")
    [p] = broken(tmp_path, text)
    assert p.line == line(text, "id_fields")
    assert p.message.startswith("events.read.id_fields[0]: no field 'sequence'")


def test_profile_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = (GOOD.replace("version: 1", "version: 0")
            .replace("id_fields: [seq]", "id_fields: [sequence]")
            .replace("format: iso8601", "format: iso")
            .replace("type: int, min: 0", "type: int, min: 10, max: 1"))
    found = broken(tmp_path, text)
    assert [p.line for p in found] == [
        line(text, "version"), line(text, "id_fields"), line(text, "format: iso"),
        line(text, "min: 10"),
    ]
    assert "version: must be at least 1 (got 0)" in found[0].message
    assert "must be one of 'iso8601', 'epoch_s' or 'epoch_ms' (got 'iso')" in found[2].message
    assert "events.read.fields.seq: min 10 is greater than max 1" in found[3].message


def test_profile_min_max_on_a_string_field(tmp_path: Path) -> None:
    text = GOOD.replace("max_length: 64}", "max_length: 64, max: 3}")
    [p] = broken(tmp_path, text)
    assert p.line == line(text, "barcode:")
    assert "min and max apply to int and float fields, not string" in p.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the profile file is empty"),
        ("- a\n", "the profile file must be a mapping of keys, not a list"),
        ("version: 1\nversion: 2\n", 'duplicate key "version"'),
    ],
)
def test_profile_file_that_is_not_a_profile(tmp_path: Path, text: str, message: str) -> None:
    [p] = broken(tmp_path, text)
    assert message in p.message
    assert p.line is not None


# --- decoding ------------------------------------------------------------------------------

SPEC: dict[str, Any] = {
    "topic": "read",
    "max_payload_bytes": 256,
    "id_fields": ["seq"],
    "time": {"field": "ts", "format": "iso8601"},
    "fields": {
        "seq": {"path": "seq", "type": "int", "min": 0},
        "barcode": {"path": "barcode", "type": "string", "max_length": 8},
        "weight_g": {"path": "m.weight_g", "type": "float", "min": 0, "max": 1000},
        "ok": {"path": "ok", "type": "bool", "required": False},
    },
}
GOOD_MSG: dict[str, Any] = {
    "seq": 17, "ts": "2026-11-22T10:00:00.123Z", "barcode": "C17", "m": {"weight_g": 12.5},
    "ok": True,
}


@pytest.fixture
def decode() -> Any:
    return compile_json_decoder(MqttEventSpec.model_validate(SPEC))


DROP = object()  # payload(field=DROP) leaves the field out


def payload(**changes: Any) -> bytes:
    msg = {**GOOD_MSG, **changes}
    return json.dumps({k: v for k, v in msg.items() if v is not DROP}).encode()


def test_decodes_a_good_payload(decode: Any) -> None:
    raw = payload()
    d = decode(raw)
    assert d.fields == {"seq": 17, "barcode": "C17", "weight_g": 12.5, "ok": True}
    assert type(d.fields["weight_g"]) is float
    t = datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC).timestamp()
    assert d.time == t
    assert d.msg_key == f"17@{t!r}"  # the id fields, with the device time


def test_optional_field_may_be_absent(decode: Any) -> None:
    assert decode(payload(ok=DROP)).fields["ok"] is None


def test_msg_key_without_id_fields_is_the_payload_hash() -> None:
    decode = compile_json_decoder(MqttEventSpec.model_validate({**SPEC, "id_fields": []}))
    raw = payload()
    assert decode(raw).msg_key == hashlib.blake2b(raw, digest_size=12).hexdigest()


def test_int_field_accepts_an_int_for_a_float_field(decode: Any) -> None:
    d = decode(payload(m={"weight_g": 12}))
    assert d.fields["weight_g"] == 12.0 and type(d.fields["weight_g"]) is float


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{" + b" " * 300 + b"}", "oversized"),
        (b'{"seq": 1, "barcode": "\xff"}', "not_utf8"),
        (b'{"seq": 1,', "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (b'"C17"', "not_object"),
        (payload(barcode=DROP), "missing_field"),
        (payload(barcode=None), "missing_field"),
        (payload(m={}), "missing_field"),
        (payload(m={"weight_g": "12.5"}), "wrong_type"),  # a string for a number
        (payload(seq=True), "wrong_type"),  # a bool for an int
        (payload(seq=1.5), "wrong_type"),  # a float for an int
        (payload(barcode=17), "wrong_type"),  # a number for a string
        (payload(ok="yes"), "wrong_type"),  # a string for a bool
        (payload(barcode="C" * 9), "too_long"),
        (payload(m={"weight_g": float("nan")}), "not_finite"),  # json.dumps writes NaN
        (b'{"seq": 1, "ts": "2026-11-22T10:00:00Z", "barcode": "C1", "m": {"weight_g": Infinity}}',
         "not_finite"),
        (payload(seq=-1), "out_of_range"),
        (payload(m={"weight_g": 1000.5}), "out_of_range"),
        (payload(ts="yesterday"), "bad_timestamp"),
        (payload(ts="2026-11-22T10:00:00.123"), "bad_timestamp"),  # no time zone
        (payload(ts=1795341600), "bad_timestamp"),  # a number for an iso8601 time
        (payload(ts=DROP), "bad_timestamp"),
    ],
)
def test_malformed_payloads_raise_payload_error_with_a_reason(
    decode: Any, raw: bytes, reason: str
) -> None:
    with pytest.raises(PayloadError) as info:
        decode(raw)
    assert info.value.reason == reason


def test_wrong_type_detail_names_the_field(decode: Any) -> None:
    with pytest.raises(PayloadError) as info:
        decode(payload(seq="17"))
    assert info.value.detail == "seq: expected int, got str"


def test_no_time_zone_detail(decode: Any) -> None:
    with pytest.raises(PayloadError) as info:
        decode(payload(ts="2026-11-22T10:00:00"))
    assert "no time zone" in info.value.detail


@pytest.mark.parametrize(
    ("fmt", "value", "expected"), [("epoch_s", 1.5, 1.5), ("epoch_ms", 1500, 1.5)]
)
def test_epoch_timestamps(fmt: str, value: float, expected: float) -> None:
    spec = {**SPEC, "time": {"field": "ts", "format": fmt}}
    decode = compile_json_decoder(MqttEventSpec.model_validate(spec))
    assert decode(payload(ts=value)).time == expected
    with pytest.raises(PayloadError) as info:
        decode(payload(ts="1500"))
    assert info.value.reason == "bad_timestamp"
