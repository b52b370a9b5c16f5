"""Modbus codecs: every type, every byte/word order against values written out by hand,
encode/decode round trips, scale/offset/enum, and agreement with pymodbus's own decoder."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import pytest
from pymodbus.client.mixin import ModbusClientMixin

from edge_agent.codecs import ORDERS, compile_decoder, decode, encode
from edge_agent.profiles_modbus import Signal

DT = ModbusClientMixin.DATATYPE


def reg(type_: str, **kw: Any) -> Signal:
    return Signal(table="holding_register", address=0, type=type_, **kw)


# --- known values, all four orders --------------------------------------------------------

# (type, value, {order: registers}); the registers are written out by hand from the
# big-endian bytes (A B C D [E F G H]) and the table in codecs.py's docstring.
KNOWN: list[tuple[str, Any, dict[str, list[int]]]] = [
    ("uint32", 0x12345678, {
        "ABCD": [0x1234, 0x5678], "CDAB": [0x5678, 0x1234],
        "BADC": [0x3412, 0x7856], "DCBA": [0x7856, 0x3412]}),
    ("int32", 0x12345678, {
        "ABCD": [0x1234, 0x5678], "CDAB": [0x5678, 0x1234],
        "BADC": [0x3412, 0x7856], "DCBA": [0x7856, 0x3412]}),
    ("int32", -2, {  # 0xFFFFFFFE
        "ABCD": [0xFFFF, 0xFFFE], "CDAB": [0xFFFE, 0xFFFF],
        "BADC": [0xFFFF, 0xFEFF], "DCBA": [0xFEFF, 0xFFFF]}),
    ("uint32", 0xFFFFFFFE, {
        "ABCD": [0xFFFF, 0xFFFE], "CDAB": [0xFFFE, 0xFFFF],
        "BADC": [0xFFFF, 0xFEFF], "DCBA": [0xFEFF, 0xFFFF]}),
    ("float32", struct.unpack(">f", bytes.fromhex("42f6e979"))[0], {  # 123.456 -> 0x42F6E979
        "ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6],
        "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}),
    ("float32", -1.5, {  # 0xBFC00000
        "ABCD": [0xBFC0, 0x0000], "CDAB": [0x0000, 0xBFC0],
        "BADC": [0xC0BF, 0x0000], "DCBA": [0x0000, 0xC0BF]}),
    ("uint64", 0x0102030405060708, {
        "ABCD": [0x0102, 0x0304, 0x0506, 0x0708],  # ABCDEFGH
        "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],  # GHEFCDAB
        "BADC": [0x0201, 0x0403, 0x0605, 0x0807],  # BADCFEHG
        "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),  # HGFEDCBA
    ("int64", -1234567890123, {  # 0xFFFFFEE08E04FB35
        "ABCD": [0xFFFF, 0xFEE0, 0x8E04, 0xFB35], "CDAB": [0xFB35, 0x8E04, 0xFEE0, 0xFFFF],
        "BADC": [0xFFFF, 0xE0FE, 0x048E, 0x35FB], "DCBA": [0x35FB, 0x048E, 0xE0FE, 0xFFFF]}),
    ("float64", math.pi, {  # 0x400921FB54442D18
        "ABCD": [0x4009, 0x21FB, 0x5444, 0x2D18], "CDAB": [0x2D18, 0x5444, 0x21FB, 0x4009],
        "BADC": [0x0940, 0xFB21, 0x4454, 0x182D], "DCBA": [0x182D, 0x4454, 0xFB21, 0x0940]}),
    ("float64", 1.0, {  # 0x3FF0000000000000
        "ABCD": [0x3FF0, 0, 0, 0], "CDAB": [0, 0, 0, 0x3FF0],
        "BADC": [0xF03F, 0, 0, 0], "DCBA": [0, 0, 0, 0xF03F]}),
    # 16 bit: word swap is meaningless, byte swap applies (AB / BA)
    ("uint16", 0x1234, {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
    ("int16", -2, {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
]
KNOWN_CASES = [(t, v, o, regs) for t, v, by_order in KNOWN for o, regs in by_order.items()]


@pytest.mark.parametrize(("type_", "value", "order", "regs"), KNOWN_CASES,
                         ids=[f"{t}-{v}-{o}" for t, v, o, _ in KNOWN_CASES])
def test_known_values_in_every_order(type_: str, value: Any, order: str, regs: list[int]) -> None:
    # the order comes from the signal itself; the default must then be ignored
    sig = reg(type_, order=order)
    assert decode(sig, regs, "ABCD") == value
    assert encode(sig, value, "ABCD") == regs
    # ... or from the profile default
    assert decode(reg(type_), regs, order) == value
    assert encode(reg(type_), value, order) == regs


def test_float32_123_456_decodes_within_float32_precision() -> None:
    assert decode(reg("float32"), [0x42F6, 0xE979], "ABCD") == pytest.approx(123.456, rel=1e-7)
    assert encode(reg("float32"), 123.456, "ABCD") == [0x42F6, 0xE979]


def test_integer_extremes() -> None:
    cases = [("int16", -32768, [0x8000]), ("int16", 32767, [0x7FFF]), ("uint16", 65535, [0xFFFF]),
             ("int32", -(1 << 31), [0x8000, 0]), ("uint32", (1 << 32) - 1, [0xFFFF, 0xFFFF]),
             ("int64", -(1 << 63), [0x8000, 0, 0, 0]),
             ("uint64", (1 << 64) - 1, [0xFFFF] * 4), ("int64", -1, [0xFFFF] * 4)]
    for type_, value, regs in cases:
        assert decode(reg(type_), regs, "ABCD") == value
        assert encode(reg(type_), value, "ABCD") == regs


def test_integers_stay_int_and_floats_float() -> None:
    assert type(decode(reg("uint32"), [0, 7], "ABCD")) is int
    assert type(decode(reg("float32"), [0x3F80, 0], "ABCD")) is float


# --- bools, bits, strings ------------------------------------------------------------------


@pytest.mark.parametrize("table", ["coil", "discrete_input"])
def test_bool_from_bit_tables(table: str) -> None:
    sig = Signal(table=table, address=3, type="bool")
    assert decode(sig, [1], "ABCD") is True
    assert decode(sig, [False], "ABCD") is False
    dec = compile_decoder(sig, "ABCD")
    bits = [False, True, False, True]
    assert [dec(bits, i) for i in range(4)] == bits
    assert encode(sig, True, "ABCD") == [1]
    assert encode(sig, 0, "ABCD") == [0]


def test_bit_extraction_lsb_is_bit_0() -> None:
    word = 0b1000_0000_0000_0101
    got = {n: decode(reg("bit", bit=n), [word], "ABCD") for n in range(16)}
    assert {n for n, v in got.items() if v} == {0, 2, 15}
    assert all(isinstance(v, bool) for v in got.values())


def test_bit_of_a_byte_swapped_register() -> None:
    # the device means 0x8001 (bits 0 and 15) but sends its bytes swapped: 0x0180
    got = {n for n in range(16) if decode(reg("bit", bit=n, order="BADC"), [0x0180], "ABCD")}
    assert got == {0, 15}


def test_bit_encode() -> None:
    assert encode(reg("bit", bit=3), True, "ABCD") == [0x0008]
    assert encode(reg("bit", bit=3), False, "ABCD") == [0]
    assert encode(reg("bit", bit=3), 1, "DCBA") == [0x0800]
    for order in ORDERS:
        for n in range(16):
            sig = reg("bit", bit=n)
            assert decode(sig, encode(sig, True, order), order) is True


def test_string_high_byte_first_trailing_nuls_and_spaces_stripped() -> None:
    sig = reg("string", length=6)
    regs = [0x534F, 0x5254, 0x4552, 0x2D30, 0x3100, 0x0000]  # "SORTER-01" NUL NUL NUL
    assert decode(sig, regs, "ABCD") == "SORTER-01"
    assert decode(sig, [0x4142, 0x2020, 0x2000, 0, 0, 0], "ABCD") == "AB"
    assert decode(sig, [0] * 6, "ABCD") == ""
    assert encode(sig, "SORTER-01", "ABCD") == regs


def test_string_utf8_and_byte_swapped() -> None:
    sig = reg("string", length=4)
    regs = [0x4772, 0xC3B6, 0xC39F, 0x6500]  # "Größe" in UTF-8
    assert decode(sig, regs, "ABCD") == "Größe"
    swapped = [0x7247, 0xB6C3, 0x9FC3, 0x0065]
    assert decode(sig, swapped, "BADC") == "Größe"
    # word swap never reorders a string's registers
    assert decode(sig, regs, "CDAB") == "Größe"
    assert encode(sig, "Größe", "DCBA") == swapped


def test_string_with_invalid_utf8_does_not_raise() -> None:
    assert decode(reg("string", length=1), [0xFF41], "ABCD") == "\ufffdA"


# --- scale, offset, enum -------------------------------------------------------------------


def test_scale_and_offset() -> None:
    sig = reg("int16", scale=0.1, offset=20.0)
    assert decode(sig, [0xFFCE], "ABCD") == pytest.approx(15.0)  # -50 * 0.1 + 20
    assert decode(reg("uint16", scale=2), [21], "ABCD") == 42
    assert decode(reg("uint16", offset=-273.15), [300], "ABCD") == pytest.approx(26.85)
    assert decode(reg("float32", scale=1000), [0x3FC0, 0], "ABCD") == pytest.approx(1500.0)
    # encode is raw: before scale
    assert encode(sig, -50, "ABCD") == [0xFFCE]


def test_enum_maps_codes_and_reports_unknown_ones() -> None:
    sig = reg("uint16", enum={0: "idle", 1: "running", 2: "fault"})
    assert decode(sig, [2], "ABCD") == "fault"
    assert decode(sig, [7], "ABCD") == "unknown(7)"
    assert decode(reg("int32", enum={-1: "e_stop"}), [0xFFFF, 0xFFFF], "ABCD") == "e_stop"
    assert decode(Signal(table="coil", address=0, type="bool", enum={1: "on", 0: "off"}),
                  [1], "ABCD") == "on"


def test_compiled_decoder_reads_at_offset() -> None:
    words = [0xDEAD, 0xBEEF, 0x1234, 0x5678, 0xFFFF]
    assert compile_decoder(reg("uint32"), "ABCD")(words, 2) == 0x12345678
    assert compile_decoder(reg("uint32"), "CDAB")(words, 2) == 0x56781234
    assert compile_decoder(reg("uint64"), "ABCD")(words, 1) == 0xBEEF12345678FFFF
    assert compile_decoder(reg("uint16", scale=0.5), "ABCD")(words, 4) == 32767.5


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "value"), [
    (reg("uint16"), 65536), (reg("uint16"), -1), (reg("int16"), -32769), (reg("int16"), 32768),
    (reg("uint32"), -1), (reg("uint32"), 1 << 32), (reg("int32"), 1 << 31),
    (reg("int64"), 1 << 63), (reg("uint64"), 1 << 64), (reg("int16"), 1.5), (reg("int16"), True),
    (reg("float32"), 1e39), (reg("float32"), "1.0"), (reg("string", length=2), "12345"),
    (reg("string", length=2), 12), (reg("bit", bit=0), 2),
    (Signal(table="coil", address=0, type="bool"), 2),
])
def test_encode_out_of_range_raises(sig: Signal, value: Any) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        encode(sig, value, "ABCD")


def test_bad_order_and_bad_config_raise_when_compiling() -> None:
    with pytest.raises(ValueError, match="unknown byte order"):
        compile_decoder(reg("uint32"), "XYZW")
    with pytest.raises(ValueError, match="scale/offset"):
        compile_decoder(reg("string", length=2, scale=2), "ABCD")
    with pytest.raises(ValueError, match="scale/offset"):
        compile_decoder(reg("bit", bit=1, offset=1), "ABCD")
    with pytest.raises(ValueError, match="enum"):
        compile_decoder(reg("float32", enum={1: "x"}), "ABCD")


def test_decode_with_too_few_registers_raises() -> None:
    with pytest.raises(ValueError, match="needs 4"):
        decode(reg("float64"), [1, 2, 3], "ABCD")


# --- round trips and pymodbus --------------------------------------------------------------

NUMERIC = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}


def _random_value(rng: random.Random, type_: str) -> Any:
    if type_ in NUMERIC:
        bits = NUMERIC[type_]
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if type_[0] == "i" else (0, (1 << bits) - 1)
        return rng.choice([lo, hi, 0, rng.randint(lo, hi)])
    if type_ == "float32":
        return struct.unpack(">f", struct.pack(">f", rng.uniform(-1e6, 1e6)))[0]
    return rng.uniform(-1e300, 1e300)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("type_", [*NUMERIC, "float32", "float64"])
def test_round_trip(type_: str, order: str) -> None:
    rng = random.Random(f"{type_}{order}")
    sig = reg(type_)
    for _ in range(200):
        value = _random_value(rng, type_)
        regs = encode(sig, value, order)
        assert len(regs) == sig.registers()
        assert all(0 <= r <= 0xFFFF for r in regs)
        assert decode(sig, regs, order) == value


@pytest.mark.parametrize("order", ORDERS)
def test_round_trip_strings(order: str) -> None:
    sig = reg("string", length=5)
    for text in ["", "A", "AB", "carton-42", "0123456789", "Größe ok"]:
        assert decode(sig, encode(sig, text, order), order) == text


def test_special_floats_round_trip() -> None:
    for order in ORDERS:
        for type_ in ("float32", "float64"):
            sig = reg(type_)
            assert decode(sig, encode(sig, math.inf, order), order) == math.inf
            assert math.isnan(decode(sig, encode(sig, math.nan, order), order))


PYMODBUS_TYPES = {"int16": DT.INT16, "uint16": DT.UINT16, "int32": DT.INT32,
                  "uint32": DT.UINT32, "int64": DT.INT64, "uint64": DT.UINT64,
                  "float32": DT.FLOAT32, "float64": DT.FLOAT64}


@pytest.mark.parametrize(("order", "word_order"), [("ABCD", "big"), ("CDAB", "little")])
@pytest.mark.parametrize("type_", list(PYMODBUS_TYPES))
def test_agrees_with_pymodbus(type_: str, order: str, word_order: Any) -> None:
    # pymodbus knows big-endian bytes with big (ABCD) or little (CDAB, GHEFCDAB) word order
    rng = random.Random(type_)
    sig = reg(type_)
    for _ in range(300):
        regs = [rng.randrange(0x10000) for _ in range(sig.registers())]
        ours = decode(sig, regs, order)
        theirs = ModbusClientMixin.convert_from_registers(regs, PYMODBUS_TYPES[type_],
                                                          word_order=word_order)
        assert ours == theirs or (math.isnan(ours) and math.isnan(theirs))  # type: ignore[arg-type]
        assert type(ours) is type(theirs)


def test_strings_agree_with_pymodbus() -> None:
    sig = reg("string", length=6)
    for text in ["SORTER-01", "A", "Größe", "123456789012"]:
        regs = encode(sig, text, "ABCD")
        assert decode(sig, regs, "ABCD") == ModbusClientMixin.convert_from_registers(
            regs, DT.STRING) == text
