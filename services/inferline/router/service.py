"""``RouterService``: one Predict request through features → model → post-processing.

Transport-agnostic: the servicer translates protobuf to a ``PredictCall`` and back;
the other services are reached through their client ports (in-process or gRPC).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from inferline.core.budget import layer_deadline
from inferline.core.deadline import Deadline
from inferline.core.entities import EntityId
from inferline.core.served_by import ServedBy
from inferline.features.client import FeatureClient
from inferline.postprocess.client import PostprocessClient
from inferline.postprocess.service import RankedScore
from inferline.router.plan import RoutePlan
from inferline.triton.executor import ModelExecutor


@dataclass(frozen=True, slots=True)
class PredictCall:
    """A validated, authenticated request, ready to run."""

    tenant: str
    route: RoutePlan
    ids: list[EntityId]
    request_features: Mapping[str, float]
    traffic_class: str
    priority: int
    top_k: int
    request_id: str


@dataclass(slots=True)
class LayerTimes:
    routing_ms: float = 0.0
    features_ms: float = 0.0
    model_ms: float = 0.0
    post_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(slots=True)
class PredictOutcome:
    ranked: list[RankedScore]
    served_by: ServedBy
    model_name: str
    model_version: str
    defaulted: list[list[str]]
    """Per entity (request order): names of features that were defaulted."""
    features_degraded: bool
    reason: str = ""
    """Empty when not degraded, else a DegradationReason name without prefix, e.g. "DEADLINE"."""
    timings: LayerTimes = field(default_factory=LayerTimes)


class RouterService:
    """Runs the main path of a request under its deadline."""

    def __init__(self, features: FeatureClient, executor: ModelExecutor, postprocess: PostprocessClient) -> None:
        self._features = features
        self._executor = executor
        self._postprocess = postprocess

    async def predict(self, call: PredictCall, deadline: Deadline, started_at: float) -> PredictOutcome:
        """Answer ``call`` from the primary path.

        ``started_at`` is the ``time.perf_counter()`` at which the request arrived, so
        the routing layer's time (auth, validation) is included in the timings.

        Raises:
            DependencyUnavailable: the feature store, the model or a remote service failed.
            ModelOutputInvalid: the model answered with invalid scores.
        """
        plan = call.route
        times = LayerTimes()
        t0 = time.perf_counter()
        times.routing_ms = (t0 - started_at) * 1000
        # Later layers reserve post-processing and the fallback; the model takes what the
        # features leave (its own budget at most), so a short deadline still gets features.
        after_features = plan.post_budget_s + plan.fallback_reserve_s
        vector = await self._features.get(
            plan.name,
            call.ids,
            call.request_features,
            deadline=layer_deadline(deadline, plan.features_budget_s, after_features),
        )
        t1 = time.perf_counter()
        times.features_ms = (t1 - t0) * 1000
        variant = plan.primary
        inputs = vector.select(variant.features)
        result = await self._executor.infer(
            variant.model,
            inputs.values,
            deadline=layer_deadline(deadline, plan.model_budget_s, plan.post_budget_s + plan.fallback_reserve_s),
            priority=call.priority,
            input_name=variant.input_name,
            output_name=variant.output_name,
        )
        t2 = time.perf_counter()
        times.model_ms = (t2 - t1) * 1000
        ranked = await self._postprocess.process(
            plan.name,
            result.scores,
            len(call.ids),
            call.top_k,
            deadline=layer_deadline(deadline, plan.post_budget_s, plan.fallback_reserve_s),
        )
        t3 = time.perf_counter()
        times.post_ms = (t3 - t2) * 1000
        times.total_ms = (t3 - started_at) * 1000
        return PredictOutcome(
            ranked=ranked,
            served_by=ServedBy.PRIMARY,
            model_name=result.model_name,
            model_version=result.model_version,
            defaulted=[vector.defaulted_names(i) for i in range(len(call.ids))],
            features_degraded=vector.degraded,
            timings=times,
        )
