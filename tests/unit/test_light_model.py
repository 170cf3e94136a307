"""Light models: the committed ONNX file run in-process, the Triton twin, and the latency estimate."""

from __future__ import annotations

import pathlib
import time

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from inferline.core.config import VariantConfig
from inferline.core.deadline import Deadline
from inferline.core.errors import DependencyUnavailable
from inferline.degradation import OnnxLightModel, TritonLightModel
from inferline.degradation.light import LatencyEstimate
from inferline.triton.executor import InferResult, ModelBudgetExceeded

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "triton_models/driver_ranker_light/1/model.onnx"
VARIANT = VariantConfig(model="driver_ranker_light", features=["conv_rate", "acc_rate"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def model() -> OnnxLightModel:
    return OnnxLightModel(MODEL_PATH, VARIANT)


async def test_onnx_scores_equal_onnxruntime_and_lie_in_unit_interval(model: OnnxLightModel) -> None:
    rng = np.random.default_rng(7)
    features = np.column_stack([rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)]).astype(np.float32)
    features[0] = [0.0, 0.0]
    features[1] = [1.0, 1.0]
    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    direct = session.run(None, {session.get_inputs()[0].name: features})[0].reshape(-1)
    scores = await model.score(features, deadline=Deadline.after(1.0))
    assert scores.shape == (50,)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, direct)
    assert float(scores.min()) >= 0.0
    assert float(scores.max()) <= 1.0
    assert model.model_name == "driver_ranker_light"


async def test_onnx_latency_estimate_is_measured() -> None:
    # Bounded by this run's own timings, not by a figure a busy machine may exceed: the seed is
    # one of the warm-up runs made while building, and a call folds in a time within its own.
    started = time.perf_counter()
    model = OnnxLightModel(MODEL_PATH, VARIANT)
    built_s = time.perf_counter() - started
    seeded = model.predicted_latency_s()
    assert 0 < seeded < built_s
    started = time.perf_counter()
    await model.score(np.zeros((10, 2), np.float32), deadline=Deadline.after(1.0))
    scored_s = time.perf_counter() - started
    assert 0 < model.predicted_latency_s() <= max(seeded, scored_s)


async def test_onnx_refuses_an_expired_deadline(model: OnnxLightModel) -> None:
    with pytest.raises(ModelBudgetExceeded):
        await model.score(np.zeros((1, 2), np.float32), deadline=Deadline.after(0.0))


class FakeExecutor:
    """Answers after ``latency_s`` of the fake clock, or raises ``error``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.latency_s = 0.002
        self.error: Exception | None = None
        self.calls: list[tuple[str, int, str, str]] = []

    async def infer(
        self,
        model: str,
        inputs: npt.NDArray[np.float32],
        *,
        deadline: Deadline,
        priority: int,
        input_name: str,
        output_name: str,
        version: str = "",
    ) -> InferResult:
        self.calls.append((model, priority, input_name, output_name))
        self.clock.advance(self.latency_s)
        if self.error is not None:
            raise self.error
        return InferResult(np.full(len(inputs), 0.4, np.float32), model, "1")


async def test_triton_light_model_calls_the_variant_and_learns_latency() -> None:
    clock = FakeClock()
    executor = FakeExecutor(clock)
    light = TritonLightModel(executor, VARIANT, priority=1, prior_latency_s=0.003, clock=clock)
    scores = await light.score(np.zeros((3, 2), np.float32), deadline=Deadline.after(1.0))
    np.testing.assert_allclose(scores, [0.4, 0.4, 0.4])
    assert executor.calls == [("driver_ranker_light", 1, "features", "score")]
    assert light.predicted_latency_s() == pytest.approx(0.003 + 0.2 * (0.002 - 0.003))


async def test_triton_timeout_raises_the_estimate_and_failures_do_not_lower_it() -> None:
    clock = FakeClock()
    executor = FakeExecutor(clock)
    light = TritonLightModel(executor, VARIANT, priority=2, prior_latency_s=0.003, clock=clock)
    executor.latency_s, executor.error = 0.020, ModelBudgetExceeded("late")
    with pytest.raises(ModelBudgetExceeded):
        await light.score(np.zeros((1, 2), np.float32), deadline=Deadline.after(1.0))
    assert light.predicted_latency_s() == pytest.approx(0.020)
    executor.latency_s, executor.error = 0.0001, DependencyUnavailable("down")
    with pytest.raises(DependencyUnavailable):
        await light.score(np.zeros((1, 2), np.float32), deadline=Deadline.after(1.0))
    assert light.predicted_latency_s() == pytest.approx(0.020, rel=0.01)  # a fast failure says nothing


def test_estimate_above_prior_decays_toward_it_when_idle() -> None:
    clock = FakeClock()
    estimate = LatencyEstimate(0.002, half_life_s=5.0, clock=clock)
    estimate.observe_timeout(0.010)
    assert estimate.predicted_s() == pytest.approx(0.010)
    clock.advance(5.0)
    assert estimate.predicted_s() == pytest.approx(0.006)  # half-way back to the prior
    clock.advance(100.0)
    assert estimate.predicted_s() == pytest.approx(0.002, abs=1e-6)


def test_estimate_below_prior_stays() -> None:
    clock = FakeClock()
    estimate = LatencyEstimate(0.002, alpha=0.5, clock=clock)
    estimate.observe(0.0)
    clock.advance(60.0)
    assert estimate.predicted_s() == pytest.approx(0.001)
