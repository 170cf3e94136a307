"""``CircuitBreaker`` per model variant: stop calling a variant that keeps failing, then probe it back."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from inferline.core.config import BreakerConfig
from inferline.core.deadline import Clock

FailureKind = Literal["error", "timeout"]
DEFAULT_BUCKETS = 10
"""Ring slots of the sliding window; the window advances in steps of ``window_s / buckets``."""


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Outcomes in the sliding window; ``failures`` includes ``timeouts``."""

    calls: int
    failures: int
    timeouts: int


class _SlidingWindow:
    """Outcome counts over the last ``window_s`` seconds, kept in a ring of ``buckets`` slots.

    Running totals make ``add`` and ``counts`` O(1) amortised: moving to a newer bucket
    subtracts and clears only the slots that fell out (at most ``buckets`` of them). An
    outcome leaves the window between ``window_s - window_s / buckets`` and ``window_s``
    seconds after it was recorded.
    """

    def __init__(self, window_s: float, buckets: int) -> None:
        self._width_s = window_s / buckets
        self._size = buckets
        self._calls = [0] * buckets
        self._failures = [0] * buckets
        self._timeouts = [0] * buckets
        self._totals = [0, 0, 0]  # calls, failures, timeouts
        self._head: int | None = None  # bucket number (time // width) of the newest slot

    def add(self, now: float, *, failed: bool, timed_out: bool) -> None:
        slot = self._advance(now) % self._size
        self._calls[slot] += 1
        self._totals[0] += 1
        if failed:
            self._failures[slot] += 1
            self._totals[1] += 1
        if timed_out:
            self._timeouts[slot] += 1
            self._totals[2] += 1

    def counts(self, now: float) -> WindowCounts:
        self._advance(now)
        return WindowCounts(*self._totals)

    def reset(self) -> None:
        for ring in (self._calls, self._failures, self._timeouts):
            ring[:] = [0] * self._size
        self._totals = [0, 0, 0]
        self._head = None

    def _advance(self, now: float) -> int:
        """Make the bucket holding ``now`` the newest, expiring older ones; returns its number."""
        bucket = math.floor(now / self._width_s)
        if self._head is None:
            self._head = bucket
        # A clock that steps back (only a misused fake clock can) keeps writing to the head bucket.
        for number in range(self._head + 1, self._head + 1 + min(bucket - self._head, self._size)):
            slot = number % self._size  # held bucket `number - size`, now outside the window
            self._totals[0] -= self._calls[slot]
            self._totals[1] -= self._failures[slot]
            self._totals[2] -= self._timeouts[slot]
            self._calls[slot] = self._failures[slot] = self._timeouts[slot] = 0
        self._head = max(self._head, bucket)
        return self._head


class CircuitBreaker:
    """Circuit breaker for one model variant, judged on a sliding window of call outcomes.

    Algorithm (states and transitions)::

        CLOSED ──(calls ≥ min_calls and failures / calls ≥ failure_rate)──▶ OPEN
        OPEN ──(open_s elapsed, checked when asked)──▶ HALF_OPEN
        HALF_OPEN ──(half_open_probes consecutive probe successes)──▶ CLOSED (window reset)
        HALF_OPEN ──(any probe failure)──▶ OPEN (for another open_s)

    * CLOSED: every call is allowed; each outcome lands in a window of the last
      ``window_s`` seconds (``buckets`` slots, O(1) per record, no per-call storage).
      Errors and timeouts are both failures. The trip condition is checked on every
      record, so the breaker opens on the call that reaches it.
    * OPEN: no call is allowed. Outcomes of calls admitted before opening are ignored.
    * HALF_OPEN: at most ``half_open_probes`` probes are in flight at once; ``allow``
      returning True takes a probe slot, and exactly one ``record_*`` gives it back.
      The transition from OPEN happens lazily on ``allow`` or ``state``: without
      traffic a breaker stays OPEN, which is harmless since nothing is refused.

    Invariants: ``0 ≤ probes in flight ≤ half_open_probes``; the window holds outcomes
    only while CLOSED (it is emptied on closing); ``on_transition(old, new)`` is called
    once per state change, after the change, and must not raise.

    The caller records exactly one outcome per allowed call, as with concurrency-limits'
    Listener. A boolean ``allow`` cannot tell a probe's outcome from a late outcome of a
    call admitted before the breaker opened; in HALF_OPEN an outcome that arrives while
    no probe is outstanding is therefore ignored (so late results cannot close it), and
    callers should record outcomes when they stop waiting (the model budget bounds that).

    Recovery measures: ``last_opened_at`` / ``last_closed_at`` are clock readings of the
    latest transitions, so a caller can measure "dependency healthy again → closed".
    ``recovery_time_s`` is, for the latest close, the time from admitting the first probe
    of the half-open round that closed the breaker up to the close. Every probe of that
    round succeeded or was ignored (a failure ends the round), so this is the time from
    the first probe that went through to closing.

    Not thread-safe: use from one event loop.
    """

    def __init__(
        self,
        config: BreakerConfig,
        clock: Clock = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
        *,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        self._config = config
        self._clock = clock
        self._on_transition = on_transition
        self._window = _SlidingWindow(config.window_s, buckets)
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._first_probe_at: float | None = None
        self.last_opened_at: float | None = None
        """Clock reading when the breaker last opened; None if it never has."""
        self.last_closed_at: float | None = None
        """Clock reading when the breaker last closed after being open; None if it never has."""
        self.recovery_time_s: float | None = None
        """First probe of the closing half-open round → close, for the latest close; None before one."""

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose ``open_s`` has passed becomes HALF_OPEN here."""
        self._expire_open(self._clock())
        return self._state

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight

    def window_counts(self) -> WindowCounts:
        """Outcomes in the sliding window now (only recorded while CLOSED)."""
        return self._window.counts(self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the variant now.

        Returns:
            True when CLOSED, or HALF_OPEN with a free probe slot (the slot is taken and
            must be given back by one ``record_*``); False when OPEN, or HALF_OPEN with
            every probe slot taken.
        """
        now = self._clock()
        self._expire_open(now)
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN or self._probes_in_flight >= self._config.half_open_probes:
            return False
        self._probes_in_flight += 1
        if self._first_probe_at is None:
            self._first_probe_at = now
        return True

    def record_success(self) -> None:
        """An allowed call answered in time; in HALF_OPEN it counts towards closing."""
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            self._window.add(now, failed=False, timed_out=False)
            self._trip_if_failing(now)
        elif self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self._config.half_open_probes:
                self._close(now)

    def record_failure(self, kind: FailureKind) -> None:
        """An allowed call failed (``"error"``) or missed its budget (``"timeout"``).

        Raises:
            ValueError: ``kind`` is neither "error" nor "timeout".
        """
        if kind not in ("error", "timeout"):
            raise ValueError(f"failure kind must be 'error' or 'timeout', got {kind!r}")
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            self._window.add(now, failed=True, timed_out=kind == "timeout")
            self._trip_if_failing(now)
        elif self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._open(now)

    def record_ignored(self) -> None:
        """An allowed call ended without judging the variant (e.g. shed before reaching it).

        Gives a probe slot back in HALF_OPEN; never enters the window, so it cannot dilute
        the failure rate.
        """
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def _trip_if_failing(self, now: float) -> None:
        counts = self._window.counts(now)
        # A ratio, not `failures >= rate * calls`: 0.3 * 10 is 3.0000000000000004 in floating point.
        if counts.calls >= self._config.min_calls and counts.failures / counts.calls >= self._config.failure_rate:
            self._open(now)

    def _expire_open(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._opened_at + self._config.open_s:
            self._probes_in_flight = self._probe_successes = 0
            self._first_probe_at = None
            self._transition(BreakerState.HALF_OPEN)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self.last_opened_at = now
        self._probes_in_flight = self._probe_successes = 0
        self._first_probe_at = None
        self._transition(BreakerState.OPEN)

    def _close(self, now: float) -> None:
        self._window.reset()
        self.last_closed_at = now
        if self._first_probe_at is not None:
            self.recovery_time_s = now - self._first_probe_at
        self._probes_in_flight = self._probe_successes = 0
        self._first_probe_at = None
        self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_transition is not None:
            self._on_transition(old, new)


class BreakerRegistry:
    """One ``CircuitBreaker`` per model variant name, created on first use with a shared config."""

    def __init__(
        self,
        config: BreakerConfig,
        clock: Clock = time.monotonic,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        """``on_transition(variant, old, new)`` is told of every breaker's state changes."""
        self._config = config
        self._clock = clock
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, variant: str) -> CircuitBreaker:
        breaker = self._breakers.get(variant)
        if breaker is None:
            breaker = CircuitBreaker(self._config, self._clock, self._reporter(variant))
            self._breakers[variant] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        """State of every breaker created so far, by variant name."""
        return {name: breaker.state for name, breaker in self._breakers.items()}

    def _reporter(self, variant: str) -> Callable[[BreakerState, BreakerState], None] | None:
        report = self._on_transition
        if report is None:
            return None
        return lambda old, new: report(variant, old, new)
