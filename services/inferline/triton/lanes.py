"""``MergingLanes``: the policy that merges concurrent calls to one model into one Triton request.

Each gRPC call costs the router ~0.4 ms of CPU on this kind of machine, whatever its
size (and Triton a per-request cost of its own), so under load the router spends more on
calls than on everything else it does. Policy (adaptive, no timer): per key (model,
priority, the shape of the request), at most ``max_concurrent`` calls are in flight. A
request that finds a free slot goes at once, alone — an idle router adds no latency.
Requests that arrive while every slot is busy wait in the key's queue, and the next free
slot sends all of them (up to the lane's row limit) as one request. The busier the
router, the bigger the batches; Triton's own dynamic batcher still merges across routers
and keys.

Invariants: rows of a merged call keep their order, and each caller gets exactly its rows
back; the merged call's Triton timeout is the *latest* of its callers' budgets (a short
budget must not kill the others' work), while each caller stops waiting at its own budget
(nothing is cancelled: the late result is dropped); a failed merged call fails each of its
callers with the same kind of error. Callers of different priorities are never merged, so
traffic classes keep their Triton priority levels.

Subclasses say how a call is sent alone and how a batch is merged and split
(``CoalescingExecutor`` for ``Predict``'s feature matrices, ``TensorCoalescer`` for the
KServe front door's raw tensors).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inferline.core.deadline import Deadline
from inferline.core.errors import InferlineError
from inferline.triton.executor import ModelBudgetExceeded, ModelCallFailed

logger = logging.getLogger(__name__)

P = TypeVar("P")
"""What one caller sends."""
R = TypeVar("R")
"""What one caller gets back."""


@dataclass(slots=True)
class Waiter(Generic[P, R]):
    payload: P
    rows: int
    deadline: Deadline
    future: asyncio.Future[R]


@dataclass(slots=True)
class _Lane(Generic[P, R]):
    """One key's queue and in-flight count."""

    max_rows: int
    queue: deque[Waiter[P, R]] = field(default_factory=deque)
    in_flight: int = 0


class MergingLanes(abc.ABC, Generic[P, R]):
    """Per-key lanes of calls: at most ``max_concurrent`` in flight, the rest merged as they queue."""

    def __init__(self, max_concurrent: int, max_batch_rows: int) -> None:
        if max_concurrent < 1 or max_batch_rows < 1:
            raise ValueError("max_concurrent and max_batch_rows must be at least 1")
        self._max_concurrent = max_concurrent
        self._max_rows = max_batch_rows
        self._lanes: dict[Hashable, _Lane[P, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.merged_calls = 0
        self.merged_requests = 0

    @abc.abstractmethod
    async def _send_alone(self, key: Hashable, payload: P, deadline: Deadline) -> R:
        """One caller's call, as it is."""

    @abc.abstractmethod
    async def _send_merged(
        self, key: Hashable, payloads: Sequence[P], deadline: Deadline
    ) -> Sequence[R | InferlineError]:
        """The callers' rows as one call (``deadline``: the latest of theirs); each caller's result or error, in order.

        Raises:
            InferlineError: the merged call failed; every caller gets the same kind of error.
        """

    @staticmethod
    def _model_of(key: Hashable) -> str:
        """The model a key's calls go to (for error messages); keys are tuples led by the model name."""
        return str(key[0]) if isinstance(key, tuple) and key else str(key)

    async def _submit(self, key: Hashable, payload: P, rows: int, deadline: Deadline, max_rows: int | None = None) -> R:
        """Send ``payload`` (``rows`` rows) alone or merged with others of ``key``; ``max_rows``
        caps the lane's merged calls below ``max_batch_rows`` (a model's ``max_batch_size``)."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(self._max_rows)
        lane.max_rows = min(self._max_rows, max_rows or self._max_rows)
        if lane.in_flight < self._max_concurrent and not lane.queue:
            # Fast path: a free slot and nobody waiting, so go now, alone, without a task.
            lane.in_flight += 1
            try:
                return await self._send_alone(key, payload, deadline)
            finally:
                lane.in_flight -= 1
                self._dispatch(key, lane)
        return await self._enqueue(key, lane, payload, rows, deadline)

    async def _enqueue(self, key: Hashable, lane: _Lane[P, R], payload: P, rows: int, deadline: Deadline) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        lane.queue.append(Waiter(payload, rows, deadline, future))
        self._dispatch(key, lane)
        timer = loop.call_later(max(deadline.remaining_s(), 0.0), _expire, future, self._model_of(key))
        try:
            # Our own future: cancelling the wait (caller gone) cannot cancel a Triton call.
            return await future
        finally:
            timer.cancel()

    def _dispatch(self, key: Hashable, lane: _Lane[P, R]) -> None:
        """Send queued callers while a slot is free."""
        while lane.queue and lane.in_flight < self._max_concurrent:
            batch = self._take(lane)
            if not batch:
                continue
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(key, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _take(lane: _Lane[P, R]) -> list[Waiter[P, R]]:
        batch: list[Waiter[P, R]] = []
        rows = 0
        while lane.queue:
            waiter = lane.queue[0]
            if waiter.future.done():  # expired or abandoned while queued
                lane.queue.popleft()
                continue
            if batch and rows + waiter.rows > lane.max_rows:
                break
            lane.queue.popleft()
            batch.append(waiter)
            rows += waiter.rows
        return batch

    async def _run(self, key: Hashable, lane: _Lane[P, R], batch: list[Waiter[P, R]]) -> None:
        model = self._model_of(key)
        try:
            latest = max(batch, key=lambda w: w.deadline.expires_at).deadline
            if len(batch) == 1:
                results: Sequence[R | InferlineError] = [await self._send_alone(key, batch[0].payload, latest)]
            else:
                self.merged_calls += 1
                self.merged_requests += len(batch)
                results = await self._send_merged(key, [w.payload for w in batch], latest)
        except InferlineError as err:
            for waiter in batch:
                _fail(waiter.future, err)
            return
        except Exception as err:  # never leave a caller hanging on an unexpected error
            logger.exception("merged call to %s failed", model)
            for waiter in batch:
                _fail(waiter.future, ModelCallFailed(f"model {model} failed: {err}"))
            return
        else:
            for waiter, result in zip(batch, results, strict=True):
                if isinstance(result, InferlineError):
                    _fail(waiter.future, result)
                elif not waiter.future.done():
                    waiter.future.set_result(result)
        finally:
            lane.in_flight -= 1
            self._dispatch(key, lane)

    async def _drain(self) -> None:
        """Wait for merged calls in flight (they are never cancelled)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _expire(future: asyncio.Future[R], model: str) -> None:
    if not future.done():
        future.set_exception(ModelBudgetExceeded(f"model {model} did not answer within the budget"))


def _fail(future: asyncio.Future[R], err: InferlineError) -> None:
    """Give each caller its own exception object of the same type (tracebacks are per raise)."""
    if future.done():
        return
    try:
        clone = type(err)(str(err))
    except TypeError:  # a subclass with another constructor
        clone = ModelCallFailed(str(err))
    future.set_exception(clone)
