"""RouterService with fake ports: what it sends to each layer, and what it answers."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from inferline.core.config import load_config
from inferline.core.deadline import Deadline
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation.service import DegradedAnswer
from inferline.features.vector import EntityId, FeatureVector
from inferline.postprocess.client import LocalPostprocessClient
from inferline.postprocess.service import PostprocessService
from inferline.router.breaker import BreakerRegistry
from inferline.router.plan import RoutePlan, build_route_plans
from inferline.router.service import PredictCall, RouterService
from inferline.triton.executor import InferResult

CONFIG = load_config("deploy/local/inferline.yaml")
PLANS = build_route_plans(CONFIG)
PLAN = PLANS["driver_ranking"]
NAMES = ("conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km")


class FakeFeatures:
    def __init__(self) -> None:
        self.deadline: Deadline | None = None

    async def get(
        self,
        route: str,
        ids: list[EntityId],
        request_features: Mapping[str, float],
        *,
        deadline: Deadline,
        names: Sequence[str] | None = None,
    ) -> FeatureVector:
        self.deadline = deadline
        values = np.array([[0.1 * i, 0.5, 400, 3] for i in range(len(ids))], np.float32)
        defaulted = np.zeros_like(values, dtype=bool)
        defaulted[:, 3] = True
        return FeatureVector(NAMES, values, defaulted, degraded=False)


class FakeExecutor:
    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

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
        self.calls.append(
            {
                "model": model,
                "inputs": inputs,
                "budget_s": deadline.remaining_s(),
                "priority": priority,
                "version": version,
            }
        )
        return InferResult(np.linspace(0.2, 0.8, inputs.shape[0], dtype=np.float32), model, version or "1")


class FakeDegradation:
    def __init__(self) -> None:
        self.recorded: list[list[float]] = []
        self.reasons: list[Reason] = []

    async def degrade(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        features: FeatureVector | None,
        reason: Reason,
        *,
        deadline: Deadline,
    ) -> DegradedAnswer:
        self.reasons.append(reason)
        return DegradedAnswer(np.full(len(ids), 0.3, np.float32), ServedBy.BASELINE, "", 0.0)

    def record(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float] | np.ndarray) -> None:
        self.recorded.append([float(s) for s in scores])

    async def close(self) -> None:
        return None


def frozen() -> float:
    """A clock that stands still: the budgets a layer gets then follow from the deadline alone,
    not from how long this process took to get there on a busy machine."""
    return 1000.0


@pytest.fixture
def parts() -> tuple[RouterService, FakeFeatures, FakeExecutor]:
    features, executor = FakeFeatures(), FakeExecutor()
    post = LocalPostprocessClient(PostprocessService(CONFIG.routes))
    router = RouterService(features, executor, post, FakeDegradation(), PLANS, BreakerRegistry(CONFIG.breaker))
    return router, features, executor


def _call(n: int, traffic_class: str = "critical") -> PredictCall:
    priority = CONFIG.traffic_classes[traffic_class].priority
    return PredictCall("demo", PLAN, list(range(1001, 1001 + n)), {}, traffic_class, priority, 0, "r1")


async def test_primary_answer_ranks_and_reports_defaults(
    parts: tuple[RouterService, FakeFeatures, FakeExecutor],
) -> None:
    router, _, _ = parts
    outcome = await router.predict(_call(3), Deadline.after(0.1), time.perf_counter())
    assert outcome.served_by is ServedBy.PRIMARY
    assert [r.entity_index for r in outcome.ranked] == [2, 1, 0]
    assert outcome.defaulted == [["trip_distance_km"]] * 3
    assert outcome.timings.total_ms >= outcome.timings.model_ms >= 0


async def test_class_becomes_triton_priority(parts: tuple[RouterService, FakeFeatures, FakeExecutor]) -> None:
    router, _, executor = parts
    await router.predict(_call(1, "batch"), Deadline.after(1.0), time.perf_counter())
    await router.predict(_call(1, "critical"), Deadline.after(1.0), time.perf_counter())
    assert [c["priority"] for c in executor.calls] == [3, 1]


async def test_model_gets_its_budget_when_the_deadline_is_long(
    parts: tuple[RouterService, FakeFeatures, FakeExecutor],
) -> None:
    router, _, executor = parts
    await router.predict(_call(1), Deadline.after(2.0, clock=frozen), time.perf_counter())
    assert executor.calls[0]["budget_s"] == pytest.approx(PLAN.model_budget_s)


async def test_model_budget_keeps_the_later_reserves(parts: tuple[RouterService, FakeFeatures, FakeExecutor]) -> None:
    router, features, executor = parts
    deadline = Deadline.after(0.030, clock=frozen)
    await router.predict(_call(1), deadline, time.perf_counter())
    reserved = PLAN.post_budget_s + PLAN.fallback_reserve_s
    assert float(executor.calls[0]["budget_s"]) == pytest.approx(0.030 - reserved)  # type: ignore[arg-type]
    assert features.deadline is not None
    assert features.deadline.expires_at <= deadline.expires_at - reserved + 1e-9
    assert features.deadline.remaining_s() > 0  # a short deadline still leaves the features some time


async def test_primary_model_sees_its_feature_columns(parts: tuple[RouterService, FakeFeatures, FakeExecutor]) -> None:
    router, _, executor = parts
    await router.predict(_call(2), Deadline.after(1.0), time.perf_counter())
    inputs = executor.calls[0]["inputs"]
    assert isinstance(inputs, np.ndarray) and inputs.shape == (2, 4) and inputs.dtype == np.float32


# --- the features layer's deadline ------------------------------------------------------


def _plan(**budgets: object) -> RoutePlan:
    """The demo route with ``budgets`` over its own, features stretched unless they say otherwise."""
    raw = CONFIG.model_dump()
    raw["routes"]["driver_ranking"]["budgets"].update({"stretch_features": True, **budgets})
    return build_route_plans(type(CONFIG).model_validate(raw))["driver_ranking"]


def _features_budget_s(plan: RoutePlan, deadline_s: float, model_latency_s: float | None) -> float:
    if model_latency_s is not None:
        plan.primary_stats.started()
        plan.primary_stats.finished(model_latency_s)
    return plan.features_deadline(Deadline.after(deadline_s, clock=frozen)).remaining_s()


def test_features_may_use_what_a_fast_model_will_not_need() -> None:
    plan = _plan()
    reserve = plan.post_budget_s + plan.fallback_reserve_s
    # The model answers in 2 ms: it is left 3 × 2 ms, the features the rest but the reserves.
    assert _features_budget_s(plan, 0.100, 0.002) == pytest.approx(0.100 - reserve - 0.006)


def test_features_keep_to_their_budget_beside_a_slow_or_unknown_model() -> None:
    # Unknown latency: the model keeps its whole 60 ms budget; 100 - 10 - 60 = 30 ms is left.
    assert _features_budget_s(_plan(), 0.100, None) == pytest.approx(0.030)
    # A model as slow as its budget leaves nothing over: the features' own 20 ms.
    assert _features_budget_s(_plan(), 0.090, 0.050) == pytest.approx(0.020)


def test_a_fixed_features_budget_by_default() -> None:
    assert not CONFIG.routes["driver_ranking"].budgets.stretch_features
    assert _features_budget_s(_plan(stretch_features=False), 0.100, 0.002) == pytest.approx(0.020)


def test_a_short_deadline_still_keeps_the_reserves_after_the_features() -> None:
    plan = _plan()
    reserve = plan.post_budget_s + plan.fallback_reserve_s
    assert _features_budget_s(plan, 0.025, 0.002) == pytest.approx(0.025 - reserve)
