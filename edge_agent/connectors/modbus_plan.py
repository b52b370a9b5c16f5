"""The Modbus read planner: which requests read every signal of a poll group, fewest first.

Owns: converting profile addresses to 0-based protocol addresses, coalescing the signals
of each (poll group, table) into ``ReadRequest``s within the device's limits, and decoding
a request's reply into ``{signal: value}`` with compiled codecs. Pure: connects to nothing;
the Modbus connector sends the requests and handles errors.

A request never splits a signal, never mixes poll groups or tables, reads at most
``max_registers`` registers (<= 125, the protocol's limit, and the profile's own) or
``max_bits`` bits (<= 2000), and reads through an unused gap of at most ``max_gap``
registers/bits between signals (a request costs a round trip; a few extra registers cost
almost nothing). Set ``max_gap=0`` for devices that answer "illegal data address" for
unmapped registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..codecs import Decoder, compile_decoder
from ..profiles_modbus import BIT_TABLES, ModbusProfile, Table

PROTOCOL_MAX_REGISTERS = 125  # read holding/input registers (FC 3/4)
PROTOCOL_MAX_BITS = 2000  # read coils/discrete inputs (FC 1/2)
ADDRESS_SPACE = 65536


class ReadItem(NamedTuple):
    name: str
    offset: int  # index into the request's reply where the signal starts
    decode: Decoder


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: ``count`` registers/bits of ``table`` from 0-based ``start``."""

    table: Table
    start: int
    count: int
    items: tuple[ReadItem, ...]


class _Span(NamedTuple):
    start: int  # 0-based protocol address
    end: int  # exclusive
    name: str
    decode: Decoder


def plan(
    profile: ModbusProfile, *, max_registers: int = 125, max_bits: int = 2000, max_gap: int = 8
) -> dict[str, list[ReadRequest]]:
    """Requests per poll group (every declared group; an empty list if it has no signals).

    Within a group, requests are ordered by table then start address. Raises ValueError
    for bad limits, a signal outside the address space, or a signal longer than a read.
    """
    if max_registers < 1 or max_bits < 1 or max_gap < 0:
        raise ValueError("max_registers and max_bits must be >= 1 and max_gap >= 0")
    reg_limit = min(max_registers, PROTOCOL_MAX_REGISTERS, profile.max_registers_per_read)
    bit_limit = min(max_bits, PROTOCOL_MAX_BITS, profile.max_bits_per_read)

    spans: dict[tuple[str, str], list[_Span]] = {}
    for name, sig in profile.signals.items():
        start = sig.address - profile.addressing
        end = start + sig.registers()
        if start < 0 or end > ADDRESS_SPACE:
            raise ValueError(f"signal '{name}': protocol addresses {start}..{end - 1} are "
                             f"outside 0..{ADDRESS_SPACE - 1}")
        limit = bit_limit if sig.table in BIT_TABLES else reg_limit
        if end - start > limit:
            raise ValueError(f"signal '{name}' spans {end - start} registers, more than one "
                             f"read may take ({limit})")
        decoder = compile_decoder(sig, profile.byte_order)
        spans.setdefault((sig.group, sig.table), []).append(_Span(start, end, name, decoder))

    out: dict[str, list[ReadRequest]] = {g: [] for g in profile.poll_groups}
    for (group, table), items in sorted(spans.items()):
        limit = bit_limit if table in BIT_TABLES else reg_limit
        out[group].extend(_coalesce(table, items, limit, max_gap))  # type: ignore[arg-type]
    return out


def _coalesce(table: Table, spans: list[_Span], limit: int, max_gap: int) -> list[ReadRequest]:
    """Greedy sweep by start address: extend the open request while the next signal starts
    at most ``max_gap`` after everything read so far and still ends within ``limit`` of the
    request's start; otherwise close it and open the next one at that signal.

    Why this is the minimum: sorted by start, the sweep's open request always begins at
    the lowest start not yet read, which is where *any* request reading that signal must
    begin or before, so no request can reach further than the greedy one. A break happens
    for one of two reasons. (1) A gap > max_gap: no signal of this group covers it, so no
    request can contain signals from both sides and the two sides are independent
    problems. (2) The next signal S would end beyond start + limit: S cannot share a
    request with the first signal, and every signal already taken ends before S does, so
    whatever they read at or after S's start S itself reads: dropping them loses no
    bridging for what follows, and the rest is a problem beginning at S. Hence one
    request per break is forced, and greedy uses exactly (breaks + 1). The unit test
    checks this against an exhaustive search over all partitions of random small cases.
    """
    spans = sorted(spans, key=lambda s: (s.start, s.end, s.name))
    requests: list[ReadRequest] = []
    first = 0
    req_start, req_end = spans[0].start, spans[0].end
    for i in range(1, len(spans) + 1):
        if i < len(spans):
            s = spans[i]
            if s.start - req_end <= max_gap and max(req_end, s.end) - req_start <= limit:
                req_end = max(req_end, s.end)
                continue
        members = spans[first:i]
        requests.append(ReadRequest(
            table, req_start, req_end - req_start,
            tuple(ReadItem(m.name, m.start - req_start, m.decode) for m in members),
        ))
        if i < len(spans):
            first, req_start, req_end = i, spans[i].start, spans[i].end
    return requests


def decode_request(req: ReadRequest, words_or_bits: Sequence[int]) -> dict[str, Any]:
    """Decode a reply to ``req`` (registers, or bits: pymodbus pads bits to a byte)."""
    if len(words_or_bits) < req.count:
        raise ValueError(f"reply to {req.table} {req.start}+{req.count} has only "
                         f"{len(words_or_bits)} values")
    return {name: dec(words_or_bits, offset) for name, offset, dec in req.items}
