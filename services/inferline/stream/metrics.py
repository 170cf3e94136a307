"""A stream worker's Prometheus metrics (injected registry; KEDA and Grafana read the lag)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry, route: str) -> None:
        labels = {"route": route}
        self.lag = Gauge(
            "inferline_stream_lag", "Events in the stream not yet delivered to the group", ["route"], registry=registry
        ).labels(**labels)
        self.light_mode = Gauge(
            "inferline_stream_light_mode", "1 while lag has switched the worker to the light model", ["route"],
            registry=registry,
        ).labels(**labels)  # fmt: skip
        self.in_flight = Gauge(
            "inferline_stream_in_flight", "Events read and not yet acknowledged", ["route"], registry=registry
        ).labels(**labels)
        self._events = Counter(
            "inferline_stream_events_total", "Events answered, by who served them", ["route", "served_by"],
            registry=registry,
        )  # fmt: skip
        self._route = route
        self.dead_letters = Counter(
            "inferline_stream_dead_letters_total", "Poison events parked in the dead-letter stream", ["route"],
            registry=registry,
        ).labels(**labels)  # fmt: skip
        self.failures = Counter(
            "inferline_stream_failures_total", "Failed attempts (left pending, retried after the claim idle time)",
            ["route"], registry=registry,
        ).labels(**labels)  # fmt: skip
        self.latency = Histogram(
            "inferline_stream_latency_seconds", "Event time to output written",
            ["route"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        ).labels(**labels)  # fmt: skip

    def answered(self, served_by: str) -> None:
        self._events.labels(route=self._route, served_by=served_by).inc()
