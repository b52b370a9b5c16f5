"""Device profiles: one YAML file per equipment model, and the decoders compiled from them.

Owns: the profile models, loading them with located errors, and turning one raw device
payload into (fields, device time, message identity) or a ``PayloadError`` with a stable
reason. Pure: no I/O beyond reading profile files, no knowledge of business meaning.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from .config import (
    _LOADER,
    Model,
    Name,
    _checked_by_loader,
    _display_path,
    _locate,
    _plain,
    _require_mapping,
    _unknown,
    _where,
    read_yaml,
    validation_problems,
)
from .errors import ConfigError, ConfigProblem, PayloadError
from .profiles_modbus import ModbusProfile
from .profiles_opcua import OpcuaProfile

FieldType = Literal["string", "int", "float", "bool"]


class FieldSpec(Model):
    path: str = Field(description="Dotted path of the value in the JSON payload (a.b.0.c).")
    type: FieldType = Field(description="Expected JSON type; nothing is coerced.")
    required: bool = Field(True, description="A payload without it is malformed.")
    max_length: int = Field(256, ge=1, description="Longest accepted string.")
    min: float | None = Field(None, description="Smallest accepted number.")
    max: float | None = Field(None, description="Largest accepted number.")

    @model_validator(mode="after")
    def _range(self) -> FieldSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        if self.type in ("string", "bool") and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max apply to int and float fields, not {self.type}")
        return self


class TimeSpec(Model):
    field: str = Field(description="Dotted path of the device's own timestamp.")
    format: Literal["iso8601", "epoch_s", "epoch_ms"] = Field(
        "iso8601", description="How the timestamp is written."
    )


class MqttEventSpec(Model):
    topic: str = Field(description="Topic below the device's topic_base ('' = topic_base itself).")
    format: Literal["json"] = Field("json", description="Payload encoding.")
    max_payload_bytes: int = Field(16_384, ge=16, le=1_048_576, description="Larger is malformed.")
    id_fields: list[str] = Field(
        default_factory=list,
        description="Fields that identify one message (e.g. a sequence number), used with the "
        "device time to drop redeliveries; empty = the payload's hash.",
    )
    time: TimeSpec | None = Field(None, description="Device timestamp; absent = arrival time.")
    fields: dict[Name, FieldSpec] = Field(min_length=1, description="Fields decoded from the payload.")

    @model_validator(mode="after")
    def _id_fields_known(self, info: ValidationInfo) -> MqttEventSpec:
        if _checked_by_loader(info):
            return self  # load_profile reports these with the exact line
        for f in self.id_fields:
            if f not in self.fields:
                raise ValueError(f"id_fields names '{f}', which is not in fields")
        return self


class Profile(Model):
    """A device that speaks MQTT with JSON payloads (``protocol: mqtt``)."""

    version: int = Field(ge=1, description="Version of this profile file.")
    vendor: str = Field(description="Equipment vendor.")
    model: str = Field(description="Equipment model.")
    description: str = Field("", description="What the device is and does.")
    protocol: Literal["mqtt"] = Field(description="Protocol the device speaks.")
    events: dict[Name, MqttEventSpec] = Field(min_length=1, description="Events the device emits.")


AnyProfile = Profile | ModbusProfile | OpcuaProfile


def load_profile(path: Path) -> AnyProfile:
    """Load one profile file; every problem is located in that file (ConfigError)."""
    file = str(path)
    doc = read_yaml(path)
    _require_mapping(file, doc, "profile file")
    problems = _reference_problems(file, doc)
    model: type[Profile] | type[ModbusProfile] | type[OpcuaProfile] = {
        "modbus": ModbusProfile, "opcua": OpcuaProfile,
    }.get(doc.get("protocol"), Profile)
    try:
        profile = model.model_validate(_plain(doc), context={_LOADER: True})
    except ValidationError as exc:
        problems += validation_problems(file, doc, exc, model)
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: p.line or 0))
    return profile


def _reference_problems(file: str, doc: Any) -> list[ConfigProblem]:
    """id_fields must name decoded fields; checked on the raw file so that a bad field
    elsewhere in the same event does not hide it."""
    problems = []
    events = doc.get("events")
    for ev_name, ev in events.items() if isinstance(events, Mapping) else ():
        if not isinstance(ev, Mapping):
            continue
        fields = ev.get("fields")
        ids = ev.get("id_fields")
        if not isinstance(fields, Mapping) or not isinstance(ids, list):
            continue
        for j, f in enumerate(ids):
            if isinstance(f, str) and f not in fields:
                loc = ("events", ev_name, "id_fields", j)
                line, at = _locate(doc, loc)
                msg = _unknown("no field", f, map(str, fields), "fields")
                problems.append(ConfigProblem(file, line, f"{_where(doc, at)}: {msg}"))
    return problems


def load_profiles(
    directory: Path, wanted: Iterable[str] | None = None
) -> tuple[dict[str, AnyProfile], list[ConfigProblem]]:
    """Load the named profiles (all when ``wanted`` is None); return them and every problem."""
    profiles: dict[str, AnyProfile] = {}
    problems: list[ConfigProblem] = []
    if not directory.is_dir():
        return profiles, [ConfigProblem(str(directory), None, "profiles directory does not exist")]
    names = sorted(wanted) if wanted is not None else sorted(p.stem for p in directory.glob("*.yaml"))
    for name in names:
        path = _display_path(directory / f"{name}.yaml")  # not site/../device_profiles/x.yaml
        if not path.is_file():
            continue  # the caller reports the reference, with the line that makes it
        try:
            profiles[name] = load_profile(path)
        except ConfigError as exc:
            problems += exc.problems
    return profiles, problems


# --- decoding ------------------------------------------------------------------------------

MISSING = object()


def _getter(path: str) -> Callable[[Any], Any]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    if len(parts) == 1:
        key = parts[0]
        return lambda obj: obj.get(key, MISSING) if isinstance(obj, dict) else MISSING

    def get(obj: Any) -> Any:
        for p in parts:
            if isinstance(obj, dict):
                obj = obj.get(p, MISSING)
            elif isinstance(obj, list) and isinstance(p, int) and p < len(obj):
                obj = obj[p]
            else:
                return MISSING
            if obj is MISSING:
                return MISSING
        return obj

    return get


def _checker(name: str, spec: FieldSpec) -> Callable[[Any], Any]:
    """A function that returns the value if it fits the spec, else raises PayloadError."""
    t = spec.type
    lo, hi = spec.min, spec.max

    def wrong(v: Any) -> PayloadError:
        return PayloadError("wrong_type", f"{name}: expected {t}, got {type(v).__name__}")

    if t == "string":
        maxlen = spec.max_length

        def check(v: Any) -> Any:
            if type(v) is not str:
                raise wrong(v)
            if len(v) > maxlen:
                raise PayloadError("too_long", f"{name}: {len(v)} > {maxlen} characters")
            return v

    elif t == "bool":

        def check(v: Any) -> Any:
            if type(v) is not bool:
                raise wrong(v)
            return v

    else:
        allowed = (int,) if t == "int" else (int, float)

        def check(v: Any) -> Any:
            if type(v) not in allowed:
                raise wrong(v)
            if t == "float" and not math.isfinite(v):
                raise PayloadError("not_finite", f"{name}: {v}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise PayloadError("out_of_range", f"{name}: {v} not in [{lo}, {hi}]")
            return float(v) if t == "float" else v

    return check


def _time_parser(spec: TimeSpec) -> Callable[[Any], float]:
    if spec.format == "iso8601":

        def parse(v: Any) -> float:
            if type(v) is not str:
                raise PayloadError("bad_timestamp", f"{spec.field}: not a string")
            try:
                dt = datetime.fromisoformat(v)
            except ValueError:
                raise PayloadError("bad_timestamp", f"{spec.field}: {v[:40]!r}") from None
            if dt.tzinfo is None:
                raise PayloadError("bad_timestamp", f"{spec.field}: no time zone in {v[:40]!r}")
            return dt.timestamp()

    else:
        scale = 1000.0 if spec.format == "epoch_ms" else 1.0

        def parse(v: Any) -> float:
            if type(v) not in (int, float) or not math.isfinite(v):
                raise PayloadError("bad_timestamp", f"{spec.field}: not a number")
            return v / scale

    return parse


class Decoded:
    """One decoded device message."""

    __slots__ = ("fields", "time", "msg_key")

    def __init__(self, fields: dict[str, Any], time: float | None, msg_key: str):
        self.fields = fields
        self.time = time
        self.msg_key = msg_key


def compile_json_decoder(spec: MqttEventSpec) -> Callable[[bytes], Decoded]:
    """Build the decoder of one event's payloads. It raises PayloadError, never anything else.

    Reasons: oversized, not_utf8, not_json, not_object, missing_field, wrong_type, too_long,
    not_finite, out_of_range, bad_timestamp.
    """
    max_bytes = spec.max_payload_bytes
    plan = [
        (name, _getter(f.path), _checker(name, f), f.required) for name, f in spec.fields.items()
    ]
    time_get = _getter(spec.time.field) if spec.time else None
    time_parse = _time_parser(spec.time) if spec.time else None
    id_fields = list(spec.id_fields)
    loads = json.loads

    def decode(payload: bytes) -> Decoded:
        if len(payload) > max_bytes:
            raise PayloadError("oversized", f"{len(payload)} > {max_bytes} bytes")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("not_utf8") from None
        try:
            obj = loads(text)
        except (ValueError, RecursionError) as exc:
            raise PayloadError("not_json", str(exc)[:80]) from None
        if type(obj) is not dict:
            raise PayloadError("not_object", type(obj).__name__)
        fields: dict[str, Any] = {}
        for name, get, check, required in plan:
            v = get(obj)
            if v is MISSING or v is None:
                if required:
                    raise PayloadError("missing_field", name)
                fields[name] = None
                continue
            fields[name] = check(v)
        t = None
        if time_get is not None and time_parse is not None:
            tv = time_get(obj)
            if tv is MISSING:
                raise PayloadError("bad_timestamp", "missing")
            t = time_parse(tv)
        if id_fields:
            # With the device time: a counter that restarts at 0 after a power cycle must
            # not make new messages look like redeliveries of old ones.
            key = "|".join(str(fields[f]) for f in id_fields)
            if t is not None:
                key = f"{key}@{t!r}"
        else:
            key = hashlib.blake2b(payload, digest_size=12).hexdigest()
        return Decoded(fields, t, key)

    return decode


def dump_schema() -> str:
    """JSON Schema of the profile format (for editors and docs)."""
    return json.dumps(Profile.model_json_schema(), indent=2)
