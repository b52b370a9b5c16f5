"""Event time per source: device clocks, watermarks and what the agent could not see.

The rules decide on event time only. This module owns, per device, what the engine knows
about that device's time and coverage, and answers two questions for the rules:

- **How far has event time surely advanced for a rule?** (``watermark``) The minimum over
  the rule's input devices of the latest event time each has reported. A device counts in
  that minimum while it is *active* (online and heard from within ``idle_secs``), while it
  is offline but *buffered* (an MQTT QoS 1 persistent session: its messages wait at the
  broker and will come), for ``hold_offline_secs`` after any device went offline (it may
  come back with what it has), and after it (re)connected until it has said something, at
  most 15 s (after a broker outage the devices may still be reconnecting on their side). A
  device that is online but quiet does not hold the others back, so a checkweigher that
  falls silent while the scanner keeps sending still gets its ``no_weight`` exceptions.
  When every input is quiet, event time is taken to have advanced by the quiet time since
  each input's latest message (a quiet line still closes its windows, also the windows a
  restart restored; a replay long after the fact stays in its own time), but never while
  the agent itself is behind (``stall``: a late tick, a commit that takes long, ingest
  paused): wall time alone never decides that something did not happen.
- **Could the agent have missed an input in this interval?** (``unseen``) A device has
  *holes*: before it was first online, while it was offline (unless it is buffered, or it
  came back within the hold and its connector says reconnects lose nothing), and where its
  connector reported a counter gap. A rule whose window overlaps a hole of a missing
  input's device reports a gap instead of inventing an exception about a carton.

Device clocks: a device's time is kept as it said it, unless its clock is shown to be far
off the agent's (more than ``skew_tolerance_secs``): then its times are shifted by the
estimated offset for windowing, and that is reported once. A device is taken to be synced
until shown otherwise. A message can arrive late, never early, so a time ahead of arrival
is unambiguous: one such message is an *outlier* (clamped to the device's latest time, so a
single stamp hours ahead cannot push event time), several in a row that agree are a clock
set forward. A time behind arrival is ambiguous (a backlog after an outage, or a slow
clock), so the clock is taken to be behind only when a whole epoch of messages (2 s of
arrivals, at least 5) says so *and* they were all about equally late (a backlog draining
gets later and later times as it catches up; a slow clock is late by the same amount);
until then the per-device watermark keeps a slow device from being judged by the others'
clocks. The estimate changes in steps, never per message, so the same
messages get the same times.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

NEG_INF = -math.inf
EPOCH_SECS = 2.0  # arrival time over which a lower (further behind) offset is confirmed
RECONNECT_HOLD_SECS = 15.0  # a reconnected device not yet heard from holds event time this long
EPOCH_MIN_MESSAGES = 5  # fewer in an epoch say nothing about its clock
JUMP_CONFIRM = 3  # messages in a row that agree on a clock further off
CONFIRM_SECS = 0.5  # ...arriving over at least this long (not one burst of a backlog)
MAX_HOLES = 256  # per device, oldest dropped


class Source:
    """What the engine knows of one device's time and coverage."""

    __slots__ = (
        "device", "buffered", "lossless_reconnect", "online", "offline_since", "max_time",
        "last_arrival", "last_time", "skew", "applied", "epoch_start", "epoch_max", "epoch_min",
        "epoch_n",
        "suspect", "suspect_n", "suspect_since", "live", "online_since", "heard", "holes",
        "outliers",
    )

    def __init__(self, device: str, *, buffered: bool, lossless_reconnect: bool):
        self.device = device
        self.buffered = buffered
        self.lossless_reconnect = lossless_reconnect
        self.online = False
        self.offline_since = NEG_INF  # wall time it went offline; -inf: never online yet
        self.max_time = NEG_INF  # latest (normalized) event time it reported
        self.last_arrival = NEG_INF  # wall time of its latest message (or of coming online)
        self.last_time = NEG_INF  # normalized time of its latest message
        self.skew = 0.0  # estimated device clock - agent clock, seconds (synced until shown)
        self.applied = 0.0  # the offset removed from its times (0 unless far off)
        self.epoch_start = NEG_INF
        self.epoch_max = NEG_INF
        self.epoch_min = math.inf
        self.epoch_n = 0
        self.suspect = 0.0
        self.suspect_n = 0
        self.suspect_since = NEG_INF
        # Its messages are live: nothing kept anywhere can come late (not buffered, or its
        # session was new when it came online). Then a time behind arrival is a slow clock.
        self.live = not buffered
        self.online_since = NEG_INF
        self.heard = False  # a message came since it was last (re)connected
        # Intervals [start, end) of (normalized) time the agent could not see; end None = open.
        self.holes: list[list[float | None]] = [[NEG_INF, None]] if not buffered else []
        self.outliers = 0

    def covered_since(self) -> float | None:
        """Since when the agent has seen everything this device said (None: not now)."""
        if self.holes and self.holes[-1][1] is None:
            return None
        ends = [h[1] for h in self.holes if h[1] is not None]
        return max(ends) if ends else NEG_INF

    def to_status(self) -> dict[str, Any]:
        covered = self.covered_since()
        return {
            "covered_since": None if covered is None else (0.0 if covered == NEG_INF else covered),
            "online": self.online, "buffered": self.buffered,
            "clock_offset_secs": round(self.skew, 3),
            "clock_corrected_secs": round(self.applied, 3), "clock_outliers": self.outliers,
            "holes": [[h[0] if h[0] != NEG_INF else None, h[1]] for h in self.holes[-5:]],
        }


class Sources:
    def __init__(
        self,
        *,
        idle_secs: float = 2.0,
        hold_offline_secs: float = 30.0,
        skew_tolerance_secs: float = 1.0,
        hole_margin_secs: float = 1.0,
    ):
        self.idle_secs = idle_secs
        self.hold_offline_secs = hold_offline_secs
        self.tol = skew_tolerance_secs
        self.margin = hole_margin_secs
        self.by_device: dict[str, Source] = {}
        # Event time each device had surely reached before a restart (from the rules' state):
        # a line that stays quiet after a restart still closes the windows it restored.
        self.seeds: dict[str, float] = {}
        self.stalled_until = NEG_INF  # wall time until which quiet time does not count
        self.counters = {"clock_outliers": 0, "clock_changes": 0, "holes": 0}

    def add(self, device: str, *, buffered: bool = False, lossless_reconnect: bool = False) -> Source:
        s = self.by_device.get(device)
        if s is None:
            s = self.by_device[device] = Source(
                device, buffered=buffered, lossless_reconnect=lossless_reconnect
            )
            s.max_time = self.seeds.get(device, NEG_INF)
        return s

    def seed(self, device: str, t: float) -> None:
        """Before start: event time ``device`` had surely reached before the agent stopped."""
        if t > self.seeds.get(device, NEG_INF):
            self.seeds[device] = t
            s = self.by_device.get(device)
            if s is not None and t > s.max_time:
                s.max_time = t

    # --- per message (hot path) ----------------------------------------------------------

    def observe(self, device: str, t: float, arrival: float) -> float:
        """Note a message; return its event time for windowing (the device's own time unless
        its clock is known to be far off the agent's)."""
        s = self.by_device.get(device)
        if s is None:
            s = self.add(device, buffered=True)  # a device nobody declared: never invent holes
            s.online = True
        s.heard = True
        d = t - arrival
        skew = s.skew
        off = d - skew
        if off > self.tol or (s.live and off < -self.tol):
            # Ahead of any arrival delay (a clock set forward, or one bad stamp), or behind on
            # a source that cannot hold a backlog (its messages are live: a slow clock).
            if s.suspect_n and abs(d - s.suspect) <= self.tol:
                s.suspect_n += 1
            else:
                s.suspect, s.suspect_n, s.suspect_since = d, 1, arrival
            if (s.suspect_n < JUMP_CONFIRM or arrival - s.suspect_since < CONFIRM_SECS
                    or arrival < self.stalled_until):
                if off > self.tol:
                    s.outliers += 1
                    self.counters["clock_outliers"] += 1
                    if s.outliers == 1:
                        log.warning(
                            "device %s sent a time %.1f s ahead of its clock; not trusted for "
                            "windows (counted as clock_outliers)", device, off,
                        )
                s.last_arrival = arrival
                if s.live or s.last_time == NEG_INF:
                    return arrival  # live: it happened about now
                return s.last_time  # a replay: no later than its latest trusted time
            s.skew = d  # several in a row, over a while, agree: the clock is off by that
            s.suspect_n = 0
            s.epoch_start, s.epoch_max, s.epoch_min, s.epoch_n = arrival, d, d, 0
            self._apply(s)
        else:
            s.suspect_n = 0
            if s.epoch_start == NEG_INF:
                s.epoch_start = arrival  # an epoch is 2 s of arrivals, never a single burst
            if d > s.epoch_max:
                s.epoch_max = d
            if d < s.epoch_min:
                s.epoch_min = d
            s.epoch_n += 1
            if arrival - s.epoch_start >= EPOCH_SECS and s.epoch_n >= EPOCH_MIN_MESSAGES:
                # A whole epoch of messages, none as early as the estimate says they could be,
                # all equally late: the clock is behind. (A backlog draining is not equally
                # late: its messages get later and later times as it catches up.)
                if s.epoch_max < skew - self.tol and s.epoch_max - s.epoch_min <= self.tol:
                    s.skew = s.epoch_max
                    self._apply(s)
                s.epoch_start, s.epoch_max, s.epoch_min, s.epoch_n = arrival, d, d, 0
        tn = t - s.applied
        s.last_arrival = arrival
        s.last_time = tn
        if tn > s.max_time:
            s.max_time = tn
        return tn

    def _apply(self, s: Source) -> None:
        skew = s.skew
        new = skew if abs(skew) > self.tol else 0.0
        old = s.applied
        if new == old or (new and old and abs(new - old) <= self.tol):
            return  # stable: a better estimate within the tolerance does not move times
        s.applied = new
        self.counters["clock_changes"] += 1
        if new:
            log.warning(
                "device %s clock is %.1f s %s the agent's; its times are corrected by that "
                "for windows", s.device, abs(new), "ahead of" if new > 0 else "behind",
            )
        else:
            log.warning("device %s clock agrees with the agent's again", s.device)

    # --- connections --------------------------------------------------------------------

    def set_online(self, device: str, online: bool, now: float, *, resumed: bool = False) -> None:
        """A device's connection came up (``resumed``: its session kept what was sent while
        it was down) or went down."""
        s = self.by_device.get(device) or self.add(device)
        if online == s.online:
            return
        s.online = online
        if not online:
            s.offline_since = now
            s.live = not s.buffered  # what it sent meanwhile may come late, at reconnect
            if not s.buffered:
                self._hole(s, now - self.margin, None)
            return
        s.last_arrival = now
        s.online_since = now
        s.heard = False  # until it speaks, it may still be reconnecting on its side
        s.live = not s.buffered or not resumed
        down_for = now - s.offline_since
        lost = not resumed if s.buffered else not (
            s.lossless_reconnect and down_for <= self.hold_offline_secs
        )
        first = s.offline_since == NEG_INF
        if s.buffered:
            if lost:
                self._hole(s, NEG_INF if first else s.offline_since - self.margin, now + self.margin)
        else:
            open_hole = s.holes[-1] if s.holes and s.holes[-1][1] is None else None
            if open_hole is not None:
                if lost or first:
                    open_hole[1] = now + self.margin
                else:
                    s.holes.pop()  # back within the hold, and reconnects lose nothing

    def gap(self, device: str, now: float) -> None:
        """The device's connector saw events missed (a counter gap) up to ``now``."""
        s = self.by_device.get(device) or self.add(device)
        start = s.last_time if s.last_time != NEG_INF else NEG_INF
        self._hole(s, start, now + self.margin)

    def _hole(self, s: Source, start: float, end: float | None) -> None:
        self.counters["holes"] += 1
        s.holes.append([start, end])
        if len(s.holes) > MAX_HOLES:
            del s.holes[0]

    def stall(self, now: float) -> None:
        """The agent was behind (late tick, slow commit, ingest paused): quiet time up to
        now may hide messages still waiting, so it does not count as quiet."""
        until = now + self.idle_secs
        if until > self.stalled_until:
            self.stalled_until = until
        # Meanwhile devices' messages queue upstream (at the broker, or held on the device
        # by a handshake): what comes next may be a backlog, so a time behind arrival no
        # longer says a clock is slow.
        for s in self.by_device.values():
            s.live = False

    # --- what rules ask -----------------------------------------------------------------

    def watermark(self, devices: Iterable[str], now: float) -> float:
        """Event time every input of these devices has surely reached (-inf: none yet)."""
        wm = math.inf
        quiet = math.inf  # when every input is quiet: event time moved on by the quiet time
        idle = self.idle_secs
        stalled = now < self.stalled_until
        for dev in devices:
            s = self.by_device.get(dev)
            if s is None:
                continue
            if s.online:
                holds = stalled or now - s.last_arrival <= idle or (
                    not s.heard and now - s.online_since <= RECONNECT_HOLD_SECS)
            else:
                holds = s.buffered or now - s.offline_since <= self.hold_offline_secs
            if holds:
                if s.max_time < wm:
                    wm = s.max_time
            elif s.max_time != NEG_INF:
                q = s.max_time + (now - s.last_arrival)
                if q < quiet:
                    quiet = q
        if wm != math.inf:
            return wm
        if stalled or quiet == math.inf:
            return NEG_INF
        return quiet

    def unseen(self, devices: Iterable[str], start: float, end: float) -> bool:
        """Whether any of these devices has a hole overlapping [start, end]."""
        for dev in devices:
            s = self.by_device.get(dev)
            if s is None:
                continue
            for h_start, h_end in s.holes:
                if h_start is not None and h_start <= end and (h_end is None or h_end >= start):
                    return True
        return False

    def prune(self, before: float) -> None:
        for s in self.by_device.values():
            s.holes = [h for h in s.holes if h[1] is None or h[1] >= before]

    def status(self) -> dict[str, Any]:
        return {d: s.to_status() for d, s in sorted(self.by_device.items())}
