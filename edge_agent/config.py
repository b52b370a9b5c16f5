"""Site configuration: the typed, closed models of the site file and how it is loaded.

Owns: parsing YAML with line numbers, validating into pydantic models, cross-checking
references (profiles, devices, brokers, sinks), and reporting *every* problem at once as
``file:line: message``. Connects to nothing. Device profiles live in ``profiles.py``.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLWarning

from .errors import ConfigError, ConfigProblem

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_RE)]


class Model(BaseModel):
    """Base of every config model: closed (unknown keys are errors) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- brokers -------------------------------------------------------------------------------


class BrokerConfig(Model):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: str | None = Field(
        None,
        description="MQTT client id prefix; default edge-agent-<site>. Must be stable: the "
        "persistent session that holds unacknowledged device messages is keyed on it.",
    )
    keepalive_secs: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    session_expiry_secs: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="How long the broker keeps our session and queued messages while we are away.",
    )
    username: str | None = Field(None, description="User name for the broker.")
    password_file: Path | None = Field(None, description="File holding the broker password.")
    connect_timeout_secs: float = Field(10.0, gt=0, description="Timeout of one connect attempt.")
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Most unacknowledged QoS 1 messages the agent holds: sent to MQTT 5 brokers "
        "as Receive Maximum, and enforced by the agent itself (it stops reading) for 3.1.1; "
        "this bounds the agent's input queue.",
    )


# --- devices -------------------------------------------------------------------------------


class MqttConnection(Model):
    kind: Literal["mqtt"] = Field(description="Connection kind.")
    broker: Name = Field(description="Name of a broker in `brokers`.")
    topic_base: str = Field(
        min_length=1, description="Topic prefix of this device; profiles name topics below it."
    )
    qos: Literal[0, 1] = Field(1, description="Subscription QoS; 1 for no loss.")

    @field_validator("topic_base")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if any(c in v for c in "+#") or v.endswith("/"):
            raise ValueError("must be a plain topic, without '+', '#' or a trailing '/'")
        return v


class ModbusConnection(Model):
    kind: Literal["modbus"] = Field(description="Connection kind.")
    host: str = Field(description="Device (or serial gateway) host name or address.")
    port: int = Field(502, ge=1, le=65535, description="Modbus TCP port.")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave) id.")
    framing: Literal["tcp", "rtu_over_tcp"] = Field(
        "tcp", description="tcp (MBAP), or rtu_over_tcp for serial gateways that pass RTU frames."
    )
    timeout_ms: int = Field(1000, ge=10, le=60_000, description="Timeout of one request.")
    max_registers_per_read: int | None = Field(
        None, ge=1, le=125, description="Override of the profile's limit for this device."
    )
    max_gap: int = Field(
        8, ge=0, le=120, description="Unused registers/bits worth reading through to save a request."
    )
    degraded_after_failures: int = Field(1, ge=1, description="Failed polls before degraded.")
    offline_after_failures: int = Field(
        3, ge=1, description="Failed polls in a row before offline (reconnect with backoff)."
    )


class OpcuaConnection(Model):
    kind: Literal["opcua"] = Field(description="Connection kind.")
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="Server endpoint URL.")
    timeout_secs: float = Field(4.0, gt=0, le=120, description="Timeout of one request.")
    keepalive_secs: float = Field(
        1.0, gt=0, le=60, description="How often the session is probed; a dead one is noticed "
        "within about this (plus the request timeout)."
    )
    username: str | None = Field(None, description="User name token (else anonymous).")
    password_file: Path | None = Field(None, description="File holding the password.")
    security_policy: Literal[
        "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"
    ] = Field("None", description="OPC UA security policy of the secure channel.")
    security_mode: Literal["Sign", "SignAndEncrypt"] = Field(
        "SignAndEncrypt", description="Message security mode (with a policy other than None)."
    )
    certificate_dir: Path = Field(
        Path("pki"), description="Where the agent's application certificate and key live "
        "(generated on first start when missing; relative to the site file)."
    )
    server_certificate: Path | None = Field(
        None, description="The trusted server certificate (DER or PEM): anything else is refused."
    )
    server_fingerprint: str | None = Field(
        None, description="Pinned SHA-256 fingerprint of the server certificate (hex, ':' allowed)."
    )
    trust_any_server_certificate: bool = Field(
        False, description="Accept whatever certificate the server presents. Only for tests."
    )
    user_certificate: Path | None = Field(
        None, description="Certificate user token (X509), with user_private_key; instead of "
        "a user name."
    )
    user_private_key: Path | None = Field(None, description="Private key of user_certificate.")
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=8192, le=1 << 30,
        description="Largest OPC UA message accepted from the server (announced in HELLO).",
    )

    @model_validator(mode="after")
    def _trust_is_explicit(self) -> OpcuaConnection:
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("user_certificate and user_private_key go together")
        if self.user_certificate is not None and self.username:
            raise ValueError("use either a user name or a user certificate, not both")
        if self.security_policy != "None" and not (
            self.server_certificate or self.server_fingerprint or self.trust_any_server_certificate
        ):
            raise ValueError(
                "a secure connection needs server_certificate or server_fingerprint (or, "
                "explicitly, trust_any_server_certificate: true)"
            )
        return self


Connection = Annotated[
    MqttConnection | ModbusConnection | OpcuaConnection, Field(discriminator="kind")
]


class DeviceConfig(Model):
    profile: Name = Field(description="Name of the device profile (file in device_profiles/).")
    connection: Connection = Field(description="How to reach the device.")
    description: str = Field("", description="Free text for operators.")


# --- rules ---------------------------------------------------------------------------------

Template = Any  # str with ${input.field} references, or a literal JSON value


EVENT_TYPE_RE = r"^[a-z][a-z0-9_]{0,63}$"


class EmitSpec(Model):
    type: Annotated[str, Field(pattern=EVENT_TYPE_RE)] = Field(
        description="Business event type emitted."
    )
    subject: str = Field(
        "${key}", description="Subject of the event (its business key); a template."
    )
    data: dict[str, Template] = Field(
        default_factory=dict,
        description="Event data: field -> template. '${input.field}' copies a device field "
        "(keeping its type); '${key}', '${rule}', '${reason}', '${missing}' are also known; "
        "other values are literals.",
    )


class Condition(Model):
    field: str = Field(description="Field of the input to test.")
    in_: list[Any] | None = Field(None, alias="in", description="True if the value is one of these.")
    equals: Any = Field(None, description="True if the value equals this.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        if (self.in_ is None) == (self.equals is None):
            raise ValueError("a condition needs exactly one of 'in' or 'equals'")
        return self


class InputSpec(Model):
    device: Name | list[Name] = Field(description="Device id (or list) this input comes from.")
    event: Name | list[Name] = Field(
        description="Event name in the device's profile (or a list, for a map rule that "
        "treats several alike events the same)."
    )


class TerminateSpec(Model):
    input: Name = Field(description="Input whose arrival is tested.")
    when: Condition = Field(description="Condition on that input's fields.")
    emit: EmitSpec = Field(
        description="Event emitted at once instead; the key is then closed for the window, "
        "so the other inputs of the same key are absorbed."
    )


class TimeoutSpec(Model):
    type: Annotated[str, Field(pattern=EVENT_TYPE_RE)] = Field(
        description="Exception event type emitted when the window closes incomplete."
    )
    subject: str = Field("${key}", description="Subject template.")
    reasons: dict[Name, str] = Field(
        default_factory=dict,
        description="Missing input -> reason text, available as ${reason}; several missing "
        "inputs give their reasons joined by ','.",
    )
    data: dict[str, Template] = Field(default_factory=dict, description="Event data templates.")


class CorrelateRule(Model):
    kind: Literal["correlate"] = Field(description="Rule kind.")
    name: Name = Field(description="Rule name; part of every event id and `source`.")
    key: str = Field(min_length=1, description="Field every input carries and is joined on.")
    inputs: dict[Name, InputSpec] = Field(
        min_length=1, description="Named inputs that together make one business event."
    )
    window_secs: float = Field(5.0, gt=0, le=86400, description="How long to wait for all inputs.")
    allowed_lateness_secs: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="Extra wait for messages that arrive out of order across devices.",
    )
    emit: EmitSpec | None = Field(
        None, description="Event emitted when every input arrived in the window (none: only "
        "the timeout matters, e.g. a confirmation that must come)."
    )
    on_timeout: TimeoutSpec | None = Field(
        None, description="Exception emitted when the window closes without every input."
    )
    terminate_on: list[TerminateSpec] = Field(
        default_factory=list,
        description="Inputs that end the correlation at once with another event (e.g. no-read).",
    )

    @model_validator(mode="after")
    def _inputs_known(self, info: ValidationInfo) -> CorrelateRule:
        if _checked_by_loader(info):
            return self  # load_site reports these with the exact line
        for t in self.terminate_on:
            if t.input not in self.inputs:
                raise ValueError(f"terminate_on names unknown input {t.input!r}")
        if self.on_timeout:
            for name in self.on_timeout.reasons:
                if name not in self.inputs:
                    raise ValueError(f"on_timeout.reasons names unknown input {name!r}")
        return self


class MapRule(Model):
    kind: Literal["map"] = Field(description="Rule kind.")
    name: Name = Field(description="Rule name; part of every event id and `source`.")
    inputs: dict[Name, InputSpec] = Field(
        min_length=1, max_length=1,
        description="The one input whose every device event becomes a business event.",
    )
    when: Condition | None = Field(None, description="Only device events that match.")
    emit: EmitSpec = Field(description="The business event emitted for each device event.")


class CountRule(Model):
    kind: Literal["count"] = Field(description="Rule kind.")
    name: Name = Field(description="Rule name; part of every event id and `source`.")
    key: str = Field(min_length=1, description="Field the events are counted by.")
    inputs: dict[Name, InputSpec] = Field(
        min_length=1, max_length=1, description="The one input whose events are counted."
    )
    when: Condition | None = Field(None, description="Only device events that match count.")
    threshold: int = Field(ge=2, le=1000, description="Emit when this many have come for a key.")
    window_secs: float = Field(
        300, gt=0, le=86400, description="Counted from the first event of a key."
    )
    emit: EmitSpec = Field(description="Event emitted once when the threshold is reached.")


RuleConfig = Annotated[CorrelateRule | MapRule | CountRule, Field(discriminator="kind")]


# --- sinks ---------------------------------------------------------------------------------


class RetryConfig(Model):
    initial_backoff_ms: int = Field(500, ge=1, description="First retry delay.")
    max_backoff_ms: int = Field(60_000, ge=1, description="Cap of the retry delay.")
    max_retry_after_secs: float = Field(
        600, gt=0, description="Cap on a receiver's Retry-After, so one bad header cannot stall us."
    )


class SinkBase(Model):
    event_types: list[str] | None = Field(
        None, description="Event types this sink receives; omitted = all."
    )
    batch_max_events: int = Field(500, ge=1, le=10_000, description="Most events per send.")
    batch_linger_ms: float = Field(
        50, ge=0, le=5000,
        description="While events are flowing, wait this long for a batch to fill before "
        "sending (fewer, larger requests; adds at most this much latency).",
    )
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retry timing.")


class HttpSinkConfig(SinkBase):
    kind: Literal["http"] = Field(description="Sink kind.")
    url: str = Field(pattern=r"^https?://", description="URL events are POSTed to.")
    mode: Literal["single", "batch"] = Field(
        "batch", description="One event per request, or a CloudEvents JSON batch."
    )
    timeout_secs: float = Field(10.0, gt=0, le=300, description="Timeout of one request.")
    bearer_token_file: Path | None = Field(
        None, description="File holding a bearer token (e.g. a systemd credential)."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    max_connections: int = Field(4, ge=1, le=100, description="HTTP connection pool size.")


class MqttSinkConfig(SinkBase):
    kind: Literal["mqtt"] = Field(description="Sink kind.")
    broker: Name = Field(description="Name of a broker in `brokers`.")
    prefix: str = Field(
        "edge/{site}", description="Topic prefix template; events go to {prefix}/events/{type}."
    )
    batch_max_events: int = Field(500, ge=1, le=10_000, description="Most events per send.")
    batch_linger_ms: float = Field(25, ge=0, le=5000, description="See the HTTP sink's.")
    publish_timeout_secs: float = Field(10.0, gt=0, description="Wait for the broker's acks.")


SinkConfig = Annotated[HttpSinkConfig | MqttSinkConfig, Field(discriminator="kind")]


# --- outbox and site -----------------------------------------------------------------------


class OutboxConfig(Model):
    path: Path = Field(Path("edge-agent.db"), description="SQLite file (relative to the config).")
    max_disk_mb: int = Field(
        2048, ge=16,
        description="Disk quota of the outbox (its pages in use and its WAL), checked at every "
        "commit: over it ingest pauses (business events already made are kept, devices' "
        "messages wait upstream) and resumes under 90% of it.",
    )
    min_free_disk_mb: int = Field(
        256, ge=0,
        description="Free space kept on the outbox's filesystem, checked at every commit: "
        "under it ingest pauses (as over the quota) while there is still room to mark "
        "deliveries done, prune and checkpoint, so the outbox never fills its disk; it "
        "resumes once twice this is free again. On a small filesystem the smaller of this "
        "and min_free_disk_percent of its size applies; 0 turns the check off. Part of it "
        "(at most an eighth of max_disk_mb, 64 MB) is held in a reserve file next to the "
        "outbox (<path>-reserve), given back should a write find the disk full anyway (so "
        "the outbox can still mark deliveries done and shrink) and taken again once there "
        "is room.",
    )
    min_free_disk_percent: float = Field(
        5.0, ge=0, le=50,
        description="The reserve as a share of the filesystem's size, when smaller than "
        "min_free_disk_mb (see there).",
    )
    commit_interval_ms: float = Field(
        10.0, ge=0, le=1000, description="Longest an event waits to join a group commit."
    )
    commit_max_items: int = Field(2000, ge=1, description="Most inputs in one group commit.")
    dedup_retention_secs: int = Field(
        900, ge=10, description="How long consumed device message ids are remembered."
    )
    delivered_retention_secs: int = Field(
        3600, ge=0,
        description="How long events every sink has delivered are kept (for operators) before "
        "they are pruned; less when the outbox nears its quota.",
    )


class TimeConfig(Model):
    idle_source_secs: float = Field(
        2.0, gt=0, le=3600,
        description="A connected device not heard from for this long no longer holds back "
        "the rules' event time (a quiet line still closes its windows).",
    )
    hold_offline_secs: float = Field(
        30.0, ge=0, le=86400,
        description="How long a device that went offline holds back the rules' event time "
        "(it may come back with what it has); then what it would have sent is a gap. "
        "Devices whose messages wait at the broker (MQTT QoS 1) hold it back until they return.",
    )
    clock_skew_tolerance_secs: float = Field(
        1.0, gt=0, le=3600,
        description="A device clock further off the agent's than this is reported, and its "
        "times are corrected by the estimated offset for windowing.",
    )
    gap_margin_secs: float = Field(
        1.0, ge=0, le=3600,
        description="Margin around a time a device was not seen (connect, outage, counter "
        "gap) within which a missing input is reported as a gap, not an exception.",
    )


class LogConfig(Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class SiteConfig(Model):
    site: Name = Field(description="Site id, e.g. dc-east-1; part of every event.")
    profiles_dir: Path = Field(
        Path("../device_profiles"), description="Directory of device profiles (relative to this file)."
    )
    brokers: dict[Name, BrokerConfig] = Field(default_factory=dict, description="MQTT brokers.")
    devices: dict[Name, DeviceConfig] = Field(default_factory=dict, description="Devices by id.")
    rules: list[RuleConfig] = Field(default_factory=list, description="Business rules.")
    sinks: dict[Name, SinkConfig] = Field(description="Destinations by name.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable outbox.")
    time: TimeConfig = Field(
        default_factory=TimeConfig, description="Event time: device clocks, quiet and offline devices."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")

    @model_validator(mode="after")
    def _unique_rule_names(self, info: ValidationInfo) -> SiteConfig:
        if _checked_by_loader(info):
            return self  # load_site reports these with the exact line
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"rule name {r.name!r} is used twice")
            seen.add(r.name)
        return self


# --- loading with line numbers -------------------------------------------------------------
#
# load_site never stops at the first problem: the top-level keys, each broker, device, rule
# and sink are validated on their own, and the cross-references are checked on the raw
# document, so a bad port, a missing profile and an unknown broker are all reported at once.
# Each problem is located (file, line) and names the key, the bad value and what is allowed.

# Context flag: the loader checks these cross-field references itself, with exact lines.
_LOADER = "edge_agent.loader"


def _checked_by_loader(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_LOADER))


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def _fail(file: str, line: int | None, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, message)])


def read_yaml(path: Path) -> Any:
    """Parse one YAML file keeping line information.

    Every way a file can be unreadable (missing, a directory, not UTF-8, bad YAML syntax, a
    duplicate key, a tab) becomes a ConfigError with one located problem, never a traceback.
    """
    file = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(file, None, "file not found") from None
    except IsADirectoryError:
        raise _fail(file, None, "is a directory, not a YAML file") from None
    except OSError as exc:
        raise _fail(file, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _fail(
            file, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", YAMLWarning)
            doc = _yaml().load(text)
    except DuplicateKeyError as exc:
        at = exc.problem_mark.line + 1 if exc.problem_mark else None
        problem = str(exc.problem or "").removeprefix("found ")
        raise _fail(file, at, f"{problem}; each key may appear once") from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = mark.line + 1 if mark else None
        problem = str(exc.problem or exc.context or "invalid YAML")
        if "'\\t'" in problem and mark is not None:
            msg = f"tab character at column {mark.column + 1}; YAML must be indented with spaces"
        elif "another document" in problem:
            msg = "a second YAML document ('---'); the file must hold exactly one"
        else:
            msg = f"YAML syntax: {problem}"
            ctx = exc.context_mark
            if exc.context and ctx is not None and ctx.line + 1 != at:
                msg += f" ({exc.context} started at line {ctx.line + 1})"
        raise _fail(file, at, msg) from None
    except Exception as exc:  # ruamel raises several unrelated types for bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(file, None, f"YAML error: {first}") from exc
    for w in caught:
        if issubclass(w.category, YAMLWarning):
            # e.g. an anchor defined twice: legal YAML, but an alias then silently means the last
            text_ = str(w.message)
            lines = [int(n) for n in re.findall(r"\(line: (\d+)\)", text_)]
            first = next((ln.strip() for ln in text_.splitlines() if ln.strip()), "warning")
            again = f" (first at line {lines[0]})" if len(lines) > 1 else ""
            raise _fail(file, lines[-1] if lines else None, f"YAML: {first}{again}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours to hide
    return doc


def _display_path(path: Path) -> Path:
    """``path`` without ``..`` parts: relative to the working directory if below it."""
    real = path.resolve()
    try:
        return real.relative_to(Path.cwd().resolve())
    except ValueError:
        return real


def _require_mapping(file: str, doc: Any, what: str) -> None:
    """An empty file, a list or a scalar is one clear problem, not a cascade of others."""
    if isinstance(doc, Mapping):
        return
    if doc is None:
        raise _fail(file, 1, f"the {what} is empty; it must be a mapping of keys")
    line = doc.lc.line + 1 if hasattr(doc, "lc") else 1
    kind = "a list" if isinstance(doc, list) else f"a single value ({_show(doc)})"
    raise _fail(file, line, f"the {what} must be a mapping of keys, not {kind}")


def _locate(doc: Any, loc: Iterable[Any]) -> tuple[int | None, list[Any]]:
    """``resolve`` with the path parts kept as they are in the document (str or int)."""
    line: int | None = None
    path: list[Any] = []
    node = doc
    lc = getattr(node, "lc", None)
    if lc is not None:
        line = lc.line + 1
    for part in loc:
        lc = getattr(node, "lc", None)
        if isinstance(node, Mapping) and part in node:
            if lc is not None:
                line = lc.key(part)[0] + 1
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            if lc is not None:
                line = lc.item(part)[0] + 1
            node = node[part]
            path.append(part)
        elif isinstance(node, (Mapping, list)):
            continue  # a union tag or a missing key: stay on this node
        else:
            break
    return line, path


def resolve(doc: Any, loc: Iterable[Any]) -> tuple[int | None, list[str]]:
    """Follow ``loc`` into ``doc``: the 1-based line of the deepest node reached and the path
    parts actually present in the document (pydantic adds union tags that are not)."""
    line, path = _locate(doc, loc)
    return line, [str(p) for p in path]


def line_of(doc: Any, loc: Iterable[Any]) -> int | None:
    """1-based line of the deepest node of ``doc`` reachable along ``loc``."""
    return resolve(doc, loc)[0]


def _plain(node: Any) -> Any:
    """ruamel's round-trip containers as plain dicts and lists (pydantic wants those)."""
    if isinstance(node, Mapping):
        return {str(k) if not isinstance(k, (str, int)) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


# --- messages ------------------------------------------------------------------------------


def _where(doc: Any, path: list[Any]) -> str:
    """A path as a site engineer reads it: ``rules[close-station-1].terminate_on[0].when``."""
    out = ""
    node = doc
    for i, part in enumerate(path):
        child = node[part] if isinstance(node, (Mapping, list)) else None
        if isinstance(part, int) and isinstance(node, list):
            name = None
            if i == 1 and path[0] == "rules" and isinstance(child, Mapping):
                name = child.get("name")  # rules[close-station-1] reads better than rules[0]
            out += f"[{name}]" if isinstance(name, str) and name else f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
        node = child
    return out


def _show(value: Any) -> str:
    """A bad value as the user wrote it in YAML, shortened."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = repr(str(value))
    return text if len(text) <= 60 else text[:57] + "...'"


_UNIT_SUFFIX = re.compile(r"_(secs|ms|mb|bytes|g)$")


def _closest(word: str, choices: Iterable[str]) -> str | None:
    """The known name a typo most likely meant (unit suffixes ignored), or None."""
    best, best_score = None, 0.0
    for c in choices:
        score = max(
            difflib.SequenceMatcher(None, word, c).ratio(),
            difflib.SequenceMatcher(None, word, _UNIT_SUFFIX.sub("", c)).ratio(),
        )
        if score > best_score:
            best, best_score = c, score
    return best if best_score >= 0.7 else None


def _unknown(what: str, value: str, known: Iterable[str], noun: str) -> str:
    """"no X 'v' (did you mean 'w'?)" or "no X 'v' (known: a, b)"."""
    known = sorted(map(str, known))
    guess = _closest(value, known)
    if guess is not None:
        return f"{what} '{value}' (did you mean '{guess}'?)"
    if not known:
        return f"{what} '{value}' ({noun} is empty)"
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    return f"{what} '{value}' ({noun}: {shown})"


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(model: type[BaseModel]) -> tuple[Any, ...]:
    kind = model.model_fields.get("kind")
    return get_args(_unwrap(kind.annotation)) if kind is not None else ()


def _union_members(tp: Any) -> list[Any] | None:
    if get_origin(tp) in (Union, UnionType):
        return [_unwrap(a) for a in get_args(tp) if a is not type(None)]
    return None


def _model_at(root: Any, loc: Iterable[Any]) -> type[BaseModel] | None:
    """The model class that pydantic's error ``loc`` points into (for key suggestions)."""
    tp = _unwrap(root)
    for part in loc:
        members = _union_members(tp)
        if members is not None:
            tagged = [m for m in members if _is_model(m) and part in _tags(m)]
            if tagged:
                tp = tagged[0]
                continue
            if len(members) != 1:
                return None
            tp = members[0]
        if _is_model(tp):
            if part in _tags(tp) and part not in tp.model_fields:
                continue  # the tag of a one-member discriminated union
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            f = fields.get(part) or tp.model_fields.get(part)
            if f is None:
                return None
            tp = _unwrap(f.annotation)
        elif get_origin(tp) is dict:
            tp = _unwrap(get_args(tp)[1])
        elif get_origin(tp) is list:
            tp = _unwrap(get_args(tp)[0])
        else:
            return None
    members = _union_members(tp)
    if members is not None and len(members) == 1:
        tp = members[0]
    return tp if _is_model(tp) else None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


_PATTERNS = {
    NAME_RE: "a name of letters, digits, '_', '.' or '-' (at most 64, starting with a letter "
    "or digit)",
    EVENT_TYPE_RE: "lower_snake_case (a-z, 0-9, '_'; starting with a letter)",
    r"^https?://": "a URL starting with http:// or https://",
}

_EXPECTED = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "list_type": "a list",
    "path_type": "a path",
}


def _expected(err: Mapping[str, Any]) -> str | None:
    """What the value must be, as a noun phrase, for type-like errors."""
    t, ctx = err["type"], err.get("ctx") or {}
    if t == "string_pattern_mismatch":
        return _PATTERNS.get(ctx.get("pattern", ""), f"text matching {ctx.get('pattern')}")
    if t == "literal_error":
        expected = str(ctx.get("expected", ""))
        return f"one of {expected}" if " or " in expected else expected
    return _EXPECTED.get(t)


def _message(err: Mapping[str, Any], root: Any, loc: list[Any]) -> str:
    t, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f" (got {_show(value)})"
    if t == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        key = str(loc[-1])
        known = _keys_of(model) if model else []
        if not known:
            return f"unknown key '{key}'"
        return _unknown("unknown key", key, known, "allowed keys")
    if t == "missing":
        return f"missing required key '{loc[-1]}'"
    if t == "union_tag_invalid":
        disc = ctx.get("discriminator", "'kind'").strip("'")
        tags = str(ctx.get("expected_tags", ""))
        allowed = f"one of {tags}" if "," in tags else tags
        tag = value.get(disc) if isinstance(value, Mapping) else ctx.get("tag")
        if not isinstance(tag, str):
            return f"{disc} must be {allowed} (got {_show(tag)})"
        return f"unknown {disc} '{tag}' (must be {allowed})"
    if t == "invalid_key":
        return f"key {_show(loc[-1])} must be a string (quote it)"
    if t == "union_tag_not_found":
        disc = ctx.get("discriminator", "'kind'").strip("'")
        return f"missing required key '{disc}'"
    if loc and loc[-1] == "[key]":
        what = _expected(err) or err["msg"]
        return f"key {_show(value)} must be {what}"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "greater than",
                 "less_than_equal": "at most", "less_than": "less than"}[t]
        bound = ctx.get({"greater_than_equal": "ge", "greater_than": "gt",
                         "less_than_equal": "le", "less_than": "lt"}[t])
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {words} {bound}{got}"
    if t in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        if t == "string_too_short":
            return "must not be empty" if n == 1 else f"must be at least {n} characters long"
        return f"must have at least {n} entr{'y' if n == 1 else 'ies'}" + (
            "" if isinstance(value, (Mapping, list)) else got
        )
    if t in ("too_long", "string_too_long"):
        n = ctx.get("max_length")
        unit = "characters" if t == "string_too_long" else "entries"
        return f"must have at most {n} {unit}"
    if t == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return msg if isinstance(value, (Mapping, list)) else f"{msg}{got}"
    expected = _expected(err)
    if expected is not None:
        return f"must be {expected}{got}"
    return str(err["msg"]).replace("Input should be", "must be", 1) + got


def _schema_problems(
    file: str, doc: Any, errors: list[Any], root: Any, prefix: tuple[Any, ...] = ()
) -> list[tuple[ConfigProblem, tuple[Any, ...]]]:
    """pydantic errors of ``root`` validated at ``prefix`` of ``doc`` -> (problem, doc path).

    The errors of one union (``Name | list[Name]``) collapse into one "must be X or Y".
    """
    out: list[tuple[ConfigProblem, tuple[Any, ...]]] = []
    union_seen: dict[tuple[Any, ...], tuple[int, str]] = {}
    for err in errors:
        loc = [*prefix, *err["loc"]]
        line, path = _locate(doc, loc)
        if err["type"] in ("extra_forbidden", "invalid_key") or loc[-1] == "[key]":
            path = path[:-1]
        msg = _message(err, root, loc)
        # two type errors on one value come from the members of a union (Name | list[Name])
        key = tuple(path)
        if _expected(err) is not None and " (got " in msg:
            if key in union_seen:
                i, first_type = union_seen[key]
                old = out[i][0]
                if err["type"] in _EXPECTED and first_type not in _EXPECTED:
                    continue  # the other member took the type but not the value: say only that
                head, _, tail = old.message.partition(" (got ")
                if first_type in _EXPECTED and err["type"] not in _EXPECTED:
                    head = f"{_where(doc, path)}: {msg.partition(' (got ')[0]}"
                else:
                    head = f"{head} or {_expected(err)}"
                out[i] = (ConfigProblem(file, line, f"{head} (got {tail}"), key)
                union_seen[key] = (i, err["type"])
                continue
            union_seen[key] = (len(out), err["type"])
        where = _where(doc, path)
        out.append((ConfigProblem(file, line, f"{where}: {msg}" if where else msg), key))
    return out


def validation_problems(
    file: str, doc: Any, exc: ValidationError, model: Any = None
) -> list[ConfigProblem]:
    """Translate pydantic errors into located, readable problems.

    ``model`` is the validated type; when given, an unknown key gets a "did you mean" hint.
    """
    return [p for p, _ in _schema_problems(file, doc, exc.errors(), model)]


def _sorted(problems: Iterable[ConfigProblem]) -> list[ConfigProblem]:
    """By file, then line; exact repeats dropped (one device per input may say it twice)."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.file, p.line or 0))


# --- the site loader -----------------------------------------------------------------------

_SECTIONS: dict[str, type] = {"brokers": dict, "devices": dict, "rules": list, "sinks": dict}
_META_FIELDS = {"device", "time"}  # ${input.device}, ${input.time}: see rules/base.py
REF_RE = re.compile(r"\$\{([^}]*)\}")
BUILTIN_REFS = {"key", "rule", "reason", "missing", "site"}


@functools.cache
def _adapter(section: str) -> TypeAdapter[Any]:
    tp: Any = SiteConfig.model_fields[section].annotation
    if _SECTIONS[section] is list:
        tp = get_args(tp)[0]  # rules are validated one list item at a time
    return TypeAdapter(tp)


def _rule_types(rule: Any) -> tuple[list[str], bool]:
    """Event types a raw rule emits, and whether all of them could be read."""
    if not isinstance(rule, Mapping):
        return [], False
    specs = [rule["emit"]] if rule.get("emit") is not None else []
    if rule.get("on_timeout") is not None:
        specs.append(rule["on_timeout"])
    terms = rule.get("terminate_on", [])
    specs += [t.get("emit") if isinstance(t, Mapping) else None for t in _as_list(terms)]
    types = [s.get("type") if isinstance(s, Mapping) else None for s in specs]
    good = [t for t in types if isinstance(t, str)]
    return good, len(good) == len(specs)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class _SiteCheck:
    """One run of load_site: collects every problem, then the loader decides."""

    def __init__(self, path: Path, doc: Mapping[str, Any]):
        self.file = str(path)
        self.base = path.parent
        self.doc = doc
        self.raw: dict[str, Any] = _plain(doc)
        self.problems: list[ConfigProblem] = []
        self.bad: set[tuple[Any, ...]] = set()  # doc paths that already have a schema problem

    def add(self, loc: tuple[Any, ...], message: str) -> None:
        line, path = _locate(self.doc, loc)
        if len(path) == len(loc) and tuple(path) in self.bad:
            return  # the value is already reported as malformed; do not pile on
        where = _where(self.doc, path)
        self.problems.append(ConfigProblem(self.file, line, f"{where}: {message}"))

    def section(self, name: str) -> Any:
        """A section of the raw document, or an empty one if it is missing or malformed."""
        v = self.raw.get(name)
        return v if isinstance(v, _SECTIONS[name]) else _SECTIONS[name]()

    def schema(self, errors: list[Any], root: Any, prefix: tuple[Any, ...] = ()) -> None:
        for problem, path in _schema_problems(self.file, self.doc, errors, root, prefix):
            self.problems.append(problem)
            self.bad.add(path)

    # --- schema, piece by piece ---------------------------------------------------------

    def validate_schema(self) -> None:
        ctx = {_LOADER: True}
        top = {
            k: (_SECTIONS[k]() if k in _SECTIONS and isinstance(v, _SECTIONS[k]) else v)
            for k, v in self.raw.items()
        }
        try:
            SiteConfig.model_validate(top, context=ctx)
        except ValidationError as exc:
            self.schema(exc.errors(), SiteConfig)
        for name, kind in _SECTIONS.items():
            section = self.raw.get(name)
            items: Iterable[tuple[Any, Any]]
            if kind is dict and isinstance(section, dict):
                items = section.items()
            elif kind is list and isinstance(section, list):
                items = enumerate(section)
            else:
                continue  # missing, or reported above as the wrong type
            for key, value in items:
                adapter = _adapter(name)
                try:
                    if kind is dict:
                        adapter.validate_python({key: value}, context=ctx)
                    else:
                        adapter.validate_python(value, context=ctx)
                except ValidationError as exc:
                    self.schema(exc.errors(), SiteConfig, (name,) if kind is dict else (name, key))

    # --- references, on the raw document so broken neighbours do not hide them ----------

    def check_references(self) -> tuple[dict[str, Any], set[str]]:
        from .profiles import load_profiles  # profiles import config models; avoid a cycle

        # a section that is not even a mapping/list: references into it are not checked
        raw = self.raw
        broken = {k for k, t in _SECTIONS.items() if k in raw and not isinstance(raw[k], t)}
        brokers = self.section("brokers")
        devices = self.section("devices")
        rules = self.section("rules")
        sinks = self.section("sinks")

        for name, b in brokers.items():
            if isinstance(b, Mapping):
                self.check_file(("brokers", name, "password_file"), b.get("password_file"))
                if b.get("password_file") is not None and b.get("username") is None:
                    self.add(("brokers", name, "password_file"),
                             "a password is only sent with a username; set 'username' too")

        # profiles: load the ones devices name; a broken profile file is reported in itself
        profiles_dir = self.profiles_dir()
        wanted = {
            d["profile"]
            for d in devices.values()
            if isinstance(d, Mapping) and isinstance(d.get("profile"), str)
            and re.match(NAME_RE, d["profile"])
        }
        profiles: dict[str, Any] = {}
        available: list[str] = []
        if profiles_dir is not None:
            available = sorted(p.stem for p in profiles_dir.glob("*.yaml"))
            profiles, profile_problems = load_profiles(profiles_dir, wanted)
            self.problems += profile_problems

        for dev_id, d in devices.items():
            if not isinstance(d, Mapping):
                continue
            prof_name = d.get("profile")
            pdir = profiles_dir
            if isinstance(prof_name, str) and pdir is not None and prof_name not in available:
                where = f"profiles in {_display_path(pdir)}"
                self.add(("devices", dev_id, "profile"),
                         _unknown("no profile", prof_name, available, where))
            conn = d.get("connection")
            if isinstance(conn, Mapping):
                broker = conn.get("broker")
                if isinstance(broker, str) and broker not in brokers and "brokers" not in broken:
                    self.add(("devices", dev_id, "connection", "broker"),
                             _unknown("no broker", broker, map(str, brokers), "brokers"))
                prof = profiles.get(prof_name) if isinstance(prof_name, str) else None
                kind = conn.get("kind")
                if prof is not None and isinstance(kind, str) and prof.protocol != kind:
                    self.add(("devices", dev_id, "connection", "kind"),
                             f"profile '{prof_name}' speaks {prof.protocol}, "
                             f"the connection is {kind}")

        seen_rules: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if not isinstance(rule, Mapping):
                continue
            name = rule.get("name")
            if isinstance(name, str):
                if name in seen_rules:
                    first = line_of(self.doc, ("rules", seen_rules[name], "name"))
                    self.add(("rules", i, "name"),
                             f"rule name '{name}' is already used at line {first}; "
                             "names must be unique")
                else:
                    seen_rules[name] = i
            self.check_rule(i, rule, None if "devices" in broken else devices, profiles)

        emitted: set[str] = set()
        complete = isinstance(self.raw.get("rules", []), list)
        for r in rules:
            types, readable = _rule_types(r)
            emitted.update(types)
            complete = complete and readable
        for name, s in sinks.items():
            if not isinstance(s, Mapping):
                continue
            broker = s.get("broker")
            if (s.get("kind") == "mqtt" and isinstance(broker, str) and broker not in brokers
                    and "brokers" not in broken):
                self.add(("sinks", name, "broker"),
                         _unknown("no broker", broker, map(str, brokers), "brokers"))
            if s.get("kind") == "http":
                self.check_file(("sinks", name, "bearer_token_file"), s.get("bearer_token_file"))
            wanted_types = s.get("event_types")
            if isinstance(wanted_types, list) and complete:  # else a broken rule may emit it
                for j, t in enumerate(wanted_types):
                    if isinstance(t, str) and t not in emitted:
                        self.add(("sinks", name, "event_types", j),
                                 _unknown("no rule emits", t, emitted, "rules emit"))
        return profiles, wanted

    def profiles_dir(self) -> Path | None:
        value = self.raw.get("profiles_dir", SiteConfig.model_fields["profiles_dir"].default)
        if not isinstance(value, (str, Path)) or ("profiles_dir",) in self.bad:
            return None
        p = Path(value)
        p = p if p.is_absolute() else self.base / p
        if not p.is_dir():
            where = ("profiles_dir",) if "profiles_dir" in self.raw else ()
            line = line_of(self.doc, where) if where else 1
            self.problems.append(ConfigProblem(
                self.file, line, f"profiles_dir: no directory {_display_path(p)}"
                + ("" if where else " (the default; set profiles_dir)")))
            return None
        return p

    def check_file(self, loc: tuple[Any, ...], value: Any) -> None:
        if not isinstance(value, str) or not value:
            return
        p = Path(value)
        p = p if p.is_absolute() else self.base / p
        if not p.is_file():
            self.add(loc, f"no such file {_display_path(p)}")

    def check_rule(
        self,
        i: int,
        rule: Mapping[str, Any],
        devices: Mapping[Any, Any] | None,  # None: the devices section is itself malformed
        profiles: Mapping[str, Any],
    ) -> None:
        inputs = rule.get("inputs")
        inputs = inputs if isinstance(inputs, Mapping) else {}
        key = rule.get("key")
        # input name -> [(profile name, event spec)] for every device of the input we could read
        events: dict[str, list[tuple[str, Any]]] = {}
        for in_name, spec in inputs.items():
            events[in_name] = []
            if in_name in BUILTIN_REFS:  # the template context would shadow the input
                self.add(("rules", i, "inputs", in_name),
                         f"input name '{in_name}' is reserved for ${{{in_name}}}; choose another")
            if not isinstance(spec, Mapping):
                continue
            ev_name = spec.get("event")
            devs = spec.get("device")
            for j, dev_id in enumerate(_as_list(devs)):
                dloc: tuple[Any, ...] = ("rules", i, "inputs", in_name, "device")
                if isinstance(devs, list):
                    dloc += (j,)
                if not isinstance(dev_id, str) or devices is None:
                    continue
                d = devices.get(dev_id)
                if d is None:
                    self.add(dloc, _unknown("no device", dev_id, map(str, devices), "devices"))
                    continue
                prof_name = d.get("profile") if isinstance(d, Mapping) else None
                prof = profiles.get(prof_name) if isinstance(prof_name, str) else None
                if prof is None or not isinstance(ev_name, str):
                    continue
                ev = prof.events.get(ev_name)
                if ev is None:
                    self.add(("rules", i, "inputs", in_name, "event"),
                             _unknown(f"profile '{prof_name}' has no event", ev_name,
                                      prof.events, "it has"))
                    continue
                events[in_name].append((f"{prof_name}.{ev_name}", ev))
                if isinstance(key, str) and key not in ev.fields:
                    self.add(("rules", i, "key"),
                             _unknown(f"{prof_name}.{ev_name} (input '{in_name}') has no field",
                                      key, ev.fields, "its fields"))

        terms = rule.get("terminate_on")
        for j, t in enumerate(terms if isinstance(terms, list) else []):
            if not isinstance(t, Mapping):
                continue
            inp = t.get("input")
            if isinstance(inp, str) and inputs and inp not in inputs:
                self.add(("rules", i, "terminate_on", j, "input"),
                         _unknown("no input", inp, inputs, "inputs"))
            when = t.get("when")
            fld = when.get("field") if isinstance(when, Mapping) else None
            if isinstance(inp, str) and isinstance(fld, str):
                for label, ev in events.get(inp, []):
                    if fld not in ev.fields:
                        self.add(("rules", i, "terminate_on", j, "when", "field"),
                                 _unknown(f"{label} has no field", fld, ev.fields, "its fields"))
        when = rule.get("when")  # map and count: a condition on their one input
        fld = when.get("field") if isinstance(when, Mapping) else None
        if isinstance(fld, str):
            for in_evs in events.values():
                for label, ev in in_evs:
                    if fld not in ev.fields:
                        self.add(("rules", i, "when", "field"),
                                 _unknown(f"{label} has no field", fld, ev.fields, "its fields"))
        timeout = rule.get("on_timeout")
        reasons = timeout.get("reasons") if isinstance(timeout, Mapping) else None
        if isinstance(reasons, Mapping) and inputs:
            for inp in reasons:
                if inp not in inputs:
                    self.add(("rules", i, "on_timeout", "reasons", inp),
                             _unknown("no input", str(inp), inputs, "inputs"))

        specs: list[tuple[tuple[Any, ...], Any]] = [(("emit",), rule.get("emit"))]
        specs += [(("terminate_on", j, "emit"), t.get("emit"))
                  for j, t in enumerate(terms if isinstance(terms, list) else [])
                  if isinstance(t, Mapping)]
        specs.append((("on_timeout",), timeout))
        for loc, spec in specs:
            if not isinstance(spec, Mapping):
                continue
            items: list[tuple[tuple[Any, ...], Any]] = [(("subject",), spec.get("subject"))]
            data = spec.get("data")
            if isinstance(data, Mapping):
                items += [(("data", k), v) for k, v in data.items()]
            for sub, value in items:
                if isinstance(value, str):
                    self.check_template(("rules", i, *loc, *sub), value, inputs, events)

    def check_template(
        self, loc: tuple[Any, ...], value: str, inputs: Mapping[str, Any],
        events: Mapping[str, list[tuple[str, Any]]],
    ) -> None:
        """Every ${...} must be a builtin or ${input.field} of a field the input's profile has."""
        if value.count("${") != len(REF_RE.findall(value)):
            self.add(loc, f"unclosed '${{' in template {_show(value)}")
        for ref in REF_RE.findall(value):
            if ref in BUILTIN_REFS:
                continue
            inp, dot, fld = ref.partition(".")
            if not dot:
                if inp in inputs:
                    self.add(loc, f"'${{{ref}}}' names an input, not a field; use "
                                  f"'${{{inp}.<field>}}'")
                else:
                    guess = _closest(ref, [*BUILTIN_REFS, *inputs])
                    hint = (f"did you mean '${{{guess}}}'?" if guess in BUILTIN_REFS
                            else f"did you mean '${{{guess}.<field>}}'?" if guess
                            else "use ${input.field} or one of ${key}, ${rule}, ${reason}, "
                                 "${missing}, ${site}")
                    self.add(loc, f"unknown reference '${{{ref}}}' ({hint})")
                continue
            if inp not in inputs:
                if inputs:
                    self.add(loc, f"'${{{ref}}}': " + _unknown("no input", inp, inputs, "inputs"))
                continue
            for label, ev in events.get(inp, []):
                if fld not in ev.fields and fld not in _META_FIELDS:
                    self.add(loc, _unknown(f"'${{{ref}}}': {label} has no field", fld,
                                           [*ev.fields, *_META_FIELDS], "it has"))


def load_site(path: str | Path) -> tuple[SiteConfig, dict[str, Any]]:
    """Load and fully validate a site file and the profiles it uses.

    Returns the site model and the profiles it references by name. Raises ConfigError with
    every problem found, across the site file and all profile files, sorted by file and line:
    schema problems and reference problems together, never only the first kind.
    """
    path = Path(path)
    file = str(path)
    doc = read_yaml(path)
    _require_mapping(file, doc, "site file")
    check = _SiteCheck(path, doc)
    check.validate_schema()
    profiles, wanted = check.check_references()
    if check.problems:
        raise ConfigError(_sorted(check.problems))
    try:
        site = SiteConfig.model_validate(check.raw, context={_LOADER: True})
    except ValidationError as exc:  # a safety net: the piecewise checks should have seen it
        raise ConfigError(_sorted(validation_problems(file, doc, exc, SiteConfig))) from None
    return site, {name: profiles[name] for name in wanted if name in profiles}
