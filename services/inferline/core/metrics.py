"""Prometheus metrics of the serving path, defined on an injected registry.

Names start with ``inferline_``; labels are bounded (route, traffic_class, served_by,
code, layer) so cardinality cannot grow with traffic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# 0.5 ms .. 10 s, fine enough around typical online deadlines for p95/p99.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
)
LAYERS = ("routing", "features", "model", "post", "total")


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "inferline_requests_total",
            "Predict requests by outcome",
            ["route", "traffic_class", "served_by", "code"],
            registry=registry,
        )
        self.layer_latency = Histogram(
            "inferline_layer_latency_seconds",
            "Time spent per layer of a Predict request",
            ["route", "traffic_class", "layer"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    def observe_success(self, route: str, traffic_class: str, served_by: str, layer_ms: dict[str, float]) -> None:
        self.requests.labels(route, traffic_class, served_by, "OK").inc()
        for layer, ms in layer_ms.items():
            self.layer_latency.labels(route, traffic_class, layer).observe(ms / 1000)

    def observe_error(self, route: str, traffic_class: str, code: str) -> None:
        self.requests.labels(route, traffic_class, "", code).inc()
