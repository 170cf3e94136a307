"""Batch efficiency from Triton's own statistics: rows per model execution during the job."""

from __future__ import annotations

from inferline.core.errors import DependencyUnavailable
from inferline.triton.executor import TritonExecutor


class BatchEfficiency:
    """Rows Triton ran per execution of the job's models between their ``track`` and ``rows_per_execution``.

    Triton's counters are the model's, not the job's: online traffic to the same model
    (no class copy) is counted too. With the batch class's own copy they are the job's.
    A job that changes variant mid-run tracks each model from the moment it takes it.
    """

    def __init__(self, executor: TritonExecutor) -> None:
        self._executor = executor
        self._start: dict[str, tuple[int, int] | None] = {}

    async def _counts(self) -> dict[str, tuple[int, int]] | None:
        try:
            response = await self._executor.model_statistics()
        except DependencyUnavailable:
            return None
        counts: dict[str, tuple[int, int]] = {}
        for stats in response.model_stats:
            inferences, executions = counts.get(stats.name, (0, 0))
            counts[stats.name] = (inferences + stats.inference_count, executions + stats.execution_count)
        return counts

    async def track(self, model: str) -> None:
        """Count ``model``'s executions from now."""
        counts = await self._counts()
        self._start[model] = None if counts is None else counts.get(model, (0, 0))

    async def rows_per_execution(self) -> float | None:
        """Average rows per execution since ``track``, over the tracked models; None when
        unknown (Triton did not answer)."""
        end = await self._counts()
        if end is None or not self._start or any(start is None for start in self._start.values()):
            return None
        inferences = executions = 0
        for model, start in self._start.items():
            assert start is not None
            counts = end.get(model, start)
            inferences += counts[0] - start[0]
            executions += counts[1] - start[1]
        if executions <= 0:
            return None
        return round(inferences / executions, 2)
