"""``DecayingAverage``: an exponential average over events that also fades with time between them."""

from __future__ import annotations

import time
from collections.abc import Callable


class DecayingAverage:
    """Each ``observe`` moves the average ``alpha`` of the way to the sample; between samples it
    halves every ``half_life_s`` toward 0, so that a burst of high readings followed by quiet
    does not hold a decision made on it (admission's queue wait, its protected classes' misses).
    """

    def __init__(self, alpha: float, half_life_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0 < alpha <= 1 or half_life_s <= 0:
            raise ValueError("alpha must be in (0, 1] and half_life_s positive")
        self._alpha = alpha
        self._half_life_s = half_life_s
        self._clock = clock
        self._value = 0.0
        self._at = clock()

    @property
    def value(self) -> float:
        """The average, decayed for the time since the last sample."""
        if self._value == 0.0:
            return 0.0
        return self._value * float(0.5 ** ((self._clock() - self._at) / self._half_life_s))

    def observe(self, sample: float) -> None:
        """Fold one sample in."""
        current = self.value
        self._value = current + self._alpha * (sample - current)
        self._at = self._clock()
