"""Route selection: VariantStats (EWMA, in-flight, prediction), StatsRegistry, RouteSelector rules."""

from __future__ import annotations

import math

import pytest

from inferline.core.config import (
    CanaryConfig,
    DeviceClassConfig,
    EntitySpec,
    FeatureSpec,
    RouteConfig,
    VariantConfig,
)
from inferline.router.selection import (
    RouteSelector,
    StatsRegistry,
    VariantStats,
    cost_per_request,
)

DEVICES = {"cpu": DeviceClassConfig(cost_per_hour=0.20), "gpu": DeviceClassConfig(cost_per_hour=3.00)}
GPU = VariantConfig(model="m_gpu", features=["x"], device="gpu", parallelism=2)
CPU = VariantConfig(model="m_cpu", features=["x"], device="cpu", parallelism=2)


def route(primary: VariantConfig = GPU, *alternates: VariantConfig) -> RouteConfig:
    return RouteConfig(
        entity=EntitySpec(join_key="id"),
        features=[FeatureSpec(name="x", default=0.0)],
        primary=primary,
        alternates=list(alternates) if alternates else [CPU],
    )


def observe(stats: VariantStats, *latencies_s: float) -> None:
    for latency_s in latencies_s:
        stats.started()
        stats.finished(latency_s)


class Availability:
    """A settable ``available(model)``; every model is available unless marked down."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def __call__(self, model: str) -> bool:
        return model not in self.down


@pytest.fixture
def registry() -> StatsRegistry:
    return StatsRegistry()


@pytest.fixture
def availability() -> Availability:
    return Availability()


@pytest.fixture
def selector(registry: StatsRegistry, availability: Availability) -> RouteSelector:
    """GPU primary (10 ms), CPU alternate (12 ms), both parallelism 2."""
    s = RouteSelector("scores", route(), DEVICES, availability, registry)
    observe(registry.for_variant(GPU), 0.010)
    observe(registry.for_variant(CPU), 0.012)
    return s


def pick(
    selector: RouteSelector,
    budget_s: float,
    *,
    prefer_cheapest: bool = False,
    tenant_pin: str | None = None,
    canary: CanaryConfig | None = None,
    request_key: int = 0,
) -> tuple[str, str] | None:
    choice = selector.select(
        tenant_pin=tenant_pin,
        canary=canary,
        request_key=request_key,
        budget_s=budget_s,
        prefer_cheapest=prefer_cheapest,
    )
    return None if choice is None else (choice.variant.model, choice.reason)


# VariantStats


def test_ewma_is_seeded_by_the_first_sample_then_smoothed_with_alpha_0_2() -> None:
    stats = VariantStats(parallelism=2)
    assert stats.ewma_latency_s is None
    expected = []
    for sample in (0.100, 0.200, 0.000, 0.050):
        observe(stats, sample)
        expected.append(stats.ewma_latency_s)
    # 0.1; 0.1 + 0.2·(0.2 − 0.1) = 0.12; 0.12 − 0.2·0.12 = 0.096; 0.096 + 0.2·(0.05 − 0.096) = 0.0868
    assert expected == pytest.approx([0.100, 0.120, 0.096, 0.0868], rel=1e-12)


def test_ewma_is_exact_for_dyadic_samples() -> None:
    stats = VariantStats(parallelism=1, alpha=0.25)
    observe(stats, 1.0, 2.0, 0.0)
    assert stats.ewma_latency_s == 0.9375  # 1 → 1.25 → 0.9375, all exact in binary


def test_finished_none_frees_the_slot_but_leaves_the_ewma() -> None:
    stats = VariantStats(parallelism=2)
    observe(stats, 0.010)
    stats.started()
    stats.finished(None)
    assert stats.ewma_latency_s == 0.010
    assert stats.in_flight == 0


def test_finished_none_on_an_untried_variant_keeps_it_unknown() -> None:
    stats = VariantStats(parallelism=2)
    stats.started()
    stats.finished(None)
    assert stats.ewma_latency_s is None
    assert stats.predicted_latency_s() == 0.0


@pytest.mark.parametrize(
    ("in_flight", "expected_s"),
    [(0, 0.010), (1, 0.010), (2, 0.015), (3, 0.020), (5, 0.030)],
)
def test_prediction_adds_a_service_time_per_parallelism_calls_queued(in_flight: int, expected_s: float) -> None:
    stats = VariantStats(parallelism=2)
    observe(stats, 0.010)
    for _ in range(in_flight):
        stats.started()
    assert stats.predicted_latency_s() == pytest.approx(expected_s, rel=1e-12)


def test_untried_variant_predicts_zero_even_with_calls_in_flight() -> None:
    stats = VariantStats(parallelism=1)
    for _ in range(5):
        stats.started()
    assert stats.predicted_latency_s() == 0.0


def test_finished_without_started_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="without a matching"):
        VariantStats(parallelism=1).finished(0.01)


@pytest.mark.parametrize("latency_s", [-0.001, math.nan, math.inf])
def test_bad_latency_is_refused_and_changes_nothing(latency_s: float) -> None:
    stats = VariantStats(parallelism=1)
    stats.started()
    with pytest.raises(ValueError, match="finite and non-negative"):
        stats.finished(latency_s)
    assert stats.in_flight == 1
    assert stats.ewma_latency_s is None


def test_cost_per_request_is_device_hourly_cost_times_busy_share() -> None:
    stats = VariantStats(parallelism=4)
    assert cost_per_request(3.6, stats) == 0.0  # untried: optimistic
    observe(stats, 0.02)
    assert cost_per_request(3.6, stats) == pytest.approx(3.6 / 3600 * 0.02 / 4, rel=1e-12)


# StatsRegistry


def test_stats_are_shared_per_model_across_routes(registry: StatsRegistry, availability: Availability) -> None:
    other = VariantConfig(model="other_cpu", features=["x"], device="cpu")
    a = RouteSelector("a", route(GPU, CPU), DEVICES, availability, registry)
    b = RouteSelector("b", route(GPU, other), DEVICES, availability, registry)
    choice_a = a.select(tenant_pin=None, canary=None, request_key=0, budget_s=1.0, prefer_cheapest=False)
    choice_b = b.select(tenant_pin=None, canary=None, request_key=0, budget_s=1.0, prefer_cheapest=False)
    assert choice_a is not None and choice_b is not None
    assert choice_a.stats is choice_b.stats
    choice_a.stats.started()
    assert registry.for_variant(GPU).in_flight == 1


def test_load_on_one_route_spills_the_other(registry: StatsRegistry, availability: Availability) -> None:
    a = RouteSelector("a", route(GPU, CPU), DEVICES, availability, registry)
    b = RouteSelector("b", route(GPU, CPU), DEVICES, availability, registry)
    observe(registry.for_variant(GPU), 0.010)
    observe(registry.for_variant(CPU), 0.012)
    for _ in range(3):
        registry.for_variant(GPU).started()  # route a's calls
    assert pick(b, 0.015) == ("m_cpu", "spill")
    assert pick(a, 0.015) == ("m_cpu", "spill")


def test_registry_refuses_conflicting_parallelism(registry: StatsRegistry) -> None:
    registry.for_variant(GPU)
    with pytest.raises(ValueError, match="parallelism"):
        registry.for_variant(GPU.model_copy(update={"parallelism": 8}))


# RouteSelector


def test_preferred_when_the_primary_fits(selector: RouteSelector) -> None:
    assert pick(selector, 0.015) == ("m_gpu", "preferred")


def test_spills_to_the_alternate_when_in_flight_pushes_the_primary_past_the_budget(
    selector: RouteSelector, registry: StatsRegistry
) -> None:
    gpu = registry.for_variant(GPU)
    gpu.started()
    assert pick(selector, 0.015) == ("m_gpu", "preferred")  # 1 in flight + this one = parallelism
    gpu.started()
    gpu.started()  # 3 in flight: predicted 10 ms × (1 + 2/2) = 20 ms
    assert pick(selector, 0.015) == ("m_cpu", "spill")


def test_back_to_the_primary_when_load_drops(selector: RouteSelector, registry: StatsRegistry) -> None:
    gpu = registry.for_variant(GPU)
    for _ in range(3):
        gpu.started()
    assert pick(selector, 0.015) == ("m_cpu", "spill")
    gpu.finished(0.010)
    gpu.finished(0.010)
    assert pick(selector, 0.015) == ("m_gpu", "preferred")


def test_spill_follows_a_slowing_primary(selector: RouteSelector, registry: StatsRegistry) -> None:
    observe(registry.for_variant(GPU), *[0.050] * 10)  # EWMA climbs past the 15 ms budget
    assert pick(selector, 0.015) == ("m_cpu", "spill")


def test_cheapest_takes_the_cpu_when_it_fits(selector: RouteSelector, registry: StatsRegistry) -> None:
    observe(registry.for_variant(GPU), *[0.005] * 20)
    observe(registry.for_variant(CPU), *[0.030] * 20)
    assert selector.cost_per_request(CPU) < selector.cost_per_request(GPU)
    assert pick(selector, 0.050, prefer_cheapest=True) == ("m_cpu", "cheapest")
    assert pick(selector, 0.050) == ("m_gpu", "preferred")


def test_cheapest_takes_the_gpu_when_only_the_gpu_fits(selector: RouteSelector, registry: StatsRegistry) -> None:
    observe(registry.for_variant(GPU), *[0.005] * 20)
    observe(registry.for_variant(CPU), *[0.030] * 20)
    assert pick(selector, 0.010, prefer_cheapest=True) == ("m_gpu", "cheapest")


def test_cheapest_ties_go_to_preference_order(registry: StatsRegistry, availability: Availability) -> None:
    s = RouteSelector("scores", route(), DEVICES, availability, registry)  # both untried: cost 0
    assert pick(s, 0.010, prefer_cheapest=True) == ("m_gpu", "cheapest")


@pytest.mark.parametrize("prefer_cheapest", [False, True])
def test_unavailable_variants_are_skipped(
    selector: RouteSelector, availability: Availability, prefer_cheapest: bool
) -> None:
    availability.down.add("m_gpu")
    expected = "cheapest" if prefer_cheapest else "spill"
    assert pick(selector, 1.0, prefer_cheapest=prefer_cheapest) == ("m_cpu", expected)


@pytest.mark.parametrize("prefer_cheapest", [False, True])
def test_none_when_nothing_is_available(
    selector: RouteSelector, availability: Availability, prefer_cheapest: bool
) -> None:
    availability.down.update({"m_gpu", "m_cpu"})
    assert pick(selector, 1.0, prefer_cheapest=prefer_cheapest, tenant_pin="m_gpu") is None


@pytest.mark.parametrize("prefer_cheapest", [False, True])
def test_best_effort_takes_the_fastest_available_when_nothing_fits(
    selector: RouteSelector, registry: StatsRegistry, availability: Availability, prefer_cheapest: bool
) -> None:
    for _ in range(3):
        registry.for_variant(GPU).started()  # GPU 20 ms predicted, CPU 12 ms
    assert pick(selector, 0.005, prefer_cheapest=prefer_cheapest) == ("m_cpu", "best_effort")
    availability.down.add("m_cpu")
    assert pick(selector, 0.005, prefer_cheapest=prefer_cheapest) == ("m_gpu", "best_effort")


def test_pin_is_honoured_even_over_budget(selector: RouteSelector, registry: StatsRegistry) -> None:
    assert pick(selector, 1.0, tenant_pin="m_cpu") == ("m_cpu", "pinned")
    observe(registry.for_variant(CPU), *[1.0] * 10)
    assert pick(selector, 0.015, tenant_pin="m_cpu", prefer_cheapest=True) == ("m_cpu", "pinned")


def test_unavailable_pin_falls_through(selector: RouteSelector, availability: Availability) -> None:
    availability.down.add("m_cpu")
    assert pick(selector, 0.015, tenant_pin="m_cpu") == ("m_gpu", "preferred")


@pytest.mark.parametrize(("share", "expected"), [(0.1, 1000), (0.07, 700), (0.29, 2900), (1.0, 10_000)])
def test_canary_takes_exactly_its_share_of_request_keys(selector: RouteSelector, share: float, expected: int) -> None:
    canary = CanaryConfig(model="m_cpu", share=share)
    reasons = [pick(selector, 1.0, canary=canary, request_key=key) for key in range(10_000)]
    assert reasons.count(("m_cpu", "canary")) == expected
    assert reasons.count(("m_gpu", "preferred")) == 10_000 - expected


def test_canary_is_deterministic_per_request_key(selector: RouteSelector) -> None:
    canary = CanaryConfig(model="m_cpu", share=0.1)
    assert pick(selector, 1.0, canary=canary, request_key=20_005) == ("m_cpu", "canary")
    assert pick(selector, 1.0, canary=canary, request_key=20_005) == ("m_cpu", "canary")
    assert pick(selector, 1.0, canary=canary, request_key=21_000) == ("m_gpu", "preferred")


def test_canary_that_does_not_fit_or_is_down_falls_through(selector: RouteSelector, availability: Availability) -> None:
    canary = CanaryConfig(model="m_cpu", share=1.0)
    assert pick(selector, 0.011, canary=canary) == ("m_gpu", "preferred")  # CPU predicts 12 ms
    availability.down.add("m_cpu")
    assert pick(selector, 1.0, canary=canary) == ("m_gpu", "preferred")


def test_pin_wins_over_canary(selector: RouteSelector) -> None:
    canary = CanaryConfig(model="m_cpu", share=1.0)
    assert pick(selector, 1.0, canary=canary, tenant_pin="m_gpu") == ("m_gpu", "pinned")


def test_unknown_device_class_is_refused(registry: StatsRegistry, availability: Availability) -> None:
    tpu = VariantConfig(model="m_tpu", features=["x"], device="tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        RouteSelector("scores", route(tpu), DEVICES, availability, registry)


def test_an_idle_slow_variant_is_probed_again_after_reprobe_after_s() -> None:
    now = [0.0]
    stats = VariantStats(1, reprobe_after_s=1.0, clock=lambda: now[0])
    stats.started()
    stats.finished(0.5)
    assert stats.predicted_latency_s() == pytest.approx(0.5)
    now[0] = 0.9
    assert stats.predicted_latency_s() == pytest.approx(0.5)
    now[0] = 1.2
    assert stats.predicted_latency_s() == 0.0  # idle long enough: one probe
    stats.started()
    assert stats.predicted_latency_s() == pytest.approx(1.0), "only while nothing is in flight"
    stats.finished(0.5)
    assert stats.predicted_latency_s() == pytest.approx(0.5), "the probe's answer counts again"
