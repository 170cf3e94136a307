"""Prometheus metrics of the serving path, defined on an injected registry.

Names start with ``inferline_``; labels are bounded (route, traffic_class, served_by,
reason, code, layer, model, tenant: each a value the configuration names) so cardinality
cannot grow with traffic. Label children are bound once per label set and reused:
``labels()`` costs a lock and a dict lookup per call.

``declare`` creates, at zero, every series the dashboard and the alert rules
(``deploy/grafana``) read, for the configured routes, classes, models and tenants: a
healthy router that has seen no failure shows zeros, not "no data". One label scheme names
what a request was for: a Predict route by its name, a KServe front-door call by
``front_door_route(model)`` (``kserve:<model>``), on request counters and admission gauges alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferline.core.config import InferlineConfig
from inferline.core.errors import InferlineError, Shed
from inferline.core.fast_histogram import FastHistogram

# 0.5 ms .. 10 s, fine enough around typical online deadlines for p95/p99.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
"""Every traffic class's default deadline is a bound (0.1, 0.25, 2 s), so the alert rules count
answers later than their class's deadline exactly (``le`` = the deadline)."""
LAYERS = ("routing", "features", "model", "post", "total")
FRONT_DOOR_PREFIX = "kserve:"
FALLBACKS = ("LIGHT", "CACHE", "BASELINE")
SHED_REASONS = ("SHED", "QUOTA_EXCEEDED")


def front_door_route(model: str) -> str:
    """The ``route`` label (and admission key) of KServe front-door calls of ``model``."""
    return FRONT_DOOR_PREFIX + model


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "inferline_requests_total",
            "Requests by outcome; reason: why an OK answer was degraded, or for RESOURCE_EXHAUSTED whether "
            "admission shed it (SHED) or its tenant was over quota (QUOTA_EXCEEDED)",
            ["route", "traffic_class", "served_by", "reason", "code"],
            registry=registry,
        )
        self.layer_latency = FastHistogram(
            "inferline_layer_latency_seconds",
            "Time spent per layer of a Predict request",
            ["route", "traffic_class", "layer"],
            LATENCY_BUCKETS_S,
            registry,
        )
        self.recovery = Histogram(
            "inferline_recovery_seconds",
            "From a failed model dependency being healthy again to the first PRIMARY answer",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )
        self.breaker_open = Gauge(
            "inferline_circuit_open", "1 while the model's circuit breaker is open or half-open", ["model"],
            registry=registry,
        )  # fmt: skip
        self.shed = Counter(
            "inferline_shed_total",
            "Requests refused before any work: over quota (QUOTA_EXCEEDED) or shed by admission (SHED)",
            ["route", "traffic_class", "reason"],
            registry=registry,
        )
        self.admission_limit = Gauge(
            "inferline_admission_limit", "Adaptive concurrency limit of the route", ["route"], registry=registry
        )
        self.admission_in_flight = Gauge(
            "inferline_in_flight", "Requests of the route admitted and not yet answered", ["route"], registry=registry
        )
        self.admission_protected_misses = Gauge(
            "inferline_protected_miss_rate",
            "Recent share of the route's answers to classes that may not be shed that missed their deadline; "
            "over admission.protected_miss_rate every sheddable class is shed",
            ["route"],
            registry=registry,
        )
        self.queue_wait = Gauge(
            "inferline_queue_wait_seconds",
            "The router's queue wait: average lateness of its event loop, or of gateway requests' wait "
            "before their handler, whichever is longer",
            registry=registry,
        )
        self.untrusted_headers = Counter(
            "inferline_untrusted_headers_total",
            "Gateway-only headers (x-inferline-ingress-timeout, x-inferline-gateway-secret) on calls that did "
            "not carry the gateway's secret: ignored",
            ["header"],
            registry=registry,
        )
        self.quota_exceeded = Counter(
            "inferline_quota_exceeded_total",
            "Requests refused because their tenant was over its quota (tenants.*.quota): the tenant's signal",
            ["tenant"],
            registry=registry,
        )
        self.merged_requests = Counter(
            "inferline_merged_requests_total",
            "KServe front-door requests sent to Triton merged with others into one call (the rows stacked), by model",
            ["model"],
            registry=registry,
        )
        self.model_calls = Counter(
            "inferline_model_calls_total",
            "Answers produced by a model (PRIMARY or LIGHT), by route: how a model's cost is split between routes",
            ["route", "model"],
            registry=registry,
        )
        self.answered: dict[str, int] = {}
        """Per route: requests answered (any served_by), the denominator of cost per 1K requests."""
        self.model_rows: dict[tuple[str, str], int] = {}
        """Per (route, model): entity rows of the answers the model produced (cost attribution)."""
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, key: tuple[str, ...], make: Any) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = make()
        return child

    def declare(
        self,
        routes: Mapping[str, Iterable[str]],
        traffic_classes: Iterable[str],
        *,
        layers: Iterable[str] = LAYERS,
        degradable: bool = True,
        tenants: Iterable[str] = (),
    ) -> None:
        """Create the series of ``routes`` (route → the models it calls) and tenants at zero.

        Per route and class: OK answers by PRIMARY (and, when ``degradable``, by each fallback
        for DEADLINE), RESOURCE_EXHAUSTED by SHED and QUOTA_EXCEEDED, DEADLINE_EXCEEDED, the
        latency of ``layers``; per route and model: model calls; per model: circuit state
        (closed) and recovery time; per tenant: quota refusals.
        """
        classes = tuple(traffic_classes)
        answers = [("PRIMARY", "", "OK")]
        if degradable:
            answers += [(fallback, "DEADLINE", "OK") for fallback in FALLBACKS]
        answers += [("", reason, "RESOURCE_EXHAUSTED") for reason in SHED_REASONS]
        answers.append(("", "", "DEADLINE_EXCEEDED"))
        for route, models in routes.items():
            for cls in classes:
                for served_by, reason, code in answers:
                    self.requests.labels(route, cls, served_by, reason, code)
                for reason in SHED_REASONS:
                    self.shed.labels(route, cls, reason)
                for layer in layers:
                    self.layer_latency.declare((route, cls, layer))
            for model in models:
                self.model_calls.labels(route, model)
                self.breaker_open.labels(model)
                self.recovery.labels(model)
        for tenant in tenants:
            self.quota_exceeded.labels(tenant)

    def declare_config(self, config: InferlineConfig, *, front_door: bool) -> None:
        """``declare`` what ``config`` names: its routes, and with ``front_door`` each model's KServe route."""
        routes = {name: [v.model for v in route.all_variants] for name, route in config.routes.items()}
        self.declare(routes, config.traffic_classes, tenants=config.tenants)
        if front_door:
            models = sorted(config.served_models)
            front = {front_door_route(model): [model] for model in models}
            self.declare(front, config.traffic_classes, layers=("total",), degradable=False)
            for model in models:
                self.merged_requests.labels(model)

    def observe_success(
        self, route: str, traffic_class: str, served_by: str, reason: str, layer_ms: dict[str, float]
    ) -> None:
        self._child(("req", route, traffic_class, served_by, reason), lambda: self.requests.labels(
            route, traffic_class, served_by, reason, "OK")).inc()  # fmt: skip
        self.answered[route] = self.answered.get(route, 0) + 1
        observe = self.layer_latency.observe
        for layer, ms in layer_ms.items():
            observe((route, traffic_class, layer), ms / 1000)

    def observe_model_answer(self, route: str, model: str, rows: int) -> None:
        """Count an answer of ``route`` that ``model`` produced for ``rows`` entities; no model, no count.

        ``model`` is the name Triton answered with (a traffic class's copy keeps its own name).
        """
        if not model:
            return
        key = (route, model)
        self._child(("call", route, model), lambda: self.model_calls.labels(route, model)).inc()
        self.model_rows[key] = self.model_rows.get(key, 0) + rows

    def observe_error(self, route: str, traffic_class: str, code: str, reason: str = "") -> None:
        self.requests.labels(route, traffic_class, "", reason, code).inc()

    def observe_failure(self, route: str, traffic_class: str, err: InferlineError) -> None:
        """A request that ended in ``err``: counted by its status code, and as shed (SHED or
        QUOTA_EXCEEDED, also its ``reason``) when it was: an over-quota tenant is not an overloaded router."""
        if isinstance(err, Shed):
            self.shed.labels(route, traffic_class, err.reason).inc()
            self.observe_error(route, traffic_class, err.code.name, err.reason)
        else:
            self.observe_error(route, traffic_class, err.code.name)
