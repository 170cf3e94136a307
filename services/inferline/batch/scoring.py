"""Scoring a chunk's feature rows on Triton: large requests, a bounded number in flight, retried.

Rows go in requests of ``request_rows`` (the model's ``max_batch_size`` by default), at the
traffic class's Triton priority, to the class's copy of the model when it has one (its own
wide batching window). At most ``concurrency`` requests of the job are in flight across
all chunks, so the job never queues more on Triton than it asked for (docs/triton.md:
Triton's queue must stay bounded). A failed request (queue full, queue timeout,
Triton down) is retried with exponential backoff; when the attempts run out the job stops,
resumable: a Triton outage is no fault of the rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from inferline.batch.errors import BatchJobFailed
from inferline.batch.throttle import AdjustableGate
from inferline.core.config import PostprocessConfig
from inferline.core.deadline import Deadline
from inferline.triton.executor import ModelCallFailed, ModelExecutor

logger = logging.getLogger(__name__)

RETRY_WAIT_S = 0.1
"""Wait before a failed request's first retry; it doubles each retry after."""
MAX_RETRY_WAIT_S = 5.0


@dataclass(frozen=True)
class ModelTarget:
    """Where a job's rows are scored: the Triton model (class copy) and how to call it."""

    variant: str
    """The route's variant (its model name in the config)."""
    model: str
    """The Triton model called: the variant's copy for the job's class, or the variant itself."""
    input_name: str
    output_name: str
    features: tuple[str, ...]
    priority: int
    request_rows: int
    device: str


@dataclass
class Scored:
    scores: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    """False where the score is not finite or outside the route's [score_min, score_max]."""
    model_version: str


class RateLimit:
    """At most ``rows_per_s`` rows started per second (a token bucket of one second's worth)."""

    def __init__(self, rows_per_s: float | None) -> None:
        self._rate = rows_per_s
        self._next = 0.0

    async def acquire(self, rows: int) -> None:
        if self._rate is None:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + rows / self._rate
        if start > now:
            await asyncio.sleep(start - now)


class BatchScorer:
    """Scores feature matrices on one ``ModelTarget`` (see the module docstring)."""

    def __init__(
        self,
        executor: ModelExecutor,
        target: ModelTarget,
        post: PostprocessConfig,
        *,
        concurrency: int,
        timeout_s: float,
        attempts: int,
        rate: RateLimit | None = None,
        gate: AdjustableGate | None = None,
    ) -> None:
        """``gate``: bounds this job's requests in flight (default: ``concurrency``, fixed); the
        online-yield controller lowers and raises its limit."""
        self._executor = executor
        self._target = target
        self._post = post
        self._slots = gate or AdjustableGate(concurrency)
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._rate = rate or RateLimit(None)
        self.requests = 0
        self.retries = 0
        self.on_retry: Callable[[], None] = lambda: None
        """Called before each retry (the job's retry counter)."""

    @property
    def target(self) -> ModelTarget:
        """The variant chunks are scored on from now (a chunk keeps the one it started with)."""
        return self._target

    def retarget(self, target: ModelTarget) -> None:
        """Score the chunks that start from now on ``target`` (a switch of variant mid-run)."""
        self._target = target

    async def score(self, values: npt.NDArray[np.float32], target: ModelTarget | None = None) -> Scored:
        """Scores of every row of ``values`` ([rows, len(target.features)] float32), in order,
        on ``target`` (default: ``self.target``).

        Raises:
            BatchJobFailed: a request still failed after ``attempts`` tries.
        """
        target = target or self._target
        size = target.request_rows
        slices = [values[i : i + size] for i in range(0, values.shape[0], size)]
        results = await asyncio.gather(*(self._one(part, target) for part in slices))
        scores = np.concatenate([r[0] for r in results]) if results else np.empty(0, np.float32)
        version = results[0][1] if results else ""
        valid = np.isfinite(scores) & (scores >= self._post.score_min) & (scores <= self._post.score_max)
        return Scored(scores.astype(np.float32), valid, version)

    async def _one(self, rows: npt.NDArray[np.float32], target: ModelTarget) -> tuple[npt.NDArray[np.float32], str]:
        # The first attempt runs bare, tenacity only once it has failed: nearly every request
        # succeeds first time, and tenacity's state per request cost ~8 % of a batch job's
        # event-loop time (py-spy, 1M rows), which is what feeds Triton.
        try:
            return await self._attempt(rows, target)
        except ModelCallFailed as err:
            if self._attempts <= 1:
                raise BatchJobFailed(f"model {target.model}: 1 attempt failed, last: {err}") from err
        self._count_retry(None)
        await asyncio.sleep(RETRY_WAIT_S)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ModelCallFailed),
            stop=stop_after_attempt(self._attempts - 1),
            # Waits of 0.1 s (above), then 0.2, 0.4, … s, at most 5 s.
            wait=wait_exponential(multiplier=2 * RETRY_WAIT_S, max=MAX_RETRY_WAIT_S),
            reraise=True,
            before_sleep=self._count_retry,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(rows, target)
        except ModelCallFailed as err:
            raise BatchJobFailed(f"model {target.model}: {self._attempts} attempts failed, last: {err}") from err
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _attempt(self, rows: npt.NDArray[np.float32], target: ModelTarget) -> tuple[npt.NDArray[np.float32], str]:
        await self._rate.acquire(rows.shape[0])
        async with self._slots:
            self.requests += 1
            result = await self._executor.infer(
                target.model,
                rows,
                deadline=Deadline.after(self._timeout_s),
                priority=target.priority,
                input_name=target.input_name,
                output_name=target.output_name,
            )
        return np.asarray(result.scores, dtype=np.float32), result.model_version

    def _count_retry(self, state: object) -> None:
        self.retries += 1
        self.on_retry()
        logger.debug("retrying a request of the batch job")
