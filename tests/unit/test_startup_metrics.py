"""Before any traffic, every series the dashboard and the alert rules read exists (at zero); quota refusals
are labelled apart from shedding; one route label names KServe front-door calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferline.core.config import QuotaConfig, TenantConfig, load_config
from inferline.core.errors import DeadlineExceeded, QuotaExceeded, Shed
from inferline.core.metrics import ServingMetrics, front_door_route
from inferline.router.quota import CountingRateLimiter, LocalRateLimiter
from tests.dashboard_queries import ROOT, dashboard_and_alert_selectors, unmatched

CONFIG = ROOT / "deploy" / "local" / "inferline.yaml"
ELSEWHERE = (
    "inferline_triton_",
    "inferline_cost_",
    "inferline_device_",
    "inferline_admission_limit",
    "inferline_in_flight",
    "inferline_protected_miss_rate",
)
"""Series of the Triton statistics collector (from Triton's own figures) and the admission gauges (bound to
the app's controllers): tests/integration/test_metrics_values.py checks those on a real router."""


def _samples(metrics: ServingMetrics) -> list[tuple[str, dict[str, str]]]:
    text = generate_latest(metrics.registry).decode()
    return [(s.name, s.labels) for f in text_string_to_metric_families(text) for s in f.samples]


def _declared() -> ServingMetrics:
    metrics = ServingMetrics(CollectorRegistry())
    metrics.declare_config(load_config(CONFIG), front_door=True)
    return metrics


def test_every_selector_of_the_dashboard_and_alerts_matches_a_series_before_any_traffic() -> None:
    samples = _samples(_declared())
    selected = dashboard_and_alert_selectors(keep=lambda name: not name.startswith(ELSEWHERE))
    assert selected
    missing = {where: unmatched(found, samples) for where, found in selected.items()}
    assert not {where: m for where, m in missing.items() if m}


def test_undeclared_metrics_leave_selectors_without_series() -> None:
    """The check above can fail: a router that declares nothing shows "no data" for most panels."""
    samples = _samples(ServingMetrics(CollectorRegistry()))
    selected = dashboard_and_alert_selectors(keep=lambda name: not name.startswith(ELSEWHERE))
    assert any(unmatched(found, samples) for found in selected.values())


def test_declared_series_are_zero() -> None:
    values = [
        s.value
        for f in text_string_to_metric_families(generate_latest(_declared().registry).decode())
        for s in f.samples
        if not s.name.endswith("_created")
    ]
    assert values and all(v == 0 for v in values)


def test_front_door_routes_and_every_class_are_declared() -> None:
    config = load_config(CONFIG)
    samples = _samples(_declared())
    routes = {labels["route"] for name, labels in samples if name == "inferline_requests_total"}
    models = {v.model for route in config.routes.values() for v in route.all_variants}
    assert routes == set(config.routes) | {front_door_route(m) for m in models}
    assert front_door_route("driver_ranker") == "kserve:driver_ranker"
    classes = {labels["traffic_class"] for name, labels in samples if name == "inferline_requests_total"}
    assert classes == set(config.traffic_classes)
    circuits = {labels["model"] for name, labels in samples if name == "inferline_circuit_open"}
    assert circuits == models


def test_quota_refusals_and_shedding_carry_their_reason() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    metrics.observe_failure("r", "standard", QuotaExceeded("over quota", 1.0))
    metrics.observe_failure("r", "batch", Shed("overloaded", 1.0))
    metrics.observe_failure("r", "critical", DeadlineExceeded("late"))
    counted = {
        (labels["traffic_class"], labels["code"], labels["reason"])
        for name, labels in _samples(metrics)
        if name == "inferline_requests_total"
    }
    assert counted == {
        ("standard", "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        ("batch", "RESOURCE_EXHAUSTED", "SHED"),
        ("critical", "DEADLINE_EXCEEDED", ""),
    }


async def test_the_counting_rate_limiter_reports_each_refusal_of_a_tenant() -> None:
    tenants = {
        "acme": TenantConfig(routes=["r"], quota=QuotaConfig(rate_per_s=1, burst=2)),
        "free": TenantConfig(routes=["r"]),
    }
    refused: list[str] = []
    limiter = CountingRateLimiter(LocalRateLimiter(tenants, clock=lambda: 100.0), refused.append)
    decisions = [(await limiter.check(t)).allowed for t in ("acme", "acme", "acme", "free", "acme")]
    assert decisions == [True, True, False, True, False]
    assert refused == ["acme", "acme"]
    await limiter.close()
