"""Adaptive concurrency limits: how many requests a route may have in the router at once.

In the style of Netflix's concurrency-limits (https://github.com/Netflix/concurrency-limits):
the limit is not configured but *discovered* from the latency of the requests that
finish. When more work is admitted than the serving path can absorb, requests start to
queue (in the event loop, in Triton's queue) and their latency rises; the limit follows
the latency down, so excess work is refused at the door instead of queuing until every
request misses its deadline.

Two algorithms, one per class:

* ``GradientLimit`` (Gradient2): compares a short-term average latency with a long-term
  one; their ratio (the gradient) shrinks the limit as soon as queuing shows, and a small
  allowance (``queue_size``) lets it grow while latency stays flat.
* ``AimdLimit``: additive increase, multiplicative decrease on a latency over a
  threshold or a dropped request. Simpler, slower to find the right level.

Hand-written (a few dozen lines each) because the reference implementation is Java; the
Python ports on PyPI are unmaintained and synchronous. Not thread-safe: one event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from inferline.core.config import AdmissionConfig


class ConcurrencyLimit(Protocol):
    @property
    def limit(self) -> int: ...

    @property
    def saturated(self) -> bool:
        """Whether the path showed queuing lately (latency well above its unloaded level, or drops).

        In flight over a class's share of the limit is overload only when this holds too:
        while latency stays flat, more in flight costs nobody anything — the limit has
        just not grown to the load yet (it grows a few permits per window). The gateway is
        told to shed, and a request whose queue the gateway bounds is shed, only then.
        """

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> None:
        """One finished request: its latency, the in-flight count when it started, and
        whether it was dropped (timed out, or degraded for lack of capacity)."""


class _Window:
    """Averages samples over a window of at least ``min_samples`` requests and ``window_s`` seconds.

    Gradient2 reacts to the *average* latency of a window rather than to each sample, so
    one slow request (a GC pause) does not cut the limit, and a window spans the same
    time whatever the request rate, so the long-term average means the same at any load.
    """

    __slots__ = ("_clock", "_count", "_min", "_started", "_sum", "_window_s", "drop_share", "drops")

    def __init__(self, min_samples: int, window_s: float, clock: Callable[[], float]) -> None:
        self._min, self._window_s, self._clock = min_samples, window_s, clock
        self._count, self._sum, self.drops = 0, 0.0, 0
        self.drop_share = 0.0
        """Share of dropped requests in the window last returned."""
        self._started = clock()

    def add(self, rtt_s: float, dropped: bool) -> float | None:
        """Add a sample; returns the window's average once it is full (and starts a new one)."""
        self._count += 1
        self._sum += rtt_s
        self.drops += dropped
        if self._count < self._min:
            return None
        now = self._clock()
        if now - self._started < self._window_s:
            return None
        average = self._sum / self._count
        self.drop_share = self.drops / self._count
        self._count, self._sum, self.drops, self._started = 0, 0.0, 0, now
        return average


class GradientLimit:
    """Gradient2: ``limit ← limit × clamp(tolerance × long_rtt / short_rtt, 0.5, 1) + queue_size``.

    ``long_rtt`` is an exponential average over ~``long_window`` windows (a minute at the
    default 0.1 s windows), the latency of the path when it is not queuing; ``short_rtt``
    is the last window's average. While the two agree the gradient is 1 and the limit
    grows by ``queue_size`` (√limit) per window; once queuing makes ``short_rtt`` exceed
    ``tolerance × long_rtt`` the limit shrinks in proportion; the new value is smoothed
    into the old one. A window with dropped requests shrinks it at once by half their
    share (all dropped: halved). When fewer than half the permits are in use the limit is
    left alone: an idle route proves nothing about its capacity, and must not grow a limit
    it never tested.
    """

    def __init__(
        self,
        initial: int,
        min_limit: int,
        max_limit: int,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        long_window: int = 600,
        window_samples: int = 10,
        window_s: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._estimate = float(initial)
        self._min, self._max = min_limit, max_limit
        self._tolerance = tolerance
        self._smoothing = smoothing
        self._long_alpha = 2.0 / (long_window + 1)
        self._long_rtt = 0.0
        self._window = _Window(window_samples, window_s, clock)
        self._max_in_flight = 0
        self._saturated = False

    @property
    def limit(self) -> int:
        return int(self._estimate)

    @property
    def saturated(self) -> bool:
        """The last window had drops, or its average latency passed ``tolerance`` × the long-term one."""
        return self._saturated

    @property
    def long_rtt_s(self) -> float:
        return self._long_rtt

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> None:
        self._max_in_flight = max(self._max_in_flight, in_flight)
        short_rtt = self._window.add(rtt_s, dropped)
        if short_rtt is None:
            return
        max_in_flight, self._max_in_flight = self._max_in_flight, 0
        drop_share = self._window.drop_share
        self._saturated = drop_share > 0
        if drop_share > 0:
            # Timeouts or refused model calls say the path is saturated, even when the short
            # latency of refused calls hides it: back off at once in proportion (not smoothed,
            # or the limit would trail a sudden overload by seconds) and do not probe upwards.
            self._estimate = max(float(self._min), self._estimate * (1 - drop_share / 2))
            return
        if self._long_rtt == 0.0:
            self._long_rtt = short_rtt
            return
        self._long_rtt += self._long_alpha * (short_rtt - self._long_rtt)
        if self._long_rtt / short_rtt > 2.0:
            # Latency fell far below the long-term view (load went away): let the long
            # average catch up quickly instead of holding the limit high on stale data.
            self._long_rtt *= 0.95
        self._saturated = short_rtt > self._tolerance * self._long_rtt
        if max_in_flight < self._estimate / 2:
            return
        gradient = max(0.5, min(1.0, self._tolerance * self._long_rtt / short_rtt))
        queue_size = math.sqrt(self._estimate)
        target = self._estimate * gradient + queue_size
        estimate = self._estimate * (1 - self._smoothing) + target * self._smoothing
        self._estimate = max(float(self._min), min(float(self._max), estimate))


class AimdLimit:
    """Additive increase, multiplicative decrease.

    +1 for each request that finishes in time while at least half the permits are in use;
    × ``backoff`` for a dropped request or one slower than ``latency_threshold_s``.
    """

    def __init__(
        self,
        initial: int,
        min_limit: int,
        max_limit: int,
        latency_threshold_s: float,
        backoff: float = 0.9,
        saturation_memory_s: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._limit = initial
        self._min, self._max = min_limit, max_limit
        self._threshold = latency_threshold_s
        self._backoff = backoff
        self._memory_s = saturation_memory_s
        self._clock = clock
        self._backed_off_at = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def saturated(self) -> bool:
        """A request was dropped or slower than the threshold within the last ``saturation_memory_s``."""
        return self._clock() - self._backed_off_at < self._memory_s

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> None:
        if dropped or rtt_s > self._threshold:
            self._backed_off_at = self._clock()
            self._limit = max(self._min, min(self._limit - 1, int(self._limit * self._backoff)))
        elif in_flight * 2 >= self._limit:
            self._limit = min(self._max, self._limit + 1)


def build_limit(config: AdmissionConfig) -> GradientLimit | AimdLimit:
    if config.algorithm == "aimd":
        return AimdLimit(
            config.initial_limit,
            config.min_limit,
            config.max_limit,
            config.aimd_latency_ms / 1000,
            config.aimd_backoff,
        )
    return GradientLimit(config.initial_limit, config.min_limit, config.max_limit, config.tolerance)
