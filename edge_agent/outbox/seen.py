"""Ids of consumed device messages, remembered exactly for the dedup retention in bounded memory.

The outbox's ``inputs`` table (keyed by id) is the record; memory holds only

- ``recent``: the latest ids, in arrival order (at least every id not yet durable, so the
  table is never asked about an id it cannot have yet), bounded by ``recent_max``;
- a Bloom filter of every id within the retention, in time generations that expire whole
  (a Bloom filter cannot forget one id), bounded by ``max_filter_bytes``.

``in`` answers from ``recent``; otherwise "no" when the filter says so (nearly every new id),
and from the table only when the filter says "maybe" (a redelivery, or a false positive,
~0.5% of new ids while within the byte budget, more beyond it: dedup stays exact, only
slower). Memory does not grow with the rate or the retention; beyond the budget the filter's
false positives, and so table look-ups, grow instead.
"""

from __future__ import annotations

import random
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

# Blocked Bloom filter: each id sets K bits of one 64-bit word, chosen from a table of masks
# by high bits of its hash; the word by low bits. One array read per generation per probe.
_K = 8
_BITS_PER_ID = 24  # ~0.15% false positives per generation at capacity (measured)
_rng = random.Random(8)
_MASKS = tuple(sum(1 << b for b in _rng.sample(range(64), _K)) for _ in range(4096))
_MIN_WORDS = 1 << 12  # 32 KB: the first generation, for 10,922 ids
_MAX_WORDS = 1 << 20  # 8 MB: the largest one generation grows to


class _Gen:
    __slots__ = ("words", "wmask", "capacity", "count", "first", "last")

    def __init__(self, nwords: int, t: float):
        self.words = array("Q", bytes(8 * nwords))
        self.wmask = nwords - 1
        self.capacity = nwords * 64 // _BITS_PER_ID
        self.count = 0
        self.first = t
        self.last = t


class SeenIds:
    def __init__(
        self,
        lookup: Callable[[str, float], bool],
        retention_secs: float,
        *,
        recent_max: int = 16_384,
        max_filter_bytes: int = 16 * 2**20,
    ):
        """``lookup(id, since)``: is ``id`` in the outbox, seen at or after ``since``?"""
        self.lookup = lookup
        self.retention = retention_secs
        self.recent_max = recent_max
        self.max_words = max_filter_bytes // 8
        self.recent: OrderedDict[str, float] = OrderedDict()
        self.horizon = float("-inf")  # ids seen before this are forgotten
        self._added = 0  # ids ever added; ``recent`` holds those numbered [_evicted, _added)
        self._evicted = 0
        self._gens: list[_Gen] = []
        self._probe: list[tuple[array[int], int]] = []  # (words, wmask), newest first
        self.lookups = 0  # table look-ups (filter said "maybe", recent said no)

    def __contains__(self, msg_id: str) -> bool:
        if msg_id in self.recent:
            return True
        h = hash(msg_id)
        m = _MASKS[(h >> 52) & 4095]
        for words, wmask in self._probe:
            if words[h & wmask] & m == m:
                self.lookups += 1
                return self.lookup(msg_id, self.horizon)
        return False

    def __len__(self) -> int:
        return len(self.recent)

    def add(self, msg_id: str, seen: float) -> None:
        """Remember a new id (the caller also appends it to the batch being committed)."""
        self.recent[msg_id] = seen
        self._added += 1
        self._filter_add(msg_id, seen)

    def restore(self, rows: Iterable[tuple[str, float]]) -> None:
        """Load the durable ids (in ``seen`` order) into the filter only."""
        for msg_id, seen in rows:
            self._filter_add(msg_id, seen)

    def prune(self, now: float, durable: int) -> None:
        """Forget ids older than the retention; keep ``recent`` within its bound, dropping
        only ids already durable (the first ``durable`` ids added)."""
        self.horizon = horizon = now - self.retention
        recent = self.recent
        while recent and (
            next(iter(recent.values())) < horizon
            or (len(recent) > self.recent_max and self._evicted < durable)
        ):
            recent.popitem(last=False)
            self._evicted += 1
        gens = self._gens
        if gens and gens[0].last < horizon:
            self._gens = [g for g in gens if g.last >= horizon]
            self._reprobe()

    def filter_bytes(self) -> int:
        return sum(8 * (g.wmask + 1) for g in self._gens)

    # --- the filter ------------------------------------------------------------------------

    def _filter_add(self, msg_id: str, seen: float) -> None:
        gens = self._gens
        g = gens[-1] if gens else None
        if g is None or g.count >= g.capacity or seen - g.first > self.retention / 2:
            g = self._new_gen(g, seen)
        h = hash(msg_id)
        g.words[h & g.wmask] |= _MASKS[(h >> 52) & 4095]
        g.count += 1
        if seen > g.last:
            g.last = seen

    def _new_gen(self, cur: _Gen | None, t: float) -> _Gen:
        if cur is None:
            n = _MIN_WORDS
        elif cur.count >= cur.capacity:  # filled before its time: the rate is higher
            n = min(2 * (cur.wmask + 1), _MAX_WORDS)
        else:  # its time is up: size the next for the rate seen in this one
            n = _MIN_WORDS
            while n < _MAX_WORDS and n * 64 // _BITS_PER_ID < cur.count:
                n *= 2
        room = self.max_words - sum(g.wmask + 1 for g in self._gens)
        while n > _MIN_WORDS and n > room:
            n //= 2
        if cur is not None and n > room:
            return cur  # over budget: keep filling the current one (more false positives)
        g = _Gen(n, t)
        self._gens.append(g)
        self._reprobe()
        return g

    def _reprobe(self) -> None:
        self._probe = [(g.words, g.wmask) for g in reversed(self._gens)]
