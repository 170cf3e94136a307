"""CoalescingExecutor with a fake inner executor whose calls can be held open."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferline.core.deadline import Deadline
from inferline.triton.coalescer import CoalescingExecutor
from inferline.triton.executor import InferResult, ModelBudgetExceeded, ModelUnavailable


class HeldExecutor:
    """Answers each row with its first feature; calls wait until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.error: Exception | None = None

    async def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        deadline: Deadline,
        priority: int,
        input_name: str,
        output_name: str,
        version: str = "",
    ) -> InferResult:
        self.calls.append({"rows": inputs.shape[0], "priority": priority, "deadline": deadline, "version": version})
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return InferResult(inputs[:, 0].copy(), model, "1")


def _rows(*values: float) -> np.ndarray:
    return np.array([[v, 0.0] for v in values], np.float32)


def _infer(executor: CoalescingExecutor, rows: np.ndarray, priority: int = 1, budget_s: float = 1.0):  # type: ignore[no-untyped-def]
    return executor.infer("m", rows, deadline=Deadline.after(budget_s), priority=priority)


async def test_an_idle_call_goes_alone_at_once() -> None:
    inner = HeldExecutor()
    executor = CoalescingExecutor(inner, max_concurrent=2)
    result = await _infer(executor, _rows(0.3, 0.4))
    assert result.scores.tolist() == pytest.approx([0.3, 0.4])
    assert [c["rows"] for c in inner.calls] == [2]


async def test_queued_calls_are_merged_and_each_gets_its_rows() -> None:
    inner = HeldExecutor()
    inner.release.clear()
    executor = CoalescingExecutor(inner, max_concurrent=1)
    first = asyncio.ensure_future(_infer(executor, _rows(0.1)))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(_infer(executor, _rows(v, v + 0.01))) for v in (0.2, 0.4, 0.6)]
    await asyncio.sleep(0)
    assert [c["rows"] for c in inner.calls] == [1]  # the others wait for the slot
    inner.release.set()
    assert (await first).scores.tolist() == pytest.approx([0.1])
    results = await asyncio.gather(*queued)
    assert [r.scores.tolist() for r in results] == [pytest.approx([v, v + 0.01]) for v in (0.2, 0.4, 0.6)]
    assert [c["rows"] for c in inner.calls] == [1, 6]
    assert executor.merged_calls == 1 and executor.merged_requests == 3


async def test_priorities_are_never_merged() -> None:
    inner = HeldExecutor()
    inner.release.clear()
    executor = CoalescingExecutor(inner, max_concurrent=1)
    busy = [asyncio.ensure_future(_infer(executor, _rows(0.1), priority=p)) for p in (1, 3)]
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(_infer(executor, _rows(0.5), priority=p)) for p in (1, 3, 1, 3)]
    await asyncio.sleep(0)
    inner.release.set()
    await asyncio.gather(*busy, *queued)
    merged = [(c["priority"], c["rows"]) for c in inner.calls[2:]]
    assert sorted(merged) == [(1, 2), (3, 2)]


async def test_merged_call_carries_the_latest_budget_and_short_budgets_stop_waiting() -> None:
    inner = HeldExecutor()
    inner.release.clear()
    executor = CoalescingExecutor(inner, max_concurrent=1)
    busy = asyncio.ensure_future(_infer(executor, _rows(0.1), budget_s=5))
    await asyncio.sleep(0)
    short = asyncio.ensure_future(_infer(executor, _rows(0.2), budget_s=0.02))
    long = asyncio.ensure_future(_infer(executor, _rows(0.3), budget_s=5))
    with pytest.raises(ModelBudgetExceeded):
        await short  # gave up at its own budget while queued
    inner.release.set()
    assert (await long).scores.tolist() == pytest.approx([0.3])
    await busy
    assert [c["rows"] for c in inner.calls] == [1, 1]  # the expired caller was not sent


async def test_a_failed_merged_call_fails_each_caller_with_the_same_kind() -> None:
    inner = HeldExecutor()
    inner.release.clear()
    executor = CoalescingExecutor(inner, max_concurrent=1)
    busy = asyncio.ensure_future(_infer(executor, _rows(0.1)))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(_infer(executor, _rows(0.5))) for _ in range(3)]
    await asyncio.sleep(0)
    inner.error = ModelUnavailable("triton down")
    inner.release.set()
    outcomes = await asyncio.gather(busy, *queued, return_exceptions=True)
    assert all(isinstance(o, ModelUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 4  # each caller raises its own exception object


async def test_merged_calls_respect_max_batch_rows() -> None:
    inner = HeldExecutor()
    inner.release.clear()
    executor = CoalescingExecutor(inner, max_concurrent=1, max_batch_rows=4)
    busy = asyncio.ensure_future(_infer(executor, _rows(0.1)))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(_infer(executor, _rows(0.5, 0.5, 0.5))) for _ in range(3)]
    await asyncio.sleep(0)
    inner.release.set()
    await asyncio.gather(busy, *queued)
    assert [c["rows"] for c in inner.calls] == [1, 3, 3, 3]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CoalescingExecutor(HeldExecutor(), max_concurrent=0)
