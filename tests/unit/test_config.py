"""Loading the site file: every mistake a site engineer can make is reported at once,
located as ``file:line`` and phrased so it says what is wrong and what is allowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.cli import main
from edge_agent.config import SiteConfig, load_site, read_yaml
from edge_agent.errors import ConfigError, ConfigProblem

REPO = Path(__file__).resolve().parents[2]

# A self-contained copy of edge_agent/examples/site.yaml (so edits to the example do not move lines).
BASE = """\
site: dc-test-1
profiles_dir: profiles

brokers:
  local:
    host: 127.0.0.1
    port: 1883
    protocol: "5"

devices:
  SCN1:
    profile: generic_json_scanner
    connection: {kind: mqtt, broker: local, topic_base: site/close1/scanner/SCN1}
  CW1:
    profile: generic_json_checkweigher
    connection: {kind: mqtt, broker: local, topic_base: site/close1/checkweigher/CW1}

rules:
  - name: close-station-1
    kind: correlate
    key: tracking_id
    window_secs: 5
    inputs:
      scan: {device: SCN1, event: read}
      weight: {device: CW1, event: weight}
    emit:
      type: carton_closed
      subject: ${scan.barcode}
      data:
        carton_id: ${scan.barcode}
        weight_g: ${weight.weight_g}
        station: CLOSE1
        scan_time: ${scan.time}
    terminate_on:
      - input: scan
        when: {field: barcode, in: ["NOREAD", ""]}
        emit:
          type: scan_no_read
          data: {tracking_id: "${key}", scanner: "${scan.device}"}
    on_timeout:
      type: carton_exception
      reasons: {weight: no_weight, scan: no_scan}
      data:
        reason: ${reason}
        carton_id: ${scan.barcode}

sinks:
  wms:
    kind: http
    url: http://127.0.0.1:8081/events
    event_types: [carton_closed, carton_exception, scan_no_read]
  bus:
    kind: mqtt
    broker: local
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Where the site file goes; the shipped profiles are copied next to it."""
    shutil.copytree(REPO / "device_profiles", tmp_path / "profiles")
    return tmp_path / "site.yaml"


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base config"
    return text.replace(old, new)


def line(text: str, snippet: str) -> int:
    """1-based line of the one line of ``text`` that contains ``snippet``."""
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if snippet in ln]
    assert len(hits) == 1, f"{snippet!r} is on lines {hits}"
    return hits[0]


def problems(path: Path, text: str | bytes) -> list[ConfigProblem]:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_site(path)
    return info.value.problems


def only(path: Path, text: str | bytes) -> ConfigProblem:
    found = problems(path, text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def assert_problem(p: ConfigProblem, path: Path, lineno: int | None, *parts: str) -> None:
    assert (p.file, p.line) == (str(path), lineno), str(p)
    for part in parts:
        assert part in p.message, str(p)


# --- the good case -------------------------------------------------------------------------


def test_base_config_loads_with_its_profiles(site: Path) -> None:
    site.write_text(BASE)
    cfg, profiles = load_site(site)
    assert isinstance(cfg, SiteConfig)
    assert set(profiles) == {"generic_json_scanner", "generic_json_checkweigher"}
    assert cfg.rules[0].inputs["scan"].device == "SCN1"


def test_shipped_example_loads() -> None:
    cfg, profiles = load_site(REPO / "edge_agent" / "examples" / "site.yaml")
    assert cfg.site == "dc-demo-1"
    assert len(profiles) == 2


# --- schema mistakes -----------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_known_key(site: Path) -> None:
    text = edit(BASE, "window_secs: 5", "windw: 5")
    p = only(site, text)
    assert_problem(p, site, line(text, "windw"), "rules[close-station-1]: unknown key 'windw'",
                   "(did you mean 'window_secs'?)")


def test_unknown_key_suggests_unit_suffixed_key(site: Path) -> None:
    text = edit(BASE, "port: 1883", "port: 1883\n    keepalive: 30")
    p = only(site, text)
    assert_problem(p, site, line(text, "keepalive"),
                   "brokers.local: unknown key 'keepalive' (did you mean 'keepalive_secs'?)")


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(site: Path) -> None:
    text = BASE + "colour: red\n"
    p = only(site, text)
    assert_problem(p, site, line(text, "colour"), "unknown key 'colour'",
                   "allowed keys: brokers, devices, log, outbox, profiles_dir, rules, sinks, site")


def test_missing_required_key(site: Path) -> None:
    text = edit(BASE, "    key: tracking_id\n", "")
    p = only(site, text)
    assert_problem(p, site, line(text, "- name: close-station-1"),
                   "rules[close-station-1]: missing required key 'key'")


def test_wrong_type(site: Path) -> None:
    text = edit(BASE, "window_secs: 5", "window_secs: soon")
    p = only(site, text)
    assert_problem(p, site, line(text, "window_secs"),
                   "rules[close-station-1].window_secs: must be a number (got 'soon')")


def test_out_of_range_number(site: Path) -> None:
    text = edit(BASE, "port: 1883", "port: 70000")
    p = only(site, text)
    assert_problem(p, site, line(text, "port:"),
                   "brokers.local.port: must be at most 65535 (got 70000)")


def test_bad_enum_value(site: Path) -> None:
    text = edit(BASE, 'protocol: "5"', 'protocol: "4"')
    p = only(site, text)
    assert_problem(p, site, line(text, "protocol"),
                   "brokers.local.protocol: must be one of '5' or '3.1.1' (got '4')")


def test_unknown_sink_kind(site: Path) -> None:
    text = edit(BASE, "kind: mqtt\n    broker: local", "kind: kafka\n    broker: local")
    p = only(site, text)
    assert_problem(p, site, line(text, "  bus:"),
                   "sinks.bus: unknown kind 'kafka' (must be one of 'http', 'mqtt')")


def test_topic_base_with_a_wildcard(site: Path) -> None:
    text = edit(BASE, "topic_base: site/close1/scanner/SCN1", "topic_base: site/+/scanner/SCN1")
    p = only(site, text)
    assert_problem(p, site, line(text, "site/+/"), "devices.SCN1.connection.topic_base:",
                   "without '+', '#'", "(got 'site/+/scanner/SCN1')")


def test_bad_name_as_a_mapping_key(site: Path) -> None:
    text = edit(BASE, "  CW1:\n", "  CW 1:\n").replace("device: CW1", "device: CW 1")
    key, ref = problems(site, text)
    assert_problem(key, site, line(text, "  CW 1:"), "devices: key 'CW 1' must be a name",
                   "letters, digits")
    # Name | list[Name]: the string member's complaint, not "or a list"
    assert_problem(ref, site, line(text, "device: CW 1"),
                   "rules[close-station-1].inputs.weight.device: must be a name of letters",
                   "(got 'CW 1')")
    assert "or a list" not in ref.message


def test_device_of_an_input_is_neither_a_name_nor_a_list(site: Path) -> None:
    text = edit(BASE, "{device: CW1, event: weight}", "{device: 7, event: weight}")
    p = only(site, text)
    assert_problem(p, site, line(text, "device: 7"),
                   "rules[close-station-1].inputs.weight.device: must be a string or a list "
                   "(got 7)")


def test_condition_needs_in_or_equals(site: Path) -> None:
    text = edit(BASE, 'when: {field: barcode, in: ["NOREAD", ""]}', "when: {field: barcode}")
    p = only(site, text)
    assert_problem(p, site, line(text, "when:"), "terminate_on[0].when:",
                   "exactly one of 'in' or 'equals'")


# --- reference mistakes --------------------------------------------------------------------


def test_device_references_a_missing_profile(site: Path) -> None:
    text = edit(BASE, "profile: generic_json_scanner", "profile: generic_json_scaner")
    p = only(site, text)
    assert_problem(p, site, line(text, "generic_json_scaner"),
                   "devices.SCN1.profile: no profile 'generic_json_scaner'",
                   "(did you mean 'generic_json_scanner'?)")


def test_device_references_a_missing_broker(site: Path) -> None:
    text = edit(BASE, "broker: local, topic_base: site/close1/checkweigher",
                "broker: plant, topic_base: site/close1/checkweigher")
    p = only(site, text)
    assert_problem(p, site, line(text, "broker: plant"),
                   "devices.CW1.connection.broker: no broker 'plant' (brokers: local)")


def test_rule_input_references_a_missing_device(site: Path) -> None:
    text = edit(BASE, "{device: CW1, event: weight}", "{device: CW2, event: weight}")
    p = only(site, text)
    assert_problem(p, site, line(text, "device: CW2"),
                   "rules[close-station-1].inputs.weight.device: no device 'CW2' "
                   "(devices: CW1, SCN1)")


def test_rule_input_names_an_event_the_profile_lacks(site: Path) -> None:
    text = edit(BASE, "{device: CW1, event: weight}", "{device: CW1, event: wieght}")
    p = only(site, text)
    assert_problem(p, site, line(text, "event: wieght"),
                   "rules[close-station-1].inputs.weight.event: profile "
                   "'generic_json_checkweigher' has no event 'wieght' (did you mean 'weight'?)")


def test_rule_key_is_not_a_field_of_the_event(site: Path) -> None:
    text = edit(BASE, "key: tracking_id", "key: carton_no")
    found = problems(site, text)
    # both inputs lack it: one problem per profile event, both on the key's line
    assert [p.line for p in found] == [line(text, "key: carton_no")] * 2
    assert_problem(found[0], site, line(text, "key: carton_no"),
                   "rules[close-station-1].key: generic_json_scanner.read (input 'scan') has no "
                   "field 'carton_no'", "barcode, seq, symbology, tracking_id")


def test_template_names_a_missing_field(site: Path) -> None:
    text = edit(BASE, "carton_id: ${scan.barcode}\n        weight_g",
                "carton_id: ${scan.nosuch}\n        weight_g")
    p = only(site, text)
    assert_problem(p, site, line(text, "${scan.nosuch}"),
                   "rules[close-station-1].emit.data.carton_id: '${scan.nosuch}': "
                   "generic_json_scanner.read has no field 'nosuch'")


def test_template_names_an_unknown_input(site: Path) -> None:
    text = edit(BASE, "subject: ${scan.barcode}", "subject: ${scn.barcode}")
    p = only(site, text)
    assert_problem(p, site, line(text, "${scn.barcode}"),
                   "rules[close-station-1].emit.subject: '${scn.barcode}': no input 'scn'",
                   "(did you mean 'scan'?)")


def test_template_names_an_unknown_builtin(site: Path) -> None:
    text = edit(BASE, "reason: ${reason}", "reason: ${reasn}")
    p = only(site, text)
    assert_problem(p, site, line(text, "${reasn}"),
                   "on_timeout.data.reason: unknown reference '${reasn}' "
                   "(did you mean '${reason}'?)")


def test_template_names_an_input_without_a_field(site: Path) -> None:
    text = edit(BASE, "scan_time: ${scan.time}", "scan_time: ${scan}")
    p = only(site, text)
    assert_problem(p, site, line(text, "scan_time"),
                   "'${scan}' names an input, not a field; use '${scan.<field>}'")


def test_unclosed_template(site: Path) -> None:
    text = edit(BASE, "station: CLOSE1", "station: ${key")
    p = only(site, text)
    assert_problem(p, site, line(text, "station:"),
                   "emit.data.station: unclosed '${' in template '${key'")


def test_input_named_like_a_builtin_is_reserved(site: Path) -> None:
    text = edit(BASE, "      weight: {device: CW1", "      key: {device: CW1")
    p, *rest = problems(site, text)
    assert len(rest) == 2  # and the two ${weight...} references now name no input
    assert_problem(p, site, line(text, "key: {device"),
                   "rules[close-station-1].inputs.key: input name 'key' is reserved for ${key}")


def test_terminate_on_names_an_unknown_input(site: Path) -> None:
    text = edit(BASE, "- input: scan", "- input: scna")
    p = only(site, text)
    assert_problem(p, site, line(text, "input: scna"),
                   "rules[close-station-1].terminate_on[0].input: no input 'scna' "
                   "(did you mean 'scan'?)")


def test_terminate_condition_field_is_not_in_the_profile(site: Path) -> None:
    text = edit(BASE, "when: {field: barcode,", "when: {field: barcod,")
    p = only(site, text)
    assert_problem(p, site, line(text, "field: barcod,"),
                   "terminate_on[0].when.field: generic_json_scanner.read has no field 'barcod' "
                   "(did you mean 'barcode'?)")


MAP_RULE = """\
  - name: scans-seen
    kind: map
    inputs: {scan: {device: SCN1, event: read}}
    when: {field: barcod, equals: "NOREAD"}
    emit: {type: scan_no_read, data: {tracking_id: "${scan.tracking_id}"}}
"""


@pytest.mark.parametrize("kind_extra", ["map", "count"])
def test_rule_condition_field_is_not_in_the_profile(site: Path, kind_extra: str) -> None:
    """Issue 7 item 7: a misspelt condition field silently filtered out everything."""
    rule = MAP_RULE if kind_extra == "map" else MAP_RULE.replace(
        "kind: map", "kind: count\n    key: tracking_id\n    threshold: 2")
    text = edit(BASE, "\nsinks:", rule + "\nsinks:")
    p = only(site, text)
    assert_problem(p, site, line(text, "field: barcod,"),
                   "rules[scans-seen].when.field: generic_json_scanner.read has no field 'barcod' "
                   "(did you mean 'barcode'?)")


def test_on_timeout_reason_names_an_unknown_input(site: Path) -> None:
    text = edit(BASE, "reasons: {weight: no_weight,", "reasons: {weigth: no_weight,")
    p = only(site, text)
    assert_problem(p, site, line(text, "weigth"),
                   "on_timeout.reasons.weigth: no input 'weigth' (did you mean 'weight'?)")


def test_sink_event_type_no_rule_emits(site: Path) -> None:
    text = edit(BASE, "carton_exception, scan_no_read]", "carton_exeption, scan_no_read]")
    p = only(site, text)
    assert_problem(p, site, line(text, "carton_exeption"),
                   "sinks.wms.event_types[1]: no rule emits 'carton_exeption'",
                   "(did you mean 'carton_exception'?)")


def test_mqtt_sink_references_a_missing_broker(site: Path) -> None:
    text = edit(BASE, "kind: mqtt\n    broker: local", "kind: mqtt\n    broker: cloud")
    p = only(site, text)
    assert_problem(p, site, line(text, "broker: cloud"),
                   "sinks.bus.broker: no broker 'cloud' (brokers: local)")


def test_duplicate_rule_names(site: Path) -> None:
    rule = BASE[BASE.index("  - name: close-station-1"):BASE.index("\nsinks:")]
    text = edit(BASE, "\nsinks:", rule.replace("type: carton_", "type: other_") + "\nsinks:")
    found = problems(site, text)
    lines = [i for i, ln in enumerate(text.splitlines(), 1) if "name: close-station-1" in ln]
    assert len(found) == 1, found
    assert_problem(found[0], site, lines[1],
                   "rule name 'close-station-1' is already used at line "
                   f"{lines[0]}; names must be unique")


def test_bearer_token_file_missing(site: Path) -> None:
    text = edit(BASE, "url: http://127.0.0.1:8081/events",
                "url: http://127.0.0.1:8081/events\n    bearer_token_file: secrets/wms.token")
    p = only(site, text)
    assert_problem(p, site, line(text, "bearer_token_file"),
                   "sinks.wms.bearer_token_file: no such file", "secrets/wms.token")


def test_bearer_token_file_present_is_fine(site: Path) -> None:
    (site.parent / "wms.token").write_text("s3cret\n")
    site.write_text(edit(BASE, "url: http://127.0.0.1:8081/events",
                         "url: http://127.0.0.1:8081/events\n    bearer_token_file: wms.token"))
    load_site(site)


def test_password_file_without_username(site: Path) -> None:
    (site.parent / "mqtt.pw").write_text("pw\n")
    text = edit(BASE, 'protocol: "5"', 'protocol: "5"\n    password_file: mqtt.pw')
    p = only(site, text)
    assert_problem(p, site, line(text, "password_file"),
                   "brokers.local.password_file: a password is only sent with a username")


def test_profiles_dir_missing(site: Path) -> None:
    text = edit(BASE, "profiles_dir: profiles", "profiles_dir: no/such/dir")
    p = only(site, text)
    assert_problem(p, site, line(text, "profiles_dir"), "profiles_dir: no directory",
                   "no/such/dir")


def test_broken_profile_is_reported_in_the_profile_file(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(site.parent)  # profile paths are shown relative to the working directory
    prof = Path("profiles/generic_json_checkweigher.yaml")
    ptext = edit(prof.read_text(), "type: float, min: 0", "type: double, min: 0")
    prof.write_text(ptext)
    text = edit(BASE, "port: 1883", "port: 0")
    found = problems(Path("site.yaml"), text)
    assert [(p.file, p.line) for p in found] == [
        (str(prof), line(ptext, "type: double")),  # sorted by file, then line
        ("site.yaml", line(text, "port: 0")),
    ]
    assert "events.weight.fields.weight_g.type: must be one of 'string', 'int', 'float' or " \
        "'bool' (got 'double')" in found[0].message
    # the devices using the broken profile are not also told it is missing
    assert not any("no profile" in p.message for p in found)


# --- several at once -----------------------------------------------------------------------


def test_schema_and_reference_errors_are_reported_together(site: Path) -> None:
    text = BASE
    text = edit(text, "port: 1883", "port: 70000")  # schema: out of range
    text = edit(text, "profile: generic_json_checkweigher", "profile: checkweigher_v9")  # ref
    text = edit(text, "broker: local, topic_base: site/close1/scanner",
                "broker: plant, topic_base: site/close1/scanner")  # ref
    text = edit(text, "window_secs: 5", "windw: 5")  # schema: unknown key in a rule ...
    text = edit(text, "{device: CW1, event: weight}", "{device: CW7, event: weight}")  # ... + ref
    text = edit(text, "url: http://127.0.0.1:8081/events", "url: ftp://wms/events")  # schema
    text = edit(text, "carton_exception, scan_no_read]", "carton_exception, no_read]")  # ref
    found = problems(site, text)
    assert [p.line for p in found] == [
        line(text, "port: 70000"),
        line(text, "broker: plant"),
        line(text, "checkweigher_v9"),
        line(text, "windw"),
        line(text, "device: CW7"),
        line(text, "ftp://"),
        line(text, "no_read]"),
    ]
    assert all(p.file == str(site) for p in found)
    messages = "\n".join(p.message for p in found)
    for part in ["must be at most 65535", "no broker 'plant'", "no profile 'checkweigher_v9'",
                 "unknown key 'windw'", "no device 'CW7'", "must be a URL starting with http",
                 "no rule emits 'no_read'"]:
        assert part in messages


def test_a_malformed_value_is_not_also_reported_as_a_bad_reference(site: Path) -> None:
    text = edit(BASE, "profile: generic_json_scanner", "profile: [generic_json_scanner]")
    p = only(site, text)
    assert_problem(p, site, line(text, "profile: [generic"),
                   "devices.SCN1.profile: must be a string (got a list)")


def test_a_malformed_section_does_not_cascade(site: Path) -> None:
    text = edit(BASE, "brokers:\n  local:\n    host: 127.0.0.1\n    port: 1883\n"
                '    protocol: "5"\n', "brokers: local\n")
    p = only(site, text)
    assert_problem(p, site, line(text, "brokers: local"),
                   "brokers: must be a mapping of keys (got 'local')")


# --- files that are not a config at all ----------------------------------------------------


def test_duplicate_yaml_key(site: Path) -> None:
    text = edit(BASE, "port: 1883", "port: 1883\n    port: 1884")
    p = only(site, text)
    assert_problem(p, site, line(text, "port: 1884"), 'duplicate key "port"',
                   "each key may appear once")


def test_yaml_syntax_error(site: Path) -> None:
    text = edit(BASE, "event_types: [carton_closed,", "event_types: [carton_closed:,")
    text = edit(text, "scan_no_read]", "scan_no_read\n")
    p = only(site, text)
    assert p.file == str(site) and p.line is not None
    assert p.message.startswith("YAML syntax:")
    assert f"started at line {line(text, 'event_types')}" in p.message


def test_tab_indentation(site: Path) -> None:
    text = edit(BASE, "    port: 1883", "\tport: 1883")
    p = only(site, text)
    assert_problem(p, site, line(text, "\tport"), "tab character at column 1",
                   "indented with spaces")


@pytest.mark.parametrize(
    ("content", "lineno", "message"),
    [
        ("", 1, "the site file is empty; it must be a mapping of keys"),
        ("# nothing here\n", 1, "the site file is empty"),
        ("- site: a\n- site: b\n", 1, "the site file must be a mapping of keys, not a list"),
        ("dc-east-1\n", 1, "must be a mapping of keys, not a single value ('dc-east-1')"),
        ("site: a\n---\nsite: b\n", 2, "a second YAML document"),
        (b"site: a\nsinks: {}\n# caf\xe9\n", 3, "not UTF-8 text (byte 0xe9)"),
    ],
)
def test_files_that_are_not_a_config(
    site: Path, content: str | bytes, lineno: int, message: str
) -> None:
    p = only(site, content)
    assert_problem(p, site, lineno, message)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_site(path)
    [p] = info.value.problems
    assert (p.file, p.line, p.message) == (str(path), None, "file not found")
    assert str(p) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_yaml(tmp_path)
    [p] = info.value.problems
    assert (p.file, p.line) == (str(tmp_path), None) and "is a directory" in p.message


# --- the command line ----------------------------------------------------------------------


def test_cli_validate_reports_every_problem_and_exits_2(site: Path) -> None:
    text = edit(BASE, "port: 1883", "port: 70000")
    text = edit(text, "{device: CW1, event: weight}", "{device: CW7, event: weight}")
    site.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(site)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [
        f"{site}:{line(text, 'port: 70000')}: brokers.local.port: must be at most 65535 "
        "(got 70000)",
        f"{site}:{line(text, 'CW7')}: rules[close-station-1].inputs.weight.device: no device "
        "'CW7' (devices: CW1, SCN1)",
        "2 problem(s) found",
    ]


def test_cli_validate_the_example_is_ok() -> None:
    example = REPO / "edge_agent" / "examples" / "site.yaml"
    result = CliRunner().invoke(main, ["validate", str(example)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{example}: ok (")


def test_cli_validate_as_a_process(site: Path) -> None:
    site.write_text(edit(BASE, 'protocol: "5"', 'protocol: "4"'))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "validate", str(site)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert f"{site}:{line(BASE, 'protocol')}: brokers.local.protocol: must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the reference ------------------------------------------------------------------------


def test_docs_config_md_is_generated_from_the_models() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "docs" / "gen_config_doc.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr + " (run: python docs/gen_config_doc.py)"
