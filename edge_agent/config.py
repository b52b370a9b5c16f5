"""Site configuration: the typed, closed models of the site file and how it is loaded.

Owns: parsing YAML with line numbers, validating into pydantic models, cross-checking
references (profiles, devices, brokers, sinks), and reporting *every* problem at once as
``file:line: message``. Connects to nothing. Device profiles live in ``profiles.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

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
        description="Most unacknowledged QoS 1 messages the broker may send us at once (MQTT 5); "
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
            raise ValueError("topic_base must be a plain topic without wildcards or trailing '/'")
        return v


Connection = Annotated[MqttConnection, Field(discriminator="kind")]


class DeviceConfig(Model):
    profile: Name = Field(description="Name of the device profile (file in device_profiles/).")
    connection: Connection = Field(description="How to reach the device.")
    description: str = Field("", description="Free text for operators.")


# --- rules ---------------------------------------------------------------------------------

Template = Any  # str with ${input.field} references, or a literal JSON value


class EmitSpec(Model):
    type: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
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
    event: Name = Field(description="Event name in the device's profile.")


class TerminateSpec(Model):
    input: Name = Field(description="Input whose arrival is tested.")
    when: Condition = Field(description="Condition on that input's fields.")
    emit: EmitSpec = Field(
        description="Event emitted at once instead; the key is then closed for the window, "
        "so the other inputs of the same key are absorbed."
    )


class TimeoutSpec(Model):
    type: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
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
    emit: EmitSpec = Field(description="Event emitted when every input arrived in the window.")
    on_timeout: TimeoutSpec | None = Field(
        None, description="Exception emitted when the window closes without every input."
    )
    terminate_on: list[TerminateSpec] = Field(
        default_factory=list,
        description="Inputs that end the correlation at once with another event (e.g. no-read).",
    )

    @model_validator(mode="after")
    def _inputs_known(self) -> CorrelateRule:
        for t in self.terminate_on:
            if t.input not in self.inputs:
                raise ValueError(f"terminate_on names unknown input {t.input!r}")
        if self.on_timeout:
            for name in self.on_timeout.reasons:
                if name not in self.inputs:
                    raise ValueError(f"on_timeout.reasons names unknown input {name!r}")
        return self


RuleConfig = Annotated[CorrelateRule, Field(discriminator="kind")]


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
    batch_max_events: int = Field(200, ge=1, le=10_000, description="Most events per send.")
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
    publish_timeout_secs: float = Field(10.0, gt=0, description="Wait for the broker's acks.")


SinkConfig = Annotated[HttpSinkConfig | MqttSinkConfig, Field(discriminator="kind")]


# --- outbox and site -----------------------------------------------------------------------


class OutboxConfig(Model):
    path: Path = Field(Path("edge-agent.db"), description="SQLite file (relative to the config).")
    max_disk_mb: int = Field(
        2048, ge=16, description="Disk quota; business events are never dropped, ingest pauses."
    )
    commit_interval_ms: float = Field(
        2.0, ge=0, le=1000, description="Longest an event waits to join a group commit."
    )
    commit_max_items: int = Field(2000, ge=1, description="Most inputs in one group commit.")
    dedup_retention_secs: int = Field(
        900, ge=10, description="How long consumed device message ids are remembered."
    )
    delivered_retention_secs: int = Field(
        24 * 3600, ge=0, description="How long delivered events are kept before purge."
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
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")

    @model_validator(mode="after")
    def _unique_rule_names(self) -> SiteConfig:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"rule name {r.name!r} is used twice")
            seen.add(r.name)
        return self


# --- loading with line numbers -------------------------------------------------------------


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def read_yaml(path: Path) -> Any:
    """Parse one YAML file keeping line information; syntax errors become ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(path), None, f"cannot read: {exc}")]) from exc
    try:
        return _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError([ConfigProblem(str(path), line, f"YAML syntax: {msg}")]) from exc
    except Exception as exc:  # ruamel raises several unrelated types for bad input
        raise ConfigError([ConfigProblem(str(path), None, f"YAML error: {exc}")]) from exc


def resolve(doc: Any, loc: Iterable[Any]) -> tuple[int | None, list[str]]:
    """Follow ``loc`` into ``doc``: the 1-based line of the deepest node reached and the path
    parts actually present in the document (pydantic adds union tags that are not)."""
    line: int | None = None
    path: list[str] = []
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
            path.append(str(part))
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            if lc is not None:
                line = lc.item(part)[0] + 1
            node = node[part]
            path.append(str(part))
        elif isinstance(node, (Mapping, list)):
            continue  # a union tag or a missing key: stay on this node
        else:
            break
    return line, path


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


def validation_problems(file: str, doc: Any, exc: ValidationError) -> list[ConfigProblem]:
    """Translate pydantic errors into located, readable problems."""
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        line, path = resolve(doc, loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
            path = path[:-1]
        elif err["type"] == "missing":
            msg = f"missing required key '{loc[-1]}'"
        elif "input" in err and err["type"] not in ("model_type", "dict_type", "list_type"):
            msg = f"{msg} (got {err['input']!r})"
        where = ".".join(path)
        problems.append(ConfigProblem(file, line, f"{where}: {msg}" if where else msg))
    return problems


def load_site(path: str | Path) -> tuple[SiteConfig, dict[str, Any]]:
    """Load and fully validate a site file and the profiles it uses.

    Returns the site model and the profiles it references by name. Raises ConfigError with
    every problem found, across the site file and all profile files.
    """
    from .profiles import load_profiles  # profiles import config models; avoid a cycle

    path = Path(path)
    doc = read_yaml(path)
    file = str(path)
    if not isinstance(doc, Mapping):
        raise ConfigError([ConfigProblem(file, 1, "the site file must be a mapping of keys")])
    try:
        site = SiteConfig.model_validate(_plain(doc))
    except ValidationError as exc:
        raise ConfigError(validation_problems(file, doc, exc)) from None

    problems: list[ConfigProblem] = []
    base = path.parent
    profiles_dir = site.profiles_dir if site.profiles_dir.is_absolute() else base / site.profiles_dir
    wanted = {d.profile for d in site.devices.values()}
    profiles, profile_problems = load_profiles(profiles_dir, wanted)
    problems += profile_problems

    def at(*loc: Any) -> int | None:
        return line_of(doc, loc)

    for dev_id, dev in site.devices.items():
        if dev.profile not in profiles and not any(
            p.file.endswith(f"{dev.profile}.yaml") for p in profile_problems
        ):
            problems.append(
                ConfigProblem(
                    file,
                    at("devices", dev_id, "profile"),
                    f"devices.{dev_id}.profile: no profile '{dev.profile}' in {profiles_dir}",
                )
            )
        conn = dev.connection
        if conn.broker not in site.brokers:
            problems.append(
                ConfigProblem(
                    file,
                    at("devices", dev_id, "connection", "broker"),
                    f"devices.{dev_id}.connection.broker: no broker '{conn.broker}' in brokers",
                )
            )
        prof = profiles.get(dev.profile)
        if prof is not None and prof.protocol != conn.kind:
            problems.append(
                ConfigProblem(
                    file,
                    at("devices", dev_id, "connection", "kind"),
                    f"devices.{dev_id}: profile '{dev.profile}' speaks {prof.protocol}, "
                    f"the connection is {conn.kind}",
                )
            )

    for i, rule in enumerate(site.rules):
        for in_name, spec in rule.inputs.items():
            devs = [spec.device] if isinstance(spec.device, str) else spec.device
            for dev_id in devs:
                dev = site.devices.get(dev_id)
                if dev is None:
                    problems.append(
                        ConfigProblem(
                            file,
                            at("rules", i, "inputs", in_name, "device"),
                            f"rules[{rule.name}].inputs.{in_name}: no device '{dev_id}' in devices",
                        )
                    )
                    continue
                prof = profiles.get(dev.profile)
                if prof is None:
                    continue
                ev = prof.events.get(spec.event)
                if ev is None:
                    problems.append(
                        ConfigProblem(
                            file,
                            at("rules", i, "inputs", in_name, "event"),
                            f"rules[{rule.name}].inputs.{in_name}: profile '{dev.profile}' has "
                            f"no event '{spec.event}' (it has: {', '.join(sorted(prof.events))})",
                        )
                    )
                    continue
                if rule.key not in ev.fields:
                    problems.append(
                        ConfigProblem(
                            file,
                            at("rules", i, "key"),
                            f"rules[{rule.name}]: key '{rule.key}' is not a field of "
                            f"{dev.profile}.{spec.event}",
                        )
                    )
                problems += _check_templates(file, doc, i, rule, in_name, ev.fields, dev.profile)

    for name, sink in site.sinks.items():
        if isinstance(sink, MqttSinkConfig) and sink.broker not in site.brokers:
            problems.append(
                ConfigProblem(
                    file,
                    at("sinks", name, "broker"),
                    f"sinks.{name}.broker: no broker '{sink.broker}' in brokers",
                )
            )
        if isinstance(sink, HttpSinkConfig) and sink.bearer_token_file is not None:
            p = sink.bearer_token_file
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                problems.append(
                    ConfigProblem(
                        file,
                        at("sinks", name, "bearer_token_file"),
                        f"sinks.{name}.bearer_token_file: no such file {p}",
                    )
                )
        known_types = {t for r in site.rules for t in _emitted_types(r)}
        for j, t in enumerate(sink.event_types or []):
            if t not in known_types:
                problems.append(
                    ConfigProblem(
                        file,
                        at("sinks", name, "event_types", j),
                        f"sinks.{name}.event_types: no rule emits '{t}' "
                        f"(rules emit: {', '.join(sorted(known_types)) or 'nothing'})",
                    )
                )
    if problems:
        raise ConfigError(problems)
    return site, {name: profiles[name] for name in wanted if name in profiles}


def _emitted_types(rule: CorrelateRule) -> list[str]:
    types = [rule.emit.type] + [t.emit.type for t in rule.terminate_on]
    if rule.on_timeout:
        types.append(rule.on_timeout.type)
    return types


REF_RE = re.compile(r"\$\{([^}]*)\}")
BUILTIN_REFS = {"key", "rule", "reason", "missing", "site"}


def _check_templates(
    file: str, doc: Any, i: int, rule: CorrelateRule, in_name: str, fields: Mapping[str, Any], profile: str
) -> list[ConfigProblem]:
    """Every ${input.field} reference to this input must name a field its profile decodes."""
    problems = []
    specs: list[tuple[tuple[Any, ...], Any]] = [(("emit",), rule.emit)]
    specs += [(("terminate_on", j, "emit"), t.emit) for j, t in enumerate(rule.terminate_on)]
    if rule.on_timeout:
        specs.append((("on_timeout",), rule.on_timeout))
    meta = {"device", "time", "received_at", "msg_id"}
    for loc, spec in specs:
        items = [("subject", spec.subject)] + [(f"data.{k}", v) for k, v in spec.data.items()]
        for where, value in items:
            if not isinstance(value, str):
                continue
            for ref in REF_RE.findall(value):
                if ref in BUILTIN_REFS:
                    continue
                inp, _, fld = ref.partition(".")
                if inp not in rule.inputs:
                    if in_name == next(iter(rule.inputs)):  # report once per rule
                        problems.append(
                            ConfigProblem(
                                file,
                                line_of(doc, ("rules", i, *loc, *where.split("."))),
                                f"rules[{rule.name}]: '${{{ref}}}' names no input "
                                f"(inputs: {', '.join(rule.inputs)})",
                            )
                        )
                elif inp == in_name and fld not in fields and fld not in meta:
                    problems.append(
                        ConfigProblem(
                            file,
                            line_of(doc, ("rules", i, *loc, *where.split("."))),
                            f"rules[{rule.name}]: '${{{ref}}}': {profile} has no field '{fld}'",
                        )
                    )
    return problems
