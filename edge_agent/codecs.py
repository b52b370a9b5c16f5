"""Modbus value codecs: registers (or bits) <-> values, per a profile ``Signal``.

Owns: data types, byte/word orders, scale/offset and enum mapping. Pure: no I/O, no
logging, no state; the read planner (``connectors/modbus_plan.py``) compiles one decoder
per signal and the poller calls it on every read, so the compiled path does no per-call
branching on type or order.

Orders (Telegraf / Modbus-tool naming). Let the value's big-endian bytes be A B C D
(32 bit) or A B C D E F G H (64 bit); the registers, first register first, are:

    order  32 bit           64 bit                       meaning
    ABCD   [AB, CD]         [AB, CD, EF, GH]  ABCDEFGH   big endian
    CDAB   [CD, AB]         [GH, EF, CD, AB]  GHEFCDAB   words reversed, bytes big endian
    BADC   [BA, DC]         [BA, DC, FE, HG]  BADCFEHG   bytes swapped in each word
    DCBA   [DC, BA]         [HG, FE, DC, BA]  HGFEDCBA   little endian

So an order is two independent flags: *byte swap* (BADC, DCBA) swaps the two bytes of
every register, and *word swap* (CDAB, DCBA) reverses the register order of a number.
Byte swap applies to every register type, as Telegraf does: int16/uint16 (AB or BA),
``bit`` (the bit is taken from the byte-swapped word) and ``string`` (2 bytes per
register, high byte first unless byte-swapped). Word swap applies to multi-register
numbers only; a string's registers are always in address order.

Values: bool/bit -> ``bool``; integers -> ``int``; floats -> ``float``; strings -> ``str``
(UTF-8, undecodable bytes replaced, trailing NULs and spaces stripped). Then, for numbers,
``raw * scale + offset`` (an int stays an int when scale is 1 and offset 0), or, when the
signal has an ``enum``, the text for the raw code (``unknown(<code>)`` for others).
``encode`` is the inverse up to the raw value (before scale and enum): it is for
simulators, tests and writes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from .profiles_modbus import BIT_TABLES, Signal

Decoder = Callable[[Sequence[int], int], Any]
"""A compiled decoder: ``(words_or_bits, offset) -> value``, reading from ``offset``."""

ORDERS = ("ABCD", "DCBA", "BADC", "CDAB")

# type -> (struct code, registers); int16/uint16 go through struct too so that the byte
# swap is handled the same way for every width.
_NUMERIC: dict[str, tuple[str, int]] = {
    "int16": ("h", 1), "uint16": ("H", 1),
    "int32": ("i", 2), "uint32": ("I", 2),
    "int64": ("q", 4), "uint64": ("Q", 4),
    "float32": ("f", 2), "float64": ("d", 4),
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(1 << 15), (1 << 15) - 1), "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1), "uint64": (0, (1 << 64) - 1),
}


def _flags(signal: Signal, order_default: str) -> tuple[bool, bool]:
    """(byte_swap, word_swap) for the signal's order, or the default."""
    order = signal.order or order_default
    if order not in ORDERS:
        raise ValueError(f"unknown byte order {order!r}; expected one of {', '.join(ORDERS)}")
    return order in ("BADC", "DCBA"), order in ("CDAB", "DCBA")


def _check(signal: Signal) -> None:
    """Refuse combinations the codec cannot honour, rather than silently ignoring them."""
    numeric = signal.type in _NUMERIC
    if (signal.scale != 1 or signal.offset != 0) and not numeric:
        raise ValueError(f"scale/offset apply to numeric types, not {signal.type}")
    if signal.enum is not None and (signal.type == "string" or signal.type.startswith("float")):
        raise ValueError(f"enum needs an integer, bool or bit type, not {signal.type}")


# --- raw decoders (no scale/enum) ----------------------------------------------------------


def _raw_decoder(signal: Signal, order_default: str) -> Decoder:
    if signal.table in BIT_TABLES:
        return lambda b, o: bool(b[o])
    byte_swap, word_swap = _flags(signal, order_default)
    if signal.type == "bit":
        mask = 1 << signal.bit  # type: ignore[operator]
        if byte_swap:
            # bit n of the byte-swapped word is bit (n + 8) % 16 of the word as sent
            mask = 1 << ((signal.bit + 8) % 16)  # type: ignore[operator]
        return lambda w, o: bool(w[o] & mask)
    if signal.type == "string":
        n = signal.length
        assert n is not None  # guaranteed by Signal's validator
        pack = struct.Struct(("<" if byte_swap else ">") + "H" * n).pack

        def string(w: Sequence[int], o: int) -> str:
            raw = pack(*w[o : o + n])
            return raw.decode("utf-8", errors="replace").rstrip("\x00 ")

        return string
    code, n = _NUMERIC[signal.type]
    # "<H" packs each register with its bytes swapped; the word swap is an index order.
    pack = struct.Struct(("<" if byte_swap else ">") + "H" * n).pack
    unpack = struct.Struct(">" + code).unpack
    if n == 1:
        return lambda w, o: unpack(pack(w[o]))[0]
    if n == 2:
        if word_swap:
            return lambda w, o: unpack(pack(w[o + 1], w[o]))[0]
        return lambda w, o: unpack(pack(w[o], w[o + 1]))[0]
    if word_swap:
        return lambda w, o: unpack(pack(w[o + 3], w[o + 2], w[o + 1], w[o]))[0]
    return lambda w, o: unpack(pack(w[o], w[o + 1], w[o + 2], w[o + 3]))[0]


# --- public API ----------------------------------------------------------------------------


def compile_decoder(signal: Signal, order_default: str) -> Decoder:
    """Build ``(words_or_bits, offset) -> value`` for one signal; all choices made here.

    Raises ValueError for an unknown order or a scale/enum the type cannot take.
    """
    _check(signal)
    raw = _raw_decoder(signal, order_default)
    if signal.enum is not None:
        names = dict(signal.enum)

        def enum(w: Sequence[int], o: int) -> str:
            code = int(raw(w, o))
            name = names.get(code)
            return name if name is not None else f"unknown({code})"

        return enum
    scale, offset = signal.scale, signal.offset
    if scale == 1 and offset == 0:
        return raw
    if offset == 0:
        return lambda w, o: raw(w, o) * scale
    return lambda w, o: raw(w, o) * scale + offset


def decode(signal: Signal, words_or_bits: Sequence[int], order_default: str) -> Any:
    """Decode one signal from its own registers (or bits), starting at index 0."""
    need = signal.registers()
    if len(words_or_bits) < need:
        raise ValueError(f"{signal.type} needs {need} value(s), got {len(words_or_bits)}")
    return compile_decoder(signal, order_default)(words_or_bits, 0)


def encode(signal: Signal, value: Any, order_default: str) -> list[int]:
    """The registers (or ``[0|1]`` for a bit table) holding ``value``, the *raw* value.

    Raw means before scale/offset and enum: an enum signal takes its integer code. A
    ``bit`` signal encodes to a register with only that bit set (or 0). Raises ValueError
    when the value does not fit the type.
    """
    if signal.table in BIT_TABLES:
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"a {signal.table} holds 0 or 1, not {value!r}")
        return [int(value)]
    byte_swap, word_swap = _flags(signal, order_default)
    if signal.type == "bit":
        if value not in (0, 1):
            raise ValueError(f"a bit holds 0 or 1, not {value!r}")
        word = (1 << signal.bit) if value else 0  # type: ignore[operator]
        return [_swap16(word)] if byte_swap else [word]
    if signal.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"a string signal takes str, not {type(value).__name__}")
        n = signal.length
        assert n is not None
        data = value.encode("utf-8")
        if len(data) > 2 * n:
            raise ValueError(f"string of {len(data)} bytes does not fit {n} registers")
        data = data.ljust(2 * n, b"\x00")
        words = list(struct.unpack(">" + "H" * n, data))
        return [_swap16(x) for x in words] if byte_swap else words
    code, n = _NUMERIC[signal.type]
    if signal.type in _INT_RANGE:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{signal.type} takes an int, not {value!r}")
        lo, hi = _INT_RANGE[signal.type]
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range for {signal.type} [{lo}, {hi}]")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{signal.type} takes a number, not {value!r}")
    try:
        data = struct.pack(">" + code, value)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"{value!r} does not fit {signal.type}: {exc}") from exc
    words = list(struct.unpack(">" + "H" * n, data))
    if word_swap:
        words.reverse()
    return [_swap16(x) for x in words] if byte_swap else words


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)
