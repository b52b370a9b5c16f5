"""Modbus read planner: the fewest requests (proved against an exhaustive search), every
signal read exactly once and whole, limits and gaps respected, groups and tables never
mixed, 1-based addresses converted, and replies decoded into values."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from edge_agent.codecs import encode
from edge_agent.connectors.modbus_plan import ReadRequest, decode_request, plan
from edge_agent.profiles_modbus import BIT_TABLES, ModbusProfile, Signal

# --- helpers -------------------------------------------------------------------------------


def make_profile(signals: dict[str, dict[str, Any]], **kw: Any) -> ModbusProfile:
    return ModbusProfile.model_validate({
        "version": 1, "vendor": "Acme", "model": "T", "protocol": "modbus",
        "poll_groups": kw.pop("poll_groups", {"default": {"interval_ms": 100}}),
        "signals": signals, **kw,
    })


def proto_span(profile: ModbusProfile, name: str) -> tuple[int, int]:
    s = profile.signals[name]
    start = s.address - profile.addressing
    return start, start + s.registers()


def feasible(spans: list[tuple[int, int]], limit: int, max_gap: int) -> bool:
    """Whether one request may read exactly these signals: span within the limit and no
    unread hole longer than max_gap between them."""
    spans = sorted(spans)
    end = spans[0][1]
    for a, b in spans[1:]:
        if a - end > max_gap:
            return False
        end = max(end, b)
    return end - spans[0][0] <= limit


def partitions(items: list[Any]) -> Any:
    """Every set partition of items (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        for i in range(len(p)):
            yield p[:i] + [[first, *p[i]]] + p[i + 1:]
        yield [[first], *p]


def exhaustive_min(spans: list[tuple[int, int]], limit: int, max_gap: int) -> int:
    """Fewest requests over *all* ways of grouping the signals (no sweep assumed)."""
    best = len(spans)
    for p in partitions(spans):
        if len(p) < best and all(feasible(g, limit, max_gap) for g in p):
            best = len(p)
    return best


def dp_min(spans: list[tuple[int, int]], limit: int, max_gap: int) -> int:
    """Fewest requests when each request reads a run of the signals sorted by address.
    (That runs suffice is what test_greedy_matches_exhaustive_minimum checks.)"""
    spans = sorted(spans)
    best = [0] + [len(spans) + 1] * len(spans)
    for i in range(1, len(spans) + 1):
        for j in range(i):
            if feasible(spans[j:i], limit, max_gap):
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


def limit_for(profile: ModbusProfile, table: str, max_registers: int = 125,
              max_bits: int = 2000) -> int:
    if table in BIT_TABLES:
        return min(max_bits, profile.max_bits_per_read)
    return min(max_registers, profile.max_registers_per_read)


def check_plan(profile: ModbusProfile, result: dict[str, list[ReadRequest]], *,
               max_registers: int = 125, max_bits: int = 2000, max_gap: int = 8) -> None:
    """Every invariant of a plan, and that its size is the DP minimum per (group, table)."""
    seen: Counter[str] = Counter()
    by_key: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for name, s in profile.signals.items():
        by_key.setdefault((s.group, s.table), []).append(proto_span(profile, name))
    count: Counter[tuple[str, str]] = Counter()
    for group, requests in result.items():
        assert group in profile.poll_groups
        for req in requests:
            count[(group, req.table)] += 1
            limit = limit_for(profile, req.table, max_registers, max_bits)
            assert req.count >= 1 and req.count <= limit
            assert req.count <= (2000 if req.table in BIT_TABLES else 125)
            assert 0 <= req.start and req.start + req.count <= 65536
            spans = []
            for name, offset, _dec in req.items:
                seen[name] += 1
                sig = profile.signals[name]
                assert sig.group == group and sig.table == req.table  # never mixed
                start, end = proto_span(profile, name)
                assert req.start + offset == start  # 1-based converted
                assert 0 <= offset and offset + sig.registers() <= req.count  # never split
                spans.append((start, end))
            # the request is exactly as wide as its signals, and bridges only small gaps
            assert min(a for a, _ in spans) == req.start
            assert max(b for _, b in spans) == req.start + req.count
            assert feasible(spans, limit, max_gap)
    assert seen == Counter(profile.signals.keys())  # every signal exactly once
    for (group, table), spans in by_key.items():
        limit = limit_for(profile, table, max_registers, max_bits)
        assert count[(group, table)] == dp_min(spans, limit, max_gap), (group, table)
    assert sum(count.values()) == sum(len(v) for v in result.values())


# --- a realistic 200-signal sorter PLC -----------------------------------------------------


def sorter_profile(**kw: Any) -> ModbusProfile:
    """A cross-belt sorter's PLC, 1-based addresses as in its manual: photo-eyes and
    diverter outputs polled fast, counters and a handshake block, slow drive data."""
    sig: dict[str, dict[str, Any]] = {}
    di, co, hr, ir = "discrete_input", "coil", "holding_register", "input_register"
    for i in range(40):  # photo-eyes along the induction, one block
        sig[f"pe_induct_{i}"] = {"table": di, "address": 1 + i, "type": "bool", "group": "fast"}
    for i in range(24):  # photo-eyes at the chutes: another I/O card far away
        sig[f"pe_chute_{i}"] = {"table": di, "address": 2101 + i * 2, "type": "bool",
                                "group": "fast"}
    for i in range(24):
        sig[f"divert_{i}"] = {"table": co, "address": 1 + i, "type": "bool", "group": "fast"}
    for i in range(8):
        sig[f"beacon_{i}"] = {"table": co, "address": 601 + i, "type": "bool", "group": "fast"}
    for i in range(4):
        sig[f"maint_flag_{i}"] = {"table": co, "address": 3001 + i * 20, "type": "bool",
                                  "group": "slow"}
    for i in range(20):  # per-chute carton counters, uint32 word-swapped
        sig[f"chute_count_{i}"] = {"table": hr, "address": 101 + 2 * i, "type": "uint32",
                                   "order": "CDAB", "group": "fast"}
    for i in range(8):  # status words, after a 12-register hole
        sig[f"status_{i}"] = {"table": hr, "address": 153 + i, "type": "uint16",
                              "group": "fast"}
    for i in range(16):  # handshake/status bits, all in register 170
        sig[f"flag_{i}"] = {"table": hr, "address": 170, "type": "bit", "bit": i,
                            "group": "fast"}
    sig["carton_id"] = {"table": hr, "address": 175, "type": "string", "length": 10,
                        "group": "fast"}
    for i in range(30):  # motor currents
        sig[f"motor_current_{i}"] = {"table": ir, "address": 1001 + 2 * i, "type": "float32",
                                     "unit": "A", "group": "slow"}
    for i in range(10):  # temperatures in 0.1 degC, after a 10-register hole
        sig[f"temp_{i}"] = {"table": ir, "address": 1071 + i, "type": "int16", "scale": 0.1,
                            "unit": "degC", "group": "slow"}
    for i in range(4):
        sig[f"run_hours_{i}"] = {"table": ir, "address": 1201 + 4 * i, "type": "uint64",
                                 "group": "slow"}
    sig["firmware"] = {"table": ir, "address": 1301, "type": "string", "length": 8,
                       "group": "slow"}
    sig["belt_speed"] = {"table": ir, "address": 1401, "type": "float64", "unit": "m/s",
                         "group": "slow"}
    for i in range(8):  # fault codes, every third register
        sig[f"fault_{i}"] = {"table": hr, "address": 2001 + 3 * i, "type": "uint16",
                             "enum": {0: "ok", 1: "jam", 2: "overload"}, "group": "slow"}
    sig["energy_wh"] = {"table": hr, "address": 2051, "type": "int64", "group": "slow"}
    return make_profile(sig, addressing=1, poll_groups={"fast": {"interval_ms": 50},
                                                         "slow": {"interval_ms": 1000}}, **kw)


def test_sorter_profile_has_200_signals() -> None:
    assert len(sorter_profile().signals) == 200


@pytest.mark.parametrize("max_gap", [0, 1, 8, 50, 500])
@pytest.mark.parametrize("max_registers", [125, 40, 12])
def test_sorter_plan_is_minimal_and_complete(max_registers: int, max_gap: int) -> None:
    profile = sorter_profile()
    result = plan(profile, max_registers=max_registers, max_gap=max_gap)
    assert set(result) == {"fast", "slow"}
    check_plan(profile, result, max_registers=max_registers, max_gap=max_gap)


def test_sorter_plan_with_defaults_in_detail() -> None:
    result = plan(sorter_profile())
    fast = [(r.table, r.start, r.count) for r in result["fast"]]
    assert fast == [
        ("coil", 0, 24), ("coil", 600, 8),
        ("discrete_input", 0, 40), ("discrete_input", 2100, 47),  # every other bit, bridged
        ("holding_register", 100, 40),  # 20 uint32 counters; then a 12-register hole
        ("holding_register", 152, 8),  # status words; a 9-register hole (> max_gap)
        ("holding_register", 169, 15),  # the 16 bits of register 169, the string at 174
    ]
    slow = [(r.table, r.start, r.count) for r in result["slow"]]
    assert slow == [
        ("coil", 3000, 1), ("coil", 3020, 1), ("coil", 3040, 1), ("coil", 3060, 1),
        ("holding_register", 2000, 22),  # fault codes every third register (gap 2)
        ("holding_register", 2050, 4),  # energy, 28 registers further
        ("input_register", 1000, 60), ("input_register", 1070, 10),
        ("input_register", 1200, 16), ("input_register", 1300, 8), ("input_register", 1400, 4),
    ]
    # with max_gap=25 the maintenance flags (19 apart) and the temperatures merge
    assert len(plan(sorter_profile(), max_gap=25)["slow"]) == 7


def test_device_limits_from_the_profile_apply() -> None:
    profile = sorter_profile(max_registers_per_read=16, max_bits_per_read=10)
    result = plan(profile)
    assert max(r.count for g in result.values() for r in g if r.table not in BIT_TABLES) <= 16
    assert max(r.count for g in result.values() for r in g if r.table in BIT_TABLES) <= 10
    check_plan(profile, result)
    # the caller's (connection's) limit applies too, whichever is smaller
    check_plan(profile, plan(profile, max_registers=10, max_bits=3), max_registers=10,
               max_bits=3)


def test_protocol_limits_cap_the_callers() -> None:
    sig = {f"c{i}": {"table": "coil", "address": i, "type": "bool"} for i in range(2500)}
    sig |= {f"r{i}": {"table": "holding_register", "address": i, "type": "uint16"}
            for i in range(300)}
    result = plan(make_profile(sig), max_registers=1000, max_bits=5000)["default"]
    assert [(r.table, r.count) for r in result] == [
        ("coil", 2000), ("coil", 500),
        ("holding_register", 125), ("holding_register", 125), ("holding_register", 50)]


def test_gaps_bridged_only_up_to_max_gap() -> None:
    sig = {"a": {"table": "holding_register", "address": 0, "type": "uint32"},
           "b": {"table": "holding_register", "address": 10, "type": "uint16"},  # gap 8
           "c": {"table": "holding_register", "address": 20, "type": "uint16"}}  # gap 9
    result = plan(make_profile(sig), max_gap=8)["default"]
    assert [(r.start, r.count) for r in result] == [(0, 11), (20, 1)]
    assert [[i.name for i in r.items] for r in result] == [["a", "b"], ["c"]]
    assert len(plan(make_profile(sig), max_gap=9)["default"]) == 1
    assert len(plan(make_profile(sig), max_gap=0)["default"]) == 3


def test_adjacent_signals_merge_with_max_gap_zero() -> None:
    sig = {f"s{i}": {"table": "input_register", "address": 2 * i, "type": "float32"}
           for i in range(5)}
    (req,) = plan(make_profile(sig), max_gap=0)["default"]
    assert (req.start, req.count) == (0, 10)
    assert [i.offset for i in req.items] == [0, 2, 4, 6, 8]


def test_one_based_addresses_are_converted() -> None:
    sig = {"first": {"table": "holding_register", "address": 1, "type": "uint16"},
           "coil": {"table": "coil", "address": 1, "type": "bool"},
           "top": {"table": "input_register", "address": 65536, "type": "uint16"}}
    result = plan(make_profile(sig, addressing=1))["default"]
    assert sorted((r.table, r.start) for r in result) == [
        ("coil", 0), ("holding_register", 0), ("input_register", 65535)]


def test_poll_groups_and_tables_never_mix() -> None:
    sig = {"a": {"table": "holding_register", "address": 0, "type": "uint16", "group": "g1"},
           "b": {"table": "holding_register", "address": 1, "type": "uint16", "group": "g2"},
           "c": {"table": "input_register", "address": 2, "type": "uint16", "group": "g1"},
           "d": {"table": "holding_register", "address": 2, "type": "uint16", "group": "g1"}}
    result = plan(make_profile(sig, poll_groups={"g1": {"interval_ms": 10},
                                                 "g2": {"interval_ms": 10},
                                                 "idle": {"interval_ms": 10}}))
    assert {g: [(r.table, r.start, r.count) for r in rs] for g, rs in result.items()} == {
        "g1": [("holding_register", 0, 3), ("input_register", 2, 1)],
        "g2": [("holding_register", 1, 1)],
        "idle": [],
    }


def test_a_multi_register_value_is_never_split() -> None:
    # 3 uint16 then a uint64 at 3..6: with a limit of 5 the uint64 cannot join the first
    # request, so it starts a new one rather than being cut at the limit
    sig = {f"w{i}": {"table": "holding_register", "address": i, "type": "uint16"}
           for i in range(3)}
    sig["big"] = {"table": "holding_register", "address": 3, "type": "uint64"}
    result = plan(make_profile(sig, max_registers_per_read=5))["default"]
    assert [(r.start, r.count) for r in result] == [(0, 3), (3, 4)]


def test_signal_longer_than_a_read_or_outside_the_address_space_is_refused() -> None:
    long = {"s": {"table": "holding_register", "address": 0, "type": "string", "length": 20}}
    with pytest.raises(ValueError, match="more than one read"):
        plan(make_profile(long, max_registers_per_read=16))
    edge = {"s": {"table": "holding_register", "address": 65535, "type": "uint32"}}
    with pytest.raises(ValueError, match="outside"):
        plan(make_profile(edge))
    with pytest.raises(ValueError, match="max_gap"):
        plan(make_profile(edge), max_gap=-1)


# --- optimality: greedy == exhaustive minimum ----------------------------------------------

SHAPES = [("uint16", {}), ("uint32", {}), ("float32", {}), ("uint64", {}),
          ("bit", {"bit": 3}), ("string", {"length": 3}), ("string", {"length": 5})]


@pytest.mark.parametrize("seed", range(40))
def test_greedy_matches_exhaustive_minimum(seed: int) -> None:
    """Against every partition of the signals (Bell(7) = 877), with overlapping signals,
    duplicate addresses, random limits and gaps: the sweep is never beaten."""
    rng = random.Random(seed)
    for _ in range(25):
        n = rng.randint(1, 7)
        limit, gap = rng.randint(5, 12), rng.randint(0, 4)
        width = rng.choice([8, 16, 30])
        sig = {}
        for i in range(n):
            type_, extra = rng.choice(SHAPES)
            sig[f"s{i}"] = {"table": "holding_register", "address": rng.randint(0, width),
                            "type": type_, **extra}
        profile = make_profile(sig, max_registers_per_read=limit)
        result = plan(profile, max_gap=gap)["default"]
        spans = [proto_span(profile, name) for name in sig]
        assert len(result) == exhaustive_min(spans, limit, gap), (sig, limit, gap)
        check_plan(profile, {"default": result}, max_gap=gap)


@pytest.mark.parametrize("seed", range(10))
def test_random_mixed_profiles_are_minimal(seed: int) -> None:
    rng = random.Random(1000 + seed)
    sig: dict[str, dict[str, Any]] = {}
    for i in range(rng.randint(20, 150)):
        table = rng.choice(["coil", "discrete_input", "holding_register", "input_register"])
        group = rng.choice(["a", "b", "c"])
        if table in BIT_TABLES:
            sig[f"s{i}"] = {"table": table, "address": rng.randint(1, 400), "type": "bool",
                            "group": group}
        else:
            type_, extra = rng.choice(SHAPES)
            sig[f"s{i}"] = {"table": table, "address": rng.randint(1, 400), "type": type_,
                            "group": group, **extra}
    profile = make_profile(sig, addressing=1, max_registers_per_read=rng.randint(8, 125),
                           max_bits_per_read=rng.randint(8, 2000),
                           poll_groups={g: {"interval_ms": 100} for g in "abc"})
    gap = rng.randint(0, 20)
    check_plan(profile, plan(profile, max_gap=gap), max_gap=gap)


# --- decoding replies ----------------------------------------------------------------------


def test_decode_request_end_to_end() -> None:
    """Write every signal's encoded value into a register image, read it back request by
    request as the poller would, and get every value (scaled, enum-mapped) back."""
    profile = sorter_profile()
    rng = random.Random(7)
    image: dict[str, list[int]] = {t: [0] * 65536 for t in
                                   ("coil", "discrete_input", "holding_register",
                                    "input_register")}
    expected: dict[str, Any] = {}
    for name, s in profile.signals.items():
        start = s.address - profile.addressing
        if s.type == "bool" or s.type == "bit":
            raw: Any = rng.random() < 0.5
        elif s.type == "string":
            raw = f"C{rng.randint(0, 10**8)}"
        elif s.type.startswith("float"):
            raw = float(rng.randint(-1000, 1000)) / 4
        elif s.enum:
            raw = rng.choice([0, 1, 2, 9])
        else:
            raw = rng.randint(0, 30000)
        words = encode(s, raw, profile.byte_order)
        for i, w in enumerate(words):
            image[s.table][start + i] |= w  # bits of one register share it
        if s.enum:
            expected[name] = s.enum.get(raw, f"unknown({raw})")
        elif s.type in ("bool", "bit", "string"):
            expected[name] = raw
        else:
            expected[name] = raw * s.scale + s.offset if s.scale != 1 else raw
    got: dict[str, Any] = {}
    for requests in plan(profile).values():
        for req in requests:
            reply = image[req.table][req.start:req.start + req.count]
            if req.table in BIT_TABLES:  # pymodbus pads bits to whole bytes
                reply = [bool(b) for b in reply] + [False] * (-req.count % 8)
            got |= decode_request(req, reply)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value) if isinstance(value, float) else \
            got[name] == value, name
    assert got["chute_count_0"] == expected["chute_count_0"]  # CDAB through the planner


def test_decode_request_short_reply_raises() -> None:
    sig = {"a": {"table": "holding_register", "address": 0, "type": "uint32"}}
    (req,) = plan(make_profile(sig))["default"]
    with pytest.raises(ValueError, match="only 1"):
        decode_request(req, [1])


def test_signal_type_is_validated_for_bit_tables() -> None:
    # guard for the planner's assumption that a bit-table signal spans one bit
    assert Signal(table="coil", address=0, type="bool").registers() == 1
