"""``inferline stats``: the router's metrics as a live table, per route.

It reads the router's Prometheus endpoint (no Prometheus server needed), keeps the last
scrape, and shows what happened *between* two scrapes: per-layer latency quantiles from
the histogram buckets' increase (interpolated within a bucket, as PromQL's
``histogram_quantile`` does), served_by shares, fallback, rejected and timeout rates,
Triton's batch efficiency and the cost per 1K requests. The first screen, with nothing to
compare against, shows totals since the router started.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

LAYERS = ("routing", "features", "model", "post", "total")
QUANTILES = (0.5, 0.95, 0.99)

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    """Exposition text → ``{(sample name, sorted labels): value}``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    """One scrape of ``url`` (``http://host:port/metrics``)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read().decode())


def delta(current: Samples, previous: Samples | None) -> Samples:
    """Increase of every sample since ``previous`` (counters and histograms; a reset counts from 0)."""
    if previous is None:
        return dict(current)
    out: Samples = {}
    for key, value in current.items():
        before = previous.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The ``q`` quantile from cumulative ``(upper bound, count)`` buckets, linearly within a bucket; NaN if empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # past the last finite bucket: its bound is the best we know
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class RouteStats:
    route: str
    requests: float = 0.0
    ok: float = 0.0
    served_by: dict[str, float] = field(default_factory=dict)
    rejected: float = 0.0
    timeouts: float = 0.0
    """Answers degraded because the main path ran out of time (reason DEADLINE), and DEADLINE_EXCEEDED errors."""
    layer_quantiles_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    cost_per_1k: float = math.nan

    @property
    def fallback_rate(self) -> float:
        return 1 - self.served_by.get("PRIMARY", 0.0) / self.ok if self.ok else math.nan

    @property
    def rejected_rate(self) -> float:
        return self.rejected / self.requests if self.requests else math.nan

    @property
    def timeout_rate(self) -> float:
        return self.timeouts / self.requests if self.requests else math.nan


def route_stats(window: Samples, gauges: Samples) -> dict[str, RouteStats]:
    """Per-route figures of one window of increases (``window``) and the latest gauges."""
    routes: dict[str, RouteStats] = {}

    def of(route: str) -> RouteStats:
        return routes.setdefault(route, RouteStats(route))

    buckets: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (name, labels), value in window.items():
        lab = dict(labels)
        if name == "inferline_requests_total":
            stats = of(lab["route"])
            stats.requests += value
            if lab["code"] == "OK":
                stats.ok += value
                stats.served_by[lab["served_by"]] = stats.served_by.get(lab["served_by"], 0.0) + value
                if lab["reason"] == "DEADLINE":
                    stats.timeouts += value
            elif lab["code"] == "RESOURCE_EXHAUSTED":
                stats.rejected += value
            elif lab["code"] == "DEADLINE_EXCEEDED":
                stats.timeouts += value
        elif name == "inferline_layer_latency_seconds_bucket":
            # Summed over traffic classes: the table is per route.
            buckets[(lab["route"], lab["layer"])].append((float(lab["le"]), value))
    for (route, layer), per_class in buckets.items():
        merged: dict[float, float] = defaultdict(float)
        for bound, count in per_class:
            merged[bound] += count
        of(route).layer_quantiles_ms[layer] = tuple(histogram_quantile(q, merged.items()) * 1000 for q in QUANTILES)
    for (name, labels), value in gauges.items():
        if name == "inferline_cost_per_1k_requests":
            of(dict(labels)["route"]).cost_per_1k = value
    return routes


def model_stats(window: Samples, gauges: Samples) -> dict[str, dict[str, float]]:
    """Per Triton model: batch efficiency (rows per execution) in the window, queue and compute ms per request.

    Triton sums queue and compute time per request (each request of a batch is charged the
    whole batch's compute), so both are divided by the requests it completed."""
    models: dict[str, dict[str, float]] = defaultdict(dict)
    names = {
        "inferline_triton_inferences_total": "inferences",
        "inferline_triton_executions_total": "executions",
        "inferline_triton_queue_seconds_total": "queue_s",
        "inferline_triton_compute_seconds_total": "compute_s",
        "inferline_triton_requests_total": "requests",
    }
    for (name, labels), value in window.items():
        if name in names:
            models[dict(labels)["model"]][names[name]] = value
    for figures in models.values():
        executions = figures.get("executions", 0.0)
        figures["batch_efficiency"] = figures.get("inferences", 0.0) / executions if executions else math.nan
        requests = figures.get("requests", 0.0)
        figures["queue_ms"] = figures.get("queue_s", 0.0) * 1000 / requests if requests else math.nan
        figures["compute_ms"] = figures.get("compute_s", 0.0) * 1000 / requests if requests else math.nan
    return dict(models)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.1f}%"


def _num(x: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(x) else format(x, spec)


def render(routes: Mapping[str, RouteStats], models: Mapping[str, Mapping[str, float]], window_s: float) -> Group:
    """The two tables: per route, and per Triton model."""
    title = f"last {window_s:.1f} s" if window_s > 0 else "since start"
    table = Table(title=f"inferline routes ({title})")
    for column in ("route", "req/s" if window_s > 0 else "requests", "layer", "p50 ms", "p95 ms", "p99 ms",
                   "served_by", "fallback", "rejected", "timeouts", "cost/1K"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("route", "layer", "served_by") else "right")
    for route in sorted(routes):
        stats = routes[route]
        rate = stats.requests / window_s if window_s > 0 else stats.requests
        shares = ", ".join(
            f"{k} {v / stats.ok * 100:.0f}%" for k, v in sorted(stats.served_by.items(), key=lambda kv: -kv[1]) if v
        )
        for i, layer in enumerate(LAYERS):
            q = stats.layer_quantiles_ms.get(layer, (math.nan,) * len(QUANTILES))
            first = i == 0
            table.add_row(
                route if first else "",
                _num(rate, ".1f") if first else "",
                layer,
                *(_num(v) for v in q),
                shares if first else "",
                _pct(stats.fallback_rate) if first else "",
                _pct(stats.rejected_rate) if first else "",
                _pct(stats.timeout_rate) if first else "",
                _num(stats.cost_per_1k, ".4f") if first else "",
            )
    model_table = Table(title="Triton models")
    for column in ("model", "batch efficiency (rows/execution)", "queue ms/request", "compute ms/request"):
        model_table.add_column(column, justify="left" if column == "model" else "right")
    for model in sorted(models):
        m = models[model]
        model_table.add_row(
            model, _num(m.get("batch_efficiency", math.nan)), _num(m.get("queue_ms", math.nan)),
            _num(m.get("compute_ms", math.nan)),
        )  # fmt: skip
    return Group(table, model_table)


class StatsView:
    """Successive scrapes of one router, rendered as the change since the previous one."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._previous: Samples | None = None
        self._previous_at = 0.0

    def refresh(self) -> Group:
        current = scrape(self._url)
        now = time.monotonic()
        window = delta(current, self._previous)
        window_s = now - self._previous_at if self._previous is not None else 0.0
        self._previous, self._previous_at = current, now
        return render(route_stats(window, current), model_stats(window, current), window_s)
