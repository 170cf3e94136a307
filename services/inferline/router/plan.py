"""``RoutePlan``: everything about a route the hot path needs, computed once at start-up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from inferline.core.config import InferlineConfig, RouteConfig, VariantConfig
from inferline.router.selection import RouteSelector, StatsRegistry


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

    @property
    def primary(self) -> VariantConfig:
        return self.config.primary


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
        )
    return plans
