"""``RoutePlan``: everything about a route the hot path needs, computed once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inferline.core.config import InferlineConfig, RouteConfig, VariantConfig


@dataclass(frozen=True, slots=True)
class RoutePlan:
    name: str
    config: RouteConfig
    primary: VariantConfig
    light: VariantConfig | None
    request_feature_names: frozenset[str]
    features_budget_s: float
    model_budget_s: float
    post_budget_s: float
    fallback_reserve_s: float


def build_route_plans(config: InferlineConfig) -> Mapping[str, RoutePlan]:
    plans = {}
    for name, route in config.routes.items():
        b = route.budgets
        plans[name] = RoutePlan(
            name=name,
            config=route,
            primary=route.primary,
            light=route.light,
            request_feature_names=frozenset(f.name for f in route.features if f.source is None),
            features_budget_s=b.features_ms / 1000,
            model_budget_s=b.model_ms / 1000,
            post_budget_s=b.post_ms / 1000,
            fallback_reserve_s=b.fallback_reserve_ms / 1000,
        )
    return plans
