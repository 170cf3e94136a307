"""``CoalescingExecutor``: merges concurrent calls to one model into one Triton request.

Each gRPC call costs the router ~0.4 ms of CPU on this kind of machine, whatever its
size, so under load the router spends more on calls than on everything else it does.
Policy (adaptive, no timer): per (model, priority, tensor names) key, at most
``max_concurrent`` calls are in flight. A request that finds a free slot goes at once,
alone — an idle router adds no latency. Requests that arrive while every slot is busy
wait in the key's queue, and the next free slot sends all of them (up to
``max_batch_rows`` rows) as one request. The busier the router, the bigger the batches;
Triton's own dynamic batcher still merges across routers and keys.

Invariants: rows of a merged call keep their order, and each caller gets exactly its
rows back; the merged call's Triton timeout is the *latest* of its callers' budgets (a
short budget must not kill the others' work), while each caller stops waiting at its own
budget (nothing is cancelled: the late result is dropped); a failed merged call fails
each of its callers with the same kind of error. Callers of different priorities are
never merged, so traffic classes keep their Triton priority levels.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from inferline.core.deadline import Deadline
from inferline.core.errors import InferlineError
from inferline.triton.executor import InferResult, ModelBudgetExceeded, ModelCallFailed, ModelExecutor

logger = logging.getLogger(__name__)

_Key = tuple[str, int, str, str, str]
"""(model, priority, input name, output name, version): calls merged into one request share all five."""


@dataclass(slots=True)
class _Waiter:
    inputs: np.ndarray
    deadline: Deadline
    future: asyncio.Future[InferResult]


@dataclass(slots=True)
class _Lane:
    """One key's queue and in-flight count."""

    queue: deque[_Waiter] = field(default_factory=deque)
    in_flight: int = 0


class CoalescingExecutor:
    """A ``ModelExecutor`` that merges queued concurrent calls into one call of ``inner``."""

    def __init__(self, inner: ModelExecutor, max_concurrent: int = 4, max_batch_rows: int = 64) -> None:
        if max_concurrent < 1 or max_batch_rows < 1:
            raise ValueError("max_concurrent and max_batch_rows must be at least 1")
        self._inner = inner
        self._max_concurrent = max_concurrent
        self._max_rows = max_batch_rows
        self._lanes: dict[_Key, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.merged_calls = 0
        self.merged_requests = 0

    async def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        deadline: Deadline,
        priority: int,
        input_name: str = "features",
        output_name: str = "score",
        version: str = "",
    ) -> InferResult:
        """Same contract as ``ModelExecutor.infer``; may run merged with other callers' rows."""
        key = (model, priority, input_name, output_name, version)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.in_flight < self._max_concurrent and not lane.queue:
            # Fast path: a free slot and nobody waiting, so go now, alone, without a task.
            lane.in_flight += 1
            try:
                return await self._inner.infer(
                    model, inputs, deadline=deadline, priority=priority, input_name=input_name,
                    output_name=output_name, version=version,
                )  # fmt: skip
            finally:
                lane.in_flight -= 1
                self._dispatch(key, lane)
        return await self._enqueue(key, lane, inputs, deadline)

    async def _enqueue(self, key: _Key, lane: _Lane, inputs: np.ndarray, deadline: Deadline) -> InferResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferResult] = loop.create_future()
        lane.queue.append(_Waiter(inputs, deadline, future))
        self._dispatch(key, lane)
        timer = loop.call_later(max(deadline.remaining_s(), 0.0), _expire, future, key[0])
        try:
            # Our own future: cancelling the wait (caller gone) cannot cancel a Triton call.
            return await future
        finally:
            timer.cancel()

    def _dispatch(self, key: _Key, lane: _Lane) -> None:
        """Send queued callers while a slot is free."""
        while lane.queue and lane.in_flight < self._max_concurrent:
            batch = self._take(lane)
            if not batch:
                continue
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(key, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, lane: _Lane) -> list[_Waiter]:
        batch: list[_Waiter] = []
        rows = 0
        while lane.queue:
            waiter = lane.queue[0]
            if waiter.future.done():  # expired or abandoned while queued
                lane.queue.popleft()
                continue
            n = waiter.inputs.shape[0]
            if batch and rows + n > self._max_rows:
                break
            lane.queue.popleft()
            batch.append(waiter)
            rows += n
        return batch

    async def _run(self, key: _Key, lane: _Lane, batch: list[_Waiter]) -> None:
        model, priority, input_name, output_name, version = key
        try:
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([w.inputs for w in batch])
            latest = max(batch, key=lambda w: w.deadline.expires_at).deadline
            if len(batch) > 1:
                self.merged_calls += 1
                self.merged_requests += len(batch)
            try:
                result = await self._inner.infer(
                    model, inputs, deadline=latest, priority=priority, input_name=input_name,
                    output_name=output_name, version=version,
                )  # fmt: skip
            except InferlineError as err:
                for waiter in batch:
                    _fail(waiter.future, err)
                return
            except Exception as err:  # never leave a caller hanging on an unexpected error
                logger.exception("merged call to %s failed", model)
                for waiter in batch:
                    _fail(waiter.future, ModelCallFailed(f"model {model} failed: {err}"))
                return
            offset = 0
            for waiter in batch:
                n = waiter.inputs.shape[0]
                if not waiter.future.done():
                    scores = result.scores[offset : offset + n]
                    waiter.future.set_result(InferResult(scores, result.model_name, result.model_version))
                offset += n
        finally:
            lane.in_flight -= 1
            self._dispatch(key, lane)

    async def close(self) -> None:
        """Wait for merged calls in flight (they are never cancelled), then close ``inner``."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        close = getattr(self._inner, "close", None)
        if close is not None:
            await close()


def _expire(future: asyncio.Future[InferResult], model: str) -> None:
    if not future.done():
        future.set_exception(ModelBudgetExceeded(f"model {model} did not answer within the budget"))


def _fail(future: asyncio.Future[InferResult], err: InferlineError) -> None:
    """Give each caller its own exception object of the same type (tracebacks are per raise)."""
    if future.done():
        return
    try:
        clone = type(err)(str(err))
    except TypeError:  # a subclass with another constructor
        clone = ModelCallFailed(str(err))
    future.set_exception(clone)
