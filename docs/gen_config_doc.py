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

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"
EXAMPLE = ROOT / "edge_agent" / "examples" / "site.yaml"

# (heading, where the keys live, model, how other tables link to it)
Section = tuple[str, str, type[BaseModel], str]
SITE_SECTIONS: list[Section] = [
    ("Top level", "the site file itself", c.SiteConfig, "site"),
    ("Brokers", "`brokers.<name>`", c.BrokerConfig, "broker"),
    ("Devices", "`devices.<device id>`", c.DeviceConfig, "device"),
    ("Device connection: `kind: mqtt`", "`devices.<device id>.connection`", c.MqttConnection,
     "mqtt connection"),
    ("Rules: `kind: correlate`", "each item of `rules`", c.CorrelateRule, "correlate rule"),
    ("Rule inputs", "`rules[].inputs.<input name>`", c.InputSpec, "input"),
    ("Emitted event", "`rules[].emit` and `rules[].terminate_on[].emit`", c.EmitSpec, "emit"),
    ("Early termination", "each item of `rules[].terminate_on`", c.TerminateSpec, "terminate_on"),
    ("Condition", "`rules[].terminate_on[].when`", c.Condition, "condition"),
    ("Timeout event", "`rules[].on_timeout`", c.TimeoutSpec, "on_timeout"),
    ("Sinks: `kind: http`", "`sinks.<name>` with `kind: http`", c.HttpSinkConfig, "http sink"),
    ("Sinks: `kind: mqtt`", "`sinks.<name>` with `kind: mqtt`", c.MqttSinkConfig, "mqtt sink"),
    ("Sink retry", "`sinks.<name>.retry`", c.RetryConfig, "retry"),
    ("Outbox", "`outbox`", c.OutboxConfig, "outbox"),
    ("Logging", "`log`", c.LogConfig, "log"),
]
PROFILE_SECTIONS: list[Section] = [
    ("Profile", "the profile file itself", p.Profile, "profile"),
    ("Events: `protocol: mqtt`", "`events.<event name>`", p.MqttEventSpec, "mqtt event"),
    ("Device time", "`events.<event name>.time`", p.TimeSpec, "time"),
    ("Fields", "`events.<event name>.fields.<field name>`", p.FieldSpec, "field"),
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
    return out


# ruff: noqa: E501 (the Markdown below keeps long table rows and sample lines on one line)
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
| `${key}` | The business key the inputs were joined on (the value of the rule's `key` field). |
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
             "devices refer to it by that name. See `device_profiles/` for two complete "
             "profiles.", "",
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
