"""``LoopLagMonitor``: the router's queue wait, read off its event loop.

Everything the router does runs on one event loop, so when more work arrives than the
process can do, it waits in the loop's ready queue — before the gRPC handler runs, where
no per-request timer can see it. How late a periodic timer fires measures exactly that
wait, for every request alike, at the cost of ~200 wake-ups a second.
"""

from __future__ import annotations

import asyncio
import time

from inferline.core.background import BackgroundTask


class LoopLagMonitor:
    """Keeps an exponential average of how late a ``tick_s`` timer fires (seconds).

    ``queue_wait_s`` rises within a few ticks of the loop saturating and decays as fast
    once it drains. The average (not the last reading) keeps one long pause, such as a
    garbage collection, from shedding a burst of requests on its own.
    """

    def __init__(self, tick_s: float = 0.005, alpha: float = 0.25) -> None:
        self._tick_s = tick_s
        self._alpha = alpha
        self._lag_s = 0.0
        self._task = BackgroundTask("loop-lag-monitor", self._run)

    @property
    def queue_wait_s(self) -> float:
        return self._lag_s

    def observe(self, lag_s: float) -> None:
        """Fold one reading in (the monitor's own loop calls this; tests may too)."""
        self._lag_s += self._alpha * (max(0.0, lag_s) - self._lag_s)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self._tick_s)
            self.observe(time.perf_counter() - before - self._tick_s)
