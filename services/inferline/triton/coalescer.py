"""``CoalescingExecutor``: merges concurrent ``Predict`` calls to one model into one Triton request.

The policy and its invariants are ``MergingLanes``' (``inferline.triton.lanes``): per
(model, priority, tensor names, version) key, at most ``max_concurrent`` calls in flight, and the
calls that queue behind them go together as one request of their stacked feature rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import cast

import numpy as np

from inferline.core.deadline import Deadline
from inferline.core.errors import InferlineError
from inferline.triton.executor import InferResult, ModelExecutor
from inferline.triton.lanes import MergingLanes

_Key = tuple[str, int, str, str, str]
"""(model, priority, input name, output name, version): calls merged into one request share all five."""


class CoalescingExecutor(MergingLanes[np.ndarray, InferResult]):
    """A ``ModelExecutor`` that merges queued concurrent calls into one call of ``inner``."""

    def __init__(self, inner: ModelExecutor, max_concurrent: int = 4, max_batch_rows: int = 64) -> None:
        super().__init__(max_concurrent, max_batch_rows)
        self._inner = inner

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
        key: _Key = (model, priority, input_name, output_name, version)
        return await self._submit(key, inputs, int(inputs.shape[0]), deadline)

    async def _send_alone(self, key: Hashable, payload: np.ndarray, deadline: Deadline) -> InferResult:
        model, priority, input_name, output_name, version = cast(_Key, key)
        return await self._inner.infer(
            model, payload, deadline=deadline, priority=priority, input_name=input_name,
            output_name=output_name, version=version,
        )  # fmt: skip

    async def _send_merged(
        self, key: Hashable, payloads: Sequence[np.ndarray], deadline: Deadline
    ) -> Sequence[InferResult | InferlineError]:
        result = await self._send_alone(key, np.concatenate(payloads), deadline)
        out: list[InferResult | InferlineError] = []
        offset = 0
        for inputs in payloads:
            n = inputs.shape[0]
            out.append(InferResult(result.scores[offset : offset + n], result.model_name, result.model_version))
            offset += n
        return out

    async def close(self) -> None:
        """Wait for merged calls in flight (they are never cancelled), then close ``inner``."""
        await self._drain()
        close = getattr(self._inner, "close", None)
        if close is not None:
            await close()
