"""Batch efficiency from Triton's own statistics: rows per model execution during the job."""

from __future__ import annotations

from inferline.core.errors import DependencyUnavailable
from inferline.triton.executor import TritonExecutor


class BatchEfficiency:
    """Rows Triton ran per execution of one model between ``start`` and ``rows_per_execution``.

    Triton's counters are the model's, not the job's: online traffic to the same model
    (no class copy) is counted too. With the batch class's own copy they are the job's.
    """

    def __init__(self, executor: TritonExecutor, model: str) -> None:
        self._executor = executor
        self._model = model
        self._start: tuple[int, int] | None = None

    async def _counts(self) -> tuple[int, int] | None:
        try:
            response = await self._executor.model_statistics()
        except DependencyUnavailable:
            return None
        inferences = executions = 0
        for stats in response.model_stats:
            if stats.name == self._model:
                inferences += stats.inference_count
                executions += stats.execution_count
        return inferences, executions

    async def start(self) -> None:
        self._start = await self._counts()

    async def rows_per_execution(self) -> float | None:
        """Average rows per execution since ``start``; None when unknown (Triton did not answer)."""
        end = await self._counts()
        if end is None or self._start is None or end[1] <= self._start[1]:
            return None
        return round((end[0] - self._start[0]) / (end[1] - self._start[1]), 2)
