"""Generate docs/config.md from the config models, so the reference cannot drift from the code.

    python docs/gen_config_doc.py            # rewrite docs/config.md
    python docs/gen_config_doc.py --check    # exit 1 if docs/config.md is out of date

Every key's type, default and sentence come from the pydantic models (``Field(description=)``);
the prose around the tables (templates, the example) is written here.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edge_agent import config as c
from edge_agent import profiles as p
from edge_agent import profiles_modbus as pm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"
EXAMPLE = ROOT / "edge_agent" / "examples" / "site.yaml"

# (heading, where the keys live, model, how other tables link to it)
Section = tuple[str, str, type[BaseModel], str]
SITE_SECTIONS: list[Section] = [
    ("Top level", "the site file itself", c.SiteConfig, "site"),
    ("Brokers", "`brokers.<name>`", c.BrokerConfig, "broker"),
    ("Devices", "`devices.<device id>`", c.DeviceConfig, "device"),
    ("Device connection: `kind: mqtt`", "`devices.<device id>.connection` with `kind: mqtt`",
     c.MqttConnection, "mqtt connection"),
    ("Device connection: `kind: modbus`", "`devices.<device id>.connection` with `kind: modbus`",
     c.ModbusConnection, "modbus connection"),
    ("Rules: `kind: correlate`", "each item of `rules` with `kind: correlate`", c.CorrelateRule,
     "correlate rule"),
    ("Rules: `kind: map`", "each item of `rules` with `kind: map`", c.MapRule, "map rule"),
    ("Rule inputs", "`rules[].inputs.<input name>`", c.InputSpec, "input"),
    ("Emitted event", "`rules[].emit` and `rules[].terminate_on[].emit`", c.EmitSpec, "emit"),
    ("Early termination", "each item of `rules[].terminate_on`", c.TerminateSpec, "terminate_on"),
    ("Condition", "`rules[].terminate_on[].when` and, in a `map` rule, `rules[].when`",
     c.Condition, "condition"),
    ("Timeout event", "`rules[].on_timeout`", c.TimeoutSpec, "on_timeout"),
    ("Sinks: `kind: http`", "`sinks.<name>` with `kind: http`", c.HttpSinkConfig, "http sink"),
    ("Sinks: `kind: mqtt`", "`sinks.<name>` with `kind: mqtt`", c.MqttSinkConfig, "mqtt sink"),
    ("Sink retry", "`sinks.<name>.retry`", c.RetryConfig, "retry"),
    ("Outbox", "`outbox`", c.OutboxConfig, "outbox"),
    ("Event time", "`time`", c.TimeConfig, "time config"),
    ("Logging", "`log`", c.LogConfig, "log"),
]
PROFILE_SECTIONS: list[Section] = [
    ("Profile: `protocol: mqtt`", "a profile file with `protocol: mqtt`", p.Profile, "mqtt profile"),
    ("Events: `protocol: mqtt`", "`events.<event name>`", p.MqttEventSpec, "mqtt event"),
    ("Device time", "`events.<event name>.time`", p.TimeSpec, "time"),
    ("Fields", "`events.<event name>.fields.<field name>`", p.FieldSpec, "field"),
    ("Profile: `protocol: modbus`", "a profile file with `protocol: modbus`", pm.ModbusProfile,
     "modbus profile"),
    ("Signals", "`signals.<signal name>`", pm.Signal, "signal"),
    ("Poll groups", "`poll_groups.<group name>`", pm.PollGroup, "poll group"),
    ("Events: `protocol: modbus`", "`events.<event name>` of a Modbus profile", pm.ModbusEvent,
     "modbus event"),
    ("Trigger", "`events.<event name>.trigger`", pm.Trigger, "trigger"),
    ("Acknowledge", "`events.<event name>.trigger.ack`", pm.Ack, "ack"),
]
# models that have their own table: other tables link to it instead of spelling it out
NAMED = {m: (title, label) for title, _, m, label in SITE_SECTIONS + PROFILE_SECTIONS}
PATTERNS = {c.NAME_RE: "name", c.EVENT_TYPE_RE: "event type"}


def num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def literal(v: Any) -> str:
    """A literal as it must be written in YAML: quoted if YAML would read it as a number."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return f"`{v}`"
        return f'`"{v}"`'
    return f"`{v}`"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return "#" + keep.strip().replace(" ", "-")


def type_name(tp: Any) -> str:
    """An annotation as a site engineer reads it."""
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        for m in meta:
            for x in m.metadata if isinstance(m, FieldInfo) else ():
                if getattr(x, "pattern", None) in PATTERNS:
                    return PATTERNS[x.pattern]
        return type_name(base)
    if tp is Any:
        return "any value"
    if get_origin(tp) is Literal:
        values = get_args(tp)
        if len(values) == 1:
            return literal(values[0])
        return "one of " + ", ".join(map(literal, values))
    if get_origin(tp) in (Union, UnionType):
        members = [a for a in get_args(tp) if a is not NoneType]
        return " or ".join(type_name(m) for m in members)
    if get_origin(tp) is dict:
        k, v = get_args(tp)
        return f"mapping of {type_name(k)} to {type_name(v)}"
    if get_origin(tp) is list:
        inner = type_name(get_args(tp)[0])
        plural = inner in ("name", "string", "event type")
        return f"list of {inner}s" if plural else f"list of {inner}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in NAMED:
            title, label = NAMED[tp]
            return f"[{label}]({_anchor(title)})"
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in tp)
    return {str: "string", int: "integer", float: "number", bool: "true/false", Path: "path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def bounds(f: FieldInfo) -> str:
    parts = []
    for m in f.metadata:
        if isinstance(m, Ge):
            parts.append(f"≥ {num(m.ge)}")
        elif isinstance(m, Gt):
            parts.append(f"> {num(m.gt)}")
        elif isinstance(m, Le):
            parts.append(f"≤ {num(m.le)}")
        elif isinstance(m, Lt):
            parts.append(f"< {num(m.lt)}")
        elif isinstance(m, MinLen) and m.min_length:
            parts.append(f"at least {m.min_length}")
        elif isinstance(m, MaxLen):
            parts.append(f"at most {m.max_length}")
        elif getattr(m, "pattern", None) == r"^https?://":
            parts.append("http:// or https://")
    return f" ({', '.join(parts)})" if parts else ""


def default(f: FieldInfo) -> str:
    if f.is_required():
        return "**required**"
    value = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "all defaults"
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return f"`{_flow(value)}`"
    if value is None:
        return "none"
    if value == {} or value == []:
        return "empty"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"`{num(value)}`"
    return literal(value) if isinstance(value, str) else f"`{value}`"


def _flow(value: Any) -> str:
    """A default as YAML flow text: ``{default: {interval_ms: 100}}``."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_defaults=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def table(model: type[BaseModel]) -> list[str]:
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if not f.description:
            raise SystemExit(f"{model.__name__}.{name} has no description: add one")
        key = f.alias or name
        desc = f.description.replace("|", "\\|").replace("\n", " ")
        named = [PATTERNS[m.pattern] for m in f.metadata if getattr(m, "pattern", None) in PATTERNS]
        typ = (named[0] if named else type_name(f.annotation)) + bounds(f)
        typ = typ.replace("|", "\\|")
        rows.append(f"| `{key}` | {typ} | {default(f)} | {desc} |")
    return rows


def sections(items: list[Section]) -> list[str]:
    out: list[str] = []
    for title, where, model, _ in items:
        out += [f"### {title}", "", f"Keys of {where}.", "", *table(model), ""]
        if model in AFTER:
            out += [AFTER[model].rstrip("\n"), ""]
    return out


# ruff: noqa: E501 (the Markdown below keeps long table rows and sample lines on one line)
# a short worked example after a section's table
AFTER: dict[type[BaseModel], str] = {
    c.MqttConnection: """\
A device that publishes JSON over a broker (from `edge_agent/examples/site.yaml`):

```yaml
devices:
  SCN1:
    profile: generic_json_scanner
    connection: {kind: mqtt, broker: local, topic_base: site/close1/scanner/SCN1}
```
""",
    c.ModbusConnection: """\
A device the agent polls over Modbus TCP: one connection and one poller per device, so a
slow or dead device never holds up the others. The device's profile must say
`protocol: modbus` (an MQTT profile on a Modbus connection, or the reverse, is an error).
From `tests/e2e/test_modbus_flow.py`:

```yaml
devices:
  CW2:
    profile: acme_checkweigher_mb
    connection: {kind: modbus, host: 127.0.0.1, port: 5020, timeout_ms: 500}
  PTL1:
    profile: acme_pick_to_light
    connection: {kind: modbus, host: 127.0.0.1, port: 5021, timeout_ms: 500}
```

Reads are planned per poll group in the fewest requests the limits allow (at most the
profile's `max_registers_per_read`, lowered further by this device's
`max_registers_per_read`, reading through unused gaps of up to `max_gap`). See
[docs/modbus.md](modbus.md) for polling, fault handling and device status.
""",
    c.CorrelateRule: """\
Joins the messages of several inputs that carry the same `key` value within a window
(the example's `close-station-1`, explained [below](#the-example-explained)).
""",
    c.MapRule: """\
One business event for each device event of its single input that matches `when`; no
state, no window. For equipment whose own signal already is the business fact (a pick
confirmed at a pick-to-light position, a conveyor jam). Templates refer to the input by
its name (`${pick.location}`); `${key}` is the device id, and an empty subject falls back
to it. The event id comes from the device message's id, so a replayed message gives the
same event. From `tests/e2e/test_modbus_flow.py`:

```yaml
rules:
  - name: picks-confirmed
    kind: map
    inputs:
      pick: {device: PTL1, event: [confirm_1, confirm_2, confirm_3, confirm_4]}
    emit:
      type: pick_confirmed
      subject: ${pick.location}
      data: {location: "${pick.location}", position: "${pick.position}", qty: "${pick.qty_picked}", zone: PTL1}
  - name: conveyor-faults
    kind: map
    inputs:
      jam: {device: CONV3, event: jam}
    emit:
      type: equipment_fault
      subject: CONV3
      data: {equipment: CONV3, reason: "${jam.fault_code}", speed_m_min: "${jam.speed_m_min}"}
```

To pass only some device events, add a [condition](#condition), e.g.
`when: {field: fault_code, in: [jam_at_photo_eye, downstream_blocked]}` (device events
that do not match are counted as `filtered`).
""",
    p.Profile: """\
A device that publishes JSON messages; each event is one topic below the device's
`topic_base`. See `device_profiles/generic_json_scanner.yaml` and
`device_profiles/generic_json_checkweigher.yaml`.
""",
    pm.ModbusProfile: """\
A device the agent polls: the profile is the register map of one equipment model
(`signals`), how often each part of it is read (`poll_groups`), and which change of
state makes an event (`events`). Shipped: `acme_checkweigher_mb`, `acme_conveyor_section`
and `acme_pick_to_light` in `device_profiles/`. From `acme_checkweigher_mb.yaml`:

```yaml
version: 1
vendor: ACME Weighing
model: CW-200 checkweigher (Modbus TCP)
protocol: modbus
addressing: 1          # addresses as printed in the manual: 40001 is address 1
byte_order: CDAB       # floats are word-swapped unless a signal says otherwise
poll_groups:
  fast: {interval_ms: 50}
  slow: {interval_ms: 1000}
signals:
  weight_g: {table: holding_register, address: 1, type: float32, unit: g, group: fast}
  seq: {table: holding_register, address: 3, type: uint16, group: fast}
  in_tolerance: {table: holding_register, address: 4, type: bit, bit: 0, group: fast}
  tracking_id: {table: holding_register, address: 5, type: string, length: 5, order: ABCD, group: fast}
  total_count: {table: holding_register, address: 10, type: uint32, order: ABCD, group: slow}
events:
  weight:
    trigger: {kind: counter, signal: seq, modulus: 65536}
    fields: [tracking_id, weight_g, in_tolerance, seq]
```

`edge-agent validate` also checks that every signal's group is a declared poll group,
that a 1-based profile has no address 0, and that every trigger and field names a
signal.
""",
    pm.Signal: """\
`type` decides how many registers a signal spans: `int16`, `uint16` and `bit` 1;
`int32`, `uint32` and `float32` 2; `int64`, `uint64` and `float64` 4; `string` `length`;
a `bool` in a `coil` or `discrete_input` is one bit. A number is `raw * scale + offset`
(an integer stays an integer when `scale` is 1 and `offset` 0); a signal with `enum`
gives the text for its raw code instead (`unknown(<code>)` for a code not listed);
`scale`/`offset` are for numeric types only, `enum` for integer, `bool` and `bit`
types. Strings are UTF-8, two bytes per register, with trailing NULs and spaces removed.
From `acme_conveyor_section.yaml`:

```yaml
signals:
  running: {table: coil, address: 0, type: bool, group: fast}
  jam: {table: input_register, address: 0, type: bit, bit: 1, group: fast}
  fault_code:
    table: input_register
    address: 1
    type: uint16
    group: fast
    enum: {0: ok, 1: jam_at_photo_eye, 2: motor_overload}
  speed_m_min: {table: input_register, address: 2, type: int16, scale: 0.1, unit: m/min, group: slow}
  motor_run_time_s: {table: input_register, address: 8, type: uint32, order: CDAB, unit: s, group: slow}
```
""",
    pm.ModbusEvent: """\
`fields` as a list keeps the signal names; as a mapping it renames them, so that the
events of several alike positions share field names (and one rule can take them all).
From `acme_pick_to_light.yaml`:

```yaml
events:
  confirm_1:
    trigger:
      kind: handshake
      signal: confirm_flag_1
      ack: {table: coil, address: 1, value: 0}
    fields: {qty_picked: picked_qty_1, display_qty: display_qty_1, location: location_1}
    constants: {position: 1}
```
""",
    pm.Trigger: """\
| `kind` | An event when | Notes |
|---|---|---|
| `counter` | the signal differs from the last poll | A step of more than one (modulo `modulus`) still makes one event, and the missed steps are set aside as a `counter_gap` (see `edge-agent outbox quarantine`). |
| `handshake` | the signal becomes true (non-zero) | With `ack`, the acknowledge is written only after the event is durably stored, and no new event is made until the device clears the flag. Without `ack`, one event per rising flag. |
| `rising` / `falling` | the signal goes from false to true / true to false | Not on the first poll. |
| `deadband` | the value differs from the last *emitted* value by more than `deadband` | The first poll only sets the reference. |

From `acme_conveyor_section.yaml`:

```yaml
events:
  jam:
    trigger: {kind: rising, signal: jam}
    fields: [fault_code, speed_m_min, infeed_count, discharge_count]
  speed_change:
    trigger: {kind: deadband, signal: speed_m_min, deadband: 5.0}
    fields: [speed_m_min, running]
```
""",
}


INTRO = """\
# Configuration reference

<!-- Generated by docs/gen_config_doc.py from the pydantic models; edit the models'
     Field descriptions (or the prose in the script), then run the script. -->

The agent reads one **site file** (YAML) that names its brokers, devices, rules and sinks,
and one **device profile** per kind of equipment (`device_profiles/<profile>.yaml`).
Everything is checked before the agent connects to anything:

```
edge-agent validate site.yaml
```

prints `site.yaml: ok (...)` and exits 0, or prints **every** problem it found, one per
line as `file:line: message`, and exits 2. Schema problems (a bad port, an unknown key) and
reference problems (a device naming a missing profile, a rule naming a missing device) are
reported together, sorted by file and line; problems inside a profile are reported with the
profile file's own path and line. For example:

```
site.yaml:6: brokers.local.port: must be at most 65535 (got 70000)
site.yaml:12: devices.SCN1.connection.broker: no broker 'locl' (did you mean 'local'?)
site.yaml:23: rules[close-station-1]: unknown key 'windw' (did you mean 'window_secs'?)
device_profiles/generic_json_scanner.yaml:14: events.read.fields.seq.type: must be one of 'string', 'int', 'float' or 'bool' (got 'integer')
```

Rules for every file:

- Keys are closed: an unknown key is an error (with the closest known key suggested).
- **name** values (site, broker, device, rule, sink, input, profile, event and field names)
  are 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit.
- **event type** values are lower_snake_case: `a`-`z`, `0`-`9` and `_`, starting with a
  letter, at most 64 characters (`carton_closed`).
- Relative paths (`profiles_dir`, `outbox.path`, `bearer_token_file`, `password_file`) are
  relative to the directory of the site file.
- Values are not coerced into other kinds: quote a value that must be a string
  (`protocol: "5"`), and write numbers without quotes.
- A file must be UTF-8, indented with spaces (no tabs), hold one YAML document and
  no duplicate keys.

Units are in the key names: `_secs` seconds, `_ms` milliseconds, `_mb` megabytes, `_g` grams.

## Site file
"""

TEMPLATES = """\
## Templates in rules

The `subject` and every value of `data` in `emit`, `terminate_on[].emit` and `on_timeout`
are *templates*. A template may contain references `${...}`:

| Reference | Value |
|---|---|
| `${<input>.<field>}` | The field of that input's device message, as decoded by its profile (`${scan.barcode}`). |
| `${<input>.time}` | The device time of that input's message, as ISO 8601 text. |
| `${<input>.device}` | The device id the input's message came from (useful when an input lists several devices). |
| `${key}` | The business key the inputs were joined on (the value of the rule's `key` field); in a `map` rule, the device id. |
| `${rule}` | The rule's name. |
| `${site}` | The site id. |
| `${reason}` | In `on_timeout`: the `reasons` of the missing inputs joined by `,` (a missing input without a reason gives `no_<input>`). |
| `${missing}` | In `on_timeout`: the names of the missing inputs joined by `,`. |

How a value is rendered:

- A value that is exactly one reference (`weight_g: ${weight.weight_g}`) keeps the type of
  what it refers to: a number stays a number, `true` stays a boolean. If the input did not
  arrive (a timeout event), the value is `null`.
- A value with text around references (`label: "${scan.barcode}/${key}"`) is a string;
  a reference to an input that did not arrive renders as empty text.
- Anything else (numbers, booleans, lists, strings without `${`) is copied as written.
- Input names cannot be `key`, `rule`, `site`, `reason` or `missing` (those names are taken
  by the references above).

`edge-agent validate` checks every reference: the input must be one of the rule's `inputs`,
and the field must be one the input's profile decodes for that event (or `time`/`device`).
An unclosed `${` is an error.

"""

EXAMPLE_PROSE = """\
## The example, explained

`edge_agent/examples/site.yaml` describes one carton-closing station: a barcode scanner (`SCN1`) and
a checkweigher (`CW1`) publish JSON over the local MQTT broker; the agent joins the scan
and the weight of each carton and sends business events to a WMS, an ERP and the MQTT bus.

```yaml
{example}
```

- `site: dc-demo-1` is part of every event's `source` and of the MQTT sink's topic prefix
  (`edge/{{site}}` becomes `edge/dc-demo-1`).
- `profiles_dir: ../../device_profiles` is relative to `edge_agent/examples/`, so the profiles are read
  from the repository's `device_profiles/`.
- `brokers.local` is the broker at `127.0.0.1:1883`, spoken to with MQTT 5.
- `devices.SCN1` uses the profile `generic_json_scanner`; its messages arrive on topics
  below `site/close1/scanner/SCN1` (the profile's event `read` is on `.../SCN1/read`).
  `CW1` likewise uses `generic_json_checkweigher` and its `weight` event.
- The rule `close-station-1` (`kind: correlate`) waits, for each `tracking_id`, for a `scan`
  (event `read` of `SCN1`) and a `weight` (event `weight` of `CW1`) at most 5 seconds apart
  (`window_secs: 5`, plus the default `allowed_lateness_secs: 1` for out-of-order messages).
  - When both arrived it emits `carton_closed` with the carton's barcode as `subject`, and
    `data` built from both messages: `weight_g: ${{weight.weight_g}}` stays a number,
    `station: CLOSE1` is a literal, `scan_time: ${{scan.time}}` is the scanner's own time.
  - `terminate_on`: a scan whose `barcode` is `NOREAD` or empty ends the correlation at
    once with `scan_no_read`; a weight for the same carton arriving later is absorbed.
  - `on_timeout`: if the window closes with an input missing, it emits `carton_exception`
    with `reason` `no_weight` or `no_scan` (from `reasons`), and `null` for the fields of
    the missing input.
- `sinks`: the WMS (`wms`, HTTP, CloudEvents batches) receives all three event types; the
  ERP (`erp`) only `carton_closed`; the `bus` sink publishes every event to the broker
  `local` on `edge/dc-demo-1/events/<type>`. Each sink has its own queue in the outbox, so
  a slow ERP does not hold back the WMS.
- `outbox.path: var/edge-agent.db` is the SQLite file (relative to `edge_agent/examples/`) where events
  are stored durably before they are sent.
"""


def render() -> str:
    lines = [INTRO, *sections(SITE_SECTIONS), TEMPLATES.rstrip("\n"), "",
             "## Device profile file", "",
             "One file per kind of equipment, named `<profile>.yaml` in `profiles_dir`; "
             "devices refer to it by that name. Its `protocol` decides which keys it has: "
             "`mqtt` for devices that publish JSON over a broker, `modbus` for devices the "
             "agent polls. See `device_profiles/` for complete profiles of both kinds.", "",
             *sections(PROFILE_SECTIONS),
             EXAMPLE_PROSE.format(example=EXAMPLE.read_text(encoding="utf-8").rstrip("\n"))]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python docs/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
