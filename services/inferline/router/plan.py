"""``RoutePlan``: everything about a route the hot path needs, computed once at start-up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from inferline.core.budget import layer_deadline
from inferline.core.config import InferlineConfig, RouteConfig, VariantConfig
from inferline.core.deadline import Deadline
from inferline.router.selection import RouteSelector, StatsRegistry, VariantStats

MODEL_NEED_FACTOR = 3.0
"""The features may leave the model this many times its predicted latency (``RoutePlan.features_deadline``)."""
MIN_MODEL_NEED_S = 0.005
IDLE_MODEL_NEED_S = 0.001
"""The smallest model call worth making: a shorter model budget degrades at once (``MIN_MODEL_BUDGET_S``)."""


@dataclass(frozen=True, slots=True)
class RoutePlan:
    name: str
    config: RouteConfig
    light: VariantConfig | None
    request_feature_names: frozenset[str]
    features_budget_s: float
    model_budget_s: float
    post_budget_s: float
    fallback_reserve_s: float
    selector: RouteSelector
    """Chooses the full-quality variant (primary or an alternate) of each request."""
    primary_stats: VariantStats
    """The primary model's recent latency and calls in flight (route selection's)."""
    stretch_features: bool = False
    """``budgets.stretch_features``: the features may use what the model will not need."""

    @property
    def primary(self) -> VariantConfig:
        return self.config.primary

    @property
    def idle_need_s(self) -> float:
        """The least time the main path needs on an idle router: its post-processing and
        fallback reserves and the smallest model call worth making. A request of a protected
        class that arrives with less misses by its own deadline (``AdmissionController``)."""
        return self.post_budget_s + self.fallback_reserve_s + IDLE_MODEL_NEED_S

    def features_deadline(self, deadline: Deadline) -> Deadline:
        """The features layer's deadline: its budget, stretched to the time the model will not need.

        A fixed split wastes the caller's deadline: on an idle router one Feast read in a few
        hundred outlasted the 20 ms features budget and the answer degraded (LIGHT,
        FEATURES_DEGRADED), while the primary model, answering in a few ms, left most of its
        60 ms unused. So the read may go on until only the model's need (``MODEL_NEED_FACTOR``
        × the primary's predicted latency, at least ``MIN_MODEL_NEED_S``, at most its budget;
        the whole budget while the latency is unknown) and the reserves after it are left.
        Under load the predicted latency (queueing included) grows, and the stretch shrinks.
        """
        reserve = self.post_budget_s + self.fallback_reserve_s
        budget = self.features_budget_s
        if self.stretch_features:
            predicted = self.primary_stats.predicted_latency_s()
            need = self.model_budget_s
            if predicted > 0:
                need = min(need, max(MIN_MODEL_NEED_S, MODEL_NEED_FACTOR * predicted))
            budget = max(budget, deadline.remaining_s() - reserve - need)
        return layer_deadline(deadline, budget, reserve)


def build_route_plans(
    config: InferlineConfig,
    available: Callable[[str], bool] = lambda model: True,
    registry: StatsRegistry | None = None,
) -> Mapping[str, RoutePlan]:
    """Plans of every route; ``available(model)`` tells route selection whether a variant may be called."""
    registry = registry if registry is not None else StatsRegistry()
    plans = {}
    for name, route in config.routes.items():
        b = route.budgets
        plans[name] = RoutePlan(
            name=name,
            config=route,
            light=route.light,
            request_feature_names=frozenset(f.name for f in route.features if f.source is None),
            features_budget_s=b.features_ms / 1000,
            model_budget_s=b.model_ms / 1000,
            post_budget_s=b.post_ms / 1000,
            fallback_reserve_s=b.fallback_reserve_ms / 1000,
            selector=RouteSelector(name, route, config.device_classes, available, registry),
            primary_stats=registry.for_variant(route.primary),
            stretch_features=b.stretch_features,
        )
    return plans
