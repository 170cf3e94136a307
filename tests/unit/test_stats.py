"""``inferline stats`` figures from real exposition text of ``ServingMetrics``."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from inferline.core.metrics import ServingMetrics
from inferline.stats import delta, histogram_quantile, model_stats, parse, render, route_stats

LAYERS_MS = {"routing": 0.1, "features": 1.0, "model": 3.0, "post": 0.1, "total": 4.2}


def exposition(metrics: ServingMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.002)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.003)
    assert math.isnan(histogram_quantile(0.5, [(0.001, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(0.001, 0.0), (math.inf, 10.0)]) == 0.001


def test_route_figures_of_known_traffic() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    for _ in range(80):
        metrics.observe_success("r", "standard", "PRIMARY", "", LAYERS_MS)
    for _ in range(15):
        metrics.observe_success("r", "critical", "CACHE", "DEADLINE", {**LAYERS_MS, "total": 60.0})
    for _ in range(5):
        metrics.observe_error("r", "batch", "RESOURCE_EXHAUSTED")
    routes = route_stats(parse(exposition(metrics)), {})
    r = routes["r"]
    assert (r.requests, r.ok, r.rejected, r.timeouts) == (100, 95, 5, 15)
    assert r.served_by == {"PRIMARY": 80, "CACHE": 15}
    assert r.fallback_rate == pytest.approx(15 / 95)
    assert r.rejected_rate == pytest.approx(0.05)
    p50, _, p99 = r.layer_quantiles_ms["total"]
    assert 4.0 <= p50 <= 5.0  # 4.2 ms falls in the (4, 5] ms bucket
    assert 50.0 <= p99 <= 75.0  # 60 ms falls in the (50, 75] ms bucket


def test_the_window_is_the_change_between_scrapes() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    for _ in range(10):
        metrics.observe_success("r", "standard", "PRIMARY", "", LAYERS_MS)
    before = parse(exposition(metrics))
    for _ in range(4):
        metrics.observe_success("r", "standard", "LIGHT", "OVERLOAD", LAYERS_MS)
    after = parse(exposition(metrics))
    window = route_stats(delta(after, before), after)["r"]
    assert window.ok == 4 and window.served_by.get("PRIMARY", 0) == 0 and window.fallback_rate == 1.0


def test_model_figures_and_rendering() -> None:
    text = "\n".join(
        [
            "# TYPE inferline_triton_inferences_total counter",
            'inferline_triton_inferences_total{model="m"} 120',
            "# TYPE inferline_triton_executions_total counter",
            'inferline_triton_executions_total{model="m"} 30',
            "# TYPE inferline_triton_queue_seconds_total counter",
            'inferline_triton_queue_seconds_total{model="m"} 0.06',
            "# TYPE inferline_triton_compute_seconds_total counter",
            'inferline_triton_compute_seconds_total{model="m"} 0.3',
            "# TYPE inferline_triton_requests_total counter",
            'inferline_triton_requests_total{model="m"} 60',
            "# TYPE inferline_cost_per_1k_requests gauge",
            'inferline_cost_per_1k_requests{route="r"} 0.0123',
            "",
        ]
    )
    samples = parse(text)
    models = model_stats(samples, samples)
    assert models["m"]["batch_efficiency"] == 4.0
    assert models["m"]["queue_ms"] == pytest.approx(1.0)
    assert models["m"]["compute_ms"] == pytest.approx(5.0)
    routes = route_stats(samples, samples)
    assert routes["r"].cost_per_1k == pytest.approx(0.0123)
    console = Console(record=True, width=200)
    console.print(render(routes, models, 2.0))
    out = console.export_text()
    assert "0.0123" in out and "4.00" in out and "last 2.0 s" in out
