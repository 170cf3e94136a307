"""BatchScorer: large requests, a bound on requests in flight, retries, invalid scores flagged."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from inferline.batch.errors import BatchJobFailed
from inferline.batch.scoring import BatchScorer, ModelTarget
from inferline.core.config import PostprocessConfig
from inferline.core.deadline import Deadline
from inferline.triton.executor import InferResult, ModelOverloaded

TARGET = ModelTarget("m", "m__batch", "features", "score", ("a", "b"), priority=3, request_rows=4, device="cpu")


class FakeExecutor:
    """Scores each row as its first column; fails the first ``failures`` calls; records sizes and concurrency."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sizes: list[int] = []
        self.calls: list[tuple[str, int]] = []
        self.in_flight = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.release.set()
        self.changed = asyncio.Event()

    async def infer(
        self, model: str, inputs: np.ndarray, *, deadline: Deadline, priority: int, input_name: str, output_name: str
    ) -> InferResult:
        self.calls.append((model, priority))
        if self.failures > 0:
            self.failures -= 1
            raise ModelOverloaded("queue full")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.changed.set()
        try:
            await self.release.wait()
            self.sizes.append(inputs.shape[0])
            return InferResult(inputs[:, 0].astype(np.float32), model, "1")
        finally:
            self.in_flight -= 1


def rows(n: int) -> npt.NDArray[np.float32]:
    return np.stack([np.linspace(0, 1, n), np.zeros(n)], axis=1).astype(np.float32)


async def test_rows_go_in_requests_of_request_rows_to_the_class_copy() -> None:
    executor = FakeExecutor()
    scorer = BatchScorer(executor, TARGET, PostprocessConfig(), concurrency=2, timeout_s=5, attempts=1)
    scored = await scorer.score(rows(10))
    assert sorted(executor.sizes) == [2, 4, 4]
    assert set(executor.calls) == {("m__batch", 3)}
    np.testing.assert_allclose(scored.scores, rows(10)[:, 0])
    assert scored.valid.all()


async def test_requests_in_flight_stay_within_concurrency_across_chunks() -> None:
    executor = FakeExecutor()
    executor.release.clear()
    scorer = BatchScorer(executor, TARGET, PostprocessConfig(), concurrency=3, timeout_s=5, attempts=1)
    jobs = [asyncio.create_task(scorer.score(rows(40))) for _ in range(2)]
    while executor.in_flight < 3:
        executor.changed.clear()
        await executor.changed.wait()
    for _ in range(20):  # let every other request try for a slot
        await asyncio.sleep(0)
    assert executor.in_flight == 3
    executor.release.set()
    await asyncio.gather(*jobs)
    assert executor.peak == 3


async def test_failed_requests_are_retried() -> None:
    executor = FakeExecutor(failures=2)
    scorer = BatchScorer(executor, TARGET, PostprocessConfig(), concurrency=1, timeout_s=5, attempts=3)
    await scorer.score(rows(3))
    assert scorer.retries == 2
    assert len(executor.calls) == 3  # the bare first attempt and two by tenacity


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_request_is_tried_exactly_attempts_times(attempts: int) -> None:
    executor = FakeExecutor(failures=10)
    scorer = BatchScorer(executor, TARGET, PostprocessConfig(), concurrency=1, timeout_s=5, attempts=attempts)
    plural = "attempt" if attempts == 1 else "attempts"
    with pytest.raises(BatchJobFailed, match=f"{attempts} {plural} failed, last: queue full"):
        await scorer.score(rows(3))
    assert (len(executor.calls), scorer.retries) == (attempts, attempts - 1)


async def test_the_job_stops_when_the_attempts_run_out() -> None:
    executor = FakeExecutor(failures=5)
    scorer = BatchScorer(executor, TARGET, PostprocessConfig(), concurrency=1, timeout_s=5, attempts=2)
    with pytest.raises(BatchJobFailed, match="2 attempts failed, last: queue full"):
        await scorer.score(rows(3))


async def test_scores_out_of_range_or_not_finite_are_flagged() -> None:
    values = rows(4)
    values[:, 0] = [0.5, np.nan, 1.5, -0.1]
    scorer = BatchScorer(FakeExecutor(), TARGET, PostprocessConfig(), concurrency=1, timeout_s=5, attempts=1)
    assert (await scorer.score(values)).valid.tolist() == [True, False, False, False]
