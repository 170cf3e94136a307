"""``LightModel``: the route's small fallback model, in-process (ONNX) or on Triton's CPU pool.

Each implementation keeps an estimate of its own latency, which the degradation policy
compares with the time left before it tries the model at all.
"""

from __future__ import annotations

import pathlib
import time
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inferline.core.config import VariantConfig
from inferline.core.deadline import Clock, Deadline
from inferline.core.errors import ModelOutputInvalid
from inferline.triton.executor import ModelBudgetExceeded, ModelExecutor

Scores = npt.NDArray[np.float32]


class LightModel(Protocol):
    """A model cheap enough to answer inside the fallback reserve.

    ``score`` returns or raises by ``deadline`` (an implementation that cannot be
    interrupted must be fast enough that this holds), so callers need no extra timer.
    """

    @property
    def model_name(self) -> str: ...

    def predicted_latency_s(self) -> float:
        """Expected duration of the next ``score`` call (the estimate, without headroom)."""
        ...

    async def score(self, features: npt.NDArray[np.float32], *, deadline: Deadline) -> Scores:
        """Scores ``[N]`` of the feature matrix ``[N, F]`` (F = the variant's columns).

        Raises:
            ModelBudgetExceeded: no answer by ``deadline``.
            DependencyUnavailable: the model's server failed.
            ModelOutputInvalid: the output has the wrong size.
        """
        ...


class LatencyEstimate:
    """EWMA of a model's observed latency, which relaxes toward its prior when idle.

    ``observe(x)``: ``ewma += alpha * (x - ewma)``. A call that ran out of time only
    shows that the latency exceeds the time it got, so ``observe_timeout(x)`` sets
    ``ewma = max(ewma, x)``: the next call with the same budget is skipped at once.
    Because a skipped model produces no samples, an estimate above the prior decays
    toward it with half-life ``half_life_s`` after the last sample; after a spike the
    model is eventually tried again instead of never.
    """

    def __init__(
        self, prior_s: float, *, alpha: float = 0.2, half_life_s: float = 5.0, clock: Clock = time.monotonic
    ) -> None:
        self._prior_s = prior_s
        self._ewma_s = prior_s
        self._alpha = alpha
        self._half_life_s = half_life_s
        self._clock = clock
        self._last_at = clock()

    def observe(self, latency_s: float) -> None:
        self._ewma_s = self.predicted_s() + self._alpha * (latency_s - self.predicted_s())
        self._last_at = self._clock()

    def observe_timeout(self, waited_s: float) -> None:
        self._ewma_s = max(self.predicted_s(), waited_s)
        self._last_at = self._clock()

    def predicted_s(self) -> float:
        if self._ewma_s <= self._prior_s:
            return self._ewma_s
        idle_s = max(0.0, self._clock() - self._last_at)
        return self._prior_s + (self._ewma_s - self._prior_s) * float(0.5 ** (idle_s / self._half_life_s))


class OnnxLightModel:
    """Runs ``<repository>/<model>/<version>/model.onnx`` in-process with onnxruntime.

    Inline, on the event loop, with one intra-op thread. Measured on this machine for the
    demo light model (logistic regression, 2 features): 10 rows p50 23 µs, p99 100 µs;
    100 rows p50 29 µs. A hand-off to a thread pool costs ~50-100 µs of scheduling plus
    GIL contention: more than the work, so inline is cheaper and still cannot hold the
    loop for long. A model much bigger than this one should run on Triton instead
    (``light_in_process: false``). The tensor names are the ONNX file's own first input
    and output, as in ``triton_models/onnx_runner.py``.
    """

    def __init__(self, path: str | pathlib.Path, variant: VariantConfig, *, clock: Clock = time.monotonic) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._variant = variant
        self._clock = clock
        # Two warm-up runs: the first pays lazy allocations, the second seeds the estimate.
        zeros = np.zeros((1, len(variant.features)), np.float32)
        self._run(zeros)
        started = time.perf_counter()
        self._run(zeros)
        self.latency = LatencyEstimate(time.perf_counter() - started, clock=clock)

    @property
    def model_name(self) -> str:
        return self._variant.model

    def predicted_latency_s(self) -> float:
        return self.latency.predicted_s()

    def _run(self, features: npt.NDArray[np.float32]) -> Scores:
        outputs = self._session.run([self._output], {self._input: np.ascontiguousarray(features, np.float32)})
        return np.asarray(outputs[0], dtype=np.float32).reshape(-1)

    async def score(self, features: npt.NDArray[np.float32], *, deadline: Deadline) -> Scores:
        if deadline.expired():
            raise ModelBudgetExceeded(f"no time left for model {self.model_name}")
        started = self._clock()
        scores = self._run(features)
        self.latency.observe(self._clock() - started)
        if scores.shape[0] != features.shape[0]:
            raise ModelOutputInvalid(f"model {self.model_name} returned {scores.shape[0]} scores for {len(features)}")
        return scores


class TritonLightModel:
    """Runs the light variant on Triton (suite: its CPU pool) through a ``ModelExecutor``.

    The executor bounds the call by the deadline without cancelling it (docs/triton.md: a
    cancelled call can crash Triton 2.51), so ``score`` returns or raises in time.
    """

    def __init__(
        self,
        executor: ModelExecutor,
        variant: VariantConfig,
        priority: int,
        *,
        prior_latency_s: float = 0.003,
        clock: Clock = time.monotonic,
    ) -> None:
        self._executor = executor
        self._variant = variant
        self._priority = priority
        self._clock = clock
        # Prior: an unloaded Triton call measured ~1.9 ms p50 on our 2-core CI machines; a bit more.
        self.latency = LatencyEstimate(prior_latency_s, clock=clock)

    @property
    def model_name(self) -> str:
        return self._variant.model

    def predicted_latency_s(self) -> float:
        return self.latency.predicted_s()

    async def score(self, features: npt.NDArray[np.float32], *, deadline: Deadline) -> Scores:
        started = self._clock()
        try:
            result = await self._executor.infer(
                self._variant.model,
                features,
                deadline=deadline,
                priority=self._priority,
                input_name=self._variant.input_name,
                output_name=self._variant.output_name,
                version=self._variant.version,
            )
        except ModelBudgetExceeded:
            self.latency.observe_timeout(self._clock() - started)
            raise
        self.latency.observe(self._clock() - started)
        return np.asarray(result.scores, dtype=np.float32).reshape(-1)
