"""Yielding to online traffic: the job's Triton concurrency follows the online queue wait.

``YieldPolicy`` is AIMD on the number of the job's requests allowed in flight, fed with
the online path's queue wait each ``interval_s``:

* wait above ``target_s`` → ``limit = floor(limit × backoff)``, down to 0 (the job pauses);
* wait at or below it, or no online request in the interval → ``limit + 1``, up to ``max_limit``.

Multiplicative decrease gives the capacity back within a few intervals when an online
burst arrives; additive increase takes it again slowly, so the job probes rather than
flooding the queue it just left. The signal is Triton's own: the mean queue time of the
requests the online classes sent to the route's models during the interval
(``TritonQueueWait``). With a class copy for the job's class (``triton.class_copies``)
the online models' queues hold only online requests; without one the job's own requests
share the model and count too, and the job holds itself back a little more than needed.

A job of the BatchJobs service also yields to the router's own queue wait — the signal
admission sheds online requests by (event-loop lag, the gateway calls' wait before their
handler) — which the router tells its job processes as they run (``RouterQueueWait``).
It sees what Triton's queue time cannot: online requests waiting for CPU the job takes.
A ``batch run`` job, outside any router, reads the same value off the routers' metrics
endpoints (``--router-metrics``, ``RouterMetricsWait``). Each signal has its own target;
the job backs off when either passes its target.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Protocol

from inferline.batch.metrics import BatchMetrics
from inferline.core.errors import DependencyUnavailable
from inferline.stats import scrape
from inferline.triton.executor import TritonExecutor
from inferline.triton.statistics import ModelTotals, model_totals

logger = logging.getLogger(__name__)


class AdjustableGate:
    """A semaphore whose limit may change while permits are held (a lower limit takes effect
    as permits come back; 0 admits nothing).

    Written as ``asyncio.Semaphore`` is (a queue of futures, a permit handed to the first
    waiter as one comes back), not with an ``asyncio.Condition``: a chunk queues dozens of
    requests here at once, and a condition's lock made each permit cost several more turns
    of the event loop, which then fed Triton late (py-spy: ~12 % of a batch job's
    event-loop time went to this gate).
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._held = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        """Waiting for a permit, first come first served; a waiter leaves when it is granted one."""
        self._clock = clock
        self._paused_since: float | None = clock() if limit == 0 else None
        self._paused_total_s = 0.0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    @property
    def paused_s(self) -> float:
        """Seconds this gate has admitted nothing (limit 0) so far: a job's time yielding to
        online traffic, which says nothing about how fast it runs."""
        since = self._paused_since
        return self._paused_total_s + (0.0 if since is None else self._clock() - since)

    async def set_limit(self, limit: int) -> None:
        now = self._clock()
        if limit == 0 and self._paused_since is None:
            self._paused_since = now
        elif limit > 0 and self._paused_since is not None:
            self._paused_total_s += now - self._paused_since
            self._paused_since = None
        self._limit = limit
        self._grant()

    def _grant(self) -> None:
        """Hand free permits to the first waiters (counted as held from here on)."""
        while self._waiters and self._held < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._held += 1

    async def __aenter__(self) -> None:
        if self._held < self._limit and not self._waiters:
            self._held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled: pass it on
                self._held -= 1
                self._grant()
            else:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._held -= 1
        self._grant()


class YieldPolicy:
    """AIMD of the job's concurrency on the online queue wait (see the module docstring)."""

    def __init__(self, max_limit: int, target_s: float, backoff: float = 0.5) -> None:
        if not 0 < backoff < 1:
            raise ValueError("backoff must be in (0, 1)")
        self.max_limit = max_limit
        self.target_s = target_s
        self.backoff = backoff
        self.limit = max_limit

    def update(self, wait_s: float | None) -> int:
        """The new limit after an interval whose online queue wait was ``wait_s`` (None: no online request)."""
        return self.step(wait_s is not None and wait_s > self.target_s)

    def step(self, over_target: bool) -> int:
        """The new limit after an interval whose online wait was (or was not) over its target."""
        if over_target:
            self.limit = math.floor(self.limit * self.backoff)
        else:
            self.limit = min(self.max_limit, self.limit + 1)
        return self.limit


class TritonQueueWait:
    """Mean queue time of the requests Triton ran for ``models`` since the previous sample."""

    def __init__(self, executor: TritonExecutor, models: Collection[str]) -> None:
        self._executor = executor
        self._models = set(models)
        self._last: ModelTotals | None = None

    async def sample(self) -> float | None:
        """Seconds, or None when no request of ``models`` ran (or Triton did not answer)."""
        try:
            totals = model_totals(await self._executor.model_statistics())
        except DependencyUnavailable:
            return None
        now = sum((t for name, t in totals.items() if name in self._models), ModelTotals())
        last, self._last = self._last, now
        if last is None or now.requests <= last.requests:
            return None
        return (now.queue_ns - last.queue_ns) / (now.requests - last.requests) / 1e9


class RouterQueueWait:
    """The router's queue wait, as the router pushes it to its job's process (``push``): the
    largest value pushed since the previous sample, so a spike between samples still counts;
    the last one pushed when none came since. The router tells it at its own pace (every 0.1 s)
    for as long as the job runs, so a job sampling faster (``yield_interval_s``) reads the
    router's latest word, not an absence of online traffic that would let it run flat out."""

    def __init__(self) -> None:
        self._peak: float | None = None
        self._last: float | None = None

    def push(self, wait_s: float) -> None:
        self._peak = wait_s if self._peak is None else max(self._peak, wait_s)
        self._last = wait_s

    async def sample(self) -> float | None:
        """Seconds, or None when the router has told nothing yet."""
        peak, self._peak = self._peak, None
        return self._last if peak is None else peak


QUEUE_WAIT_METRIC = "inferline_queue_wait_seconds"
"""The routers' gauge of their queue wait (``core.metrics``): what ``RouterQueueWait`` is told."""


class RouterMetricsWait:
    """The routers' queue wait read off their Prometheus endpoints, for a job that runs outside
    any router (``batch run --router-metrics URL``: a Kubernetes Job beside the routers, a
    job on another host): the largest over the URLs, so the busiest router sets the pace.

    An endpoint that does not answer within ``timeout_s``, or has no such gauge, gives no
    reading (one warning per outage, one line when it is back): a metrics port that is down
    must not stop a job, which then goes on by Triton's signal alone.
    """

    def __init__(self, urls: Sequence[str], timeout_s: float = 0.5) -> None:
        if not urls:
            raise ValueError("RouterMetricsWait needs at least one metrics URL")
        self._urls = list(urls)
        self._timeout_s = timeout_s
        self._failing: set[str] = set()

    async def sample(self) -> float | None:
        """Seconds, the largest of the routers that answered; None when none did."""
        readings = await asyncio.gather(*(asyncio.to_thread(self._read, url) for url in self._urls))
        values = [r for r in readings if r is not None]
        return max(values) if values else None

    def _read(self, url: str) -> float | None:
        try:
            samples = scrape(url, self._timeout_s)
            values = [value for (name, _), value in samples.items() if name == QUEUE_WAIT_METRIC]
            if not values:
                raise ValueError(f"no {QUEUE_WAIT_METRIC} there")
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
            if url not in self._failing:
                logger.warning("batch: router metrics %s unreadable, not yielding to it: %s", url, err)
                self._failing.add(url)
            return None
        if url in self._failing:
            logger.info("batch: router metrics %s readable again", url)
            self._failing.discard(url)
        return max(values)


class WaitSignal(Protocol):
    async def sample(self) -> float | None: ...


class OnlineYield:
    """Runs ``YieldPolicy`` every ``interval_s`` on one or more online-wait signals, each with
    its own target (the policy's ``target_s`` for the first), and applies it to ``gate``."""

    def __init__(
        self,
        signal: WaitSignal,
        policy: YieldPolicy,
        gate: AdjustableGate,
        interval_s: float,
        metrics: BatchMetrics | None = None,
        *,
        more: Sequence[tuple[WaitSignal, float]] = (),
    ) -> None:
        """``more``: further (signal, target in seconds) pairs; over either target, the job backs off."""
        self._metrics = metrics
        self._signals = [(signal, policy.target_s), *more]
        self._policy = policy
        self._gate = gate
        self._interval_s = interval_s
        self.intervals = 0
        self.throttled_intervals = 0
        """Intervals the job ran below its full concurrency."""
        self.paused_intervals = 0
        self.last_wait_s: float | None = None

    async def start(self) -> None:
        """Take the baseline samples: called before the job sends anything, so its first
        interval counts every request from the start."""
        for signal, _ in self._signals:
            await signal.sample()

    async def run(self) -> None:
        """Until cancelled (the job's end); ``start`` first."""
        while True:
            await asyncio.sleep(self._interval_s)
            waits = [(await signal.sample(), target) for signal, target in self._signals]
            seen = [wait for wait, _ in waits if wait is not None]
            self.last_wait_s = max(seen) if seen else None
            limit = self._policy.step(any(wait is not None and wait > target for wait, target in waits))
            await self._gate.set_limit(limit)
            if self._metrics is not None:
                self._metrics.concurrency_limit.set(limit)
                self._metrics.online_queue_wait.set(self.last_wait_s or 0.0)
            self.intervals += 1
            self.throttled_intervals += limit < self._policy.max_limit
            self.paused_intervals += limit == 0
            if limit < self._policy.max_limit:
                logger.debug("online queue wait %s s: batch concurrency %d", self.last_wait_s, limit)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "interval_s": self._interval_s,
            "intervals": self.intervals,
            "throttled_share": round(self.throttled_intervals / self.intervals, 3) if self.intervals else 0.0,
            "paused_share": round(self.paused_intervals / self.intervals, 3) if self.intervals else 0.0,
        }
