"""``inferline stats``: the router's metrics over a sliding window, per route and per Triton model.

It reads the router's Prometheus endpoint (no Prometheus server needed) and keeps the
scrapes of the last ``window_s`` seconds (60 by default): every figure is the change from
the oldest of them to the newest, never a total since start (which would mix in warm-up).
Per route: request rate, per-layer latency quantiles from the histogram buckets' increase
(interpolated within a bucket, as PromQL's ``histogram_quantile`` does), served_by shares,
fallback, shed, over-quota and timeout rates and the device cost per 1K answers; per Triton
model: batch efficiency and queue / compute ms per request. ``render`` fits the terminal:
a table where it fits, else one block per route; ``as_json`` is the same for scripts.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

LAYERS = ("routing", "features", "model", "post", "total")
QUANTILES = (0.5, 0.95, 0.99)
DEFAULT_WINDOW_S = 60.0
_UNBOUNDED = 10_000

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


def total(samples: Samples, metric: str, **labels: str) -> float:
    """Sum of ``metric`` over every series that carries all of ``labels`` (the others free)."""
    want = set(labels.items())
    return sum(v for (name, have), v in samples.items() if name == metric and want <= set(have))


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
    shed: float = 0.0
    """RESOURCE_EXHAUSTED because admission shed the request (overload)."""
    over_quota: float = 0.0
    """RESOURCE_EXHAUSTED because the tenant was over its quota (the tenant's signal)."""
    timeouts: float = 0.0
    """Answers degraded because the main path ran out of time (reason DEADLINE), and DEADLINE_EXCEEDED errors."""
    layer_quantiles_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    cost: float = math.nan
    """Device cost of the route's answers in the window (NaN: no cost figures, no Triton statistics)."""

    @property
    def fallback_rate(self) -> float:
        return 1 - self.served_by.get("PRIMARY", 0.0) / self.ok if self.ok else math.nan

    @property
    def shed_rate(self) -> float:
        return self.shed / self.requests if self.requests else math.nan

    @property
    def quota_rate(self) -> float:
        return self.over_quota / self.requests if self.requests else math.nan

    @property
    def timeout_rate(self) -> float:
        return self.timeouts / self.requests if self.requests else math.nan

    @property
    def cost_per_1k(self) -> float:
        return self.cost / self.ok * 1000 if self.ok else math.nan


def route_stats(window: Samples) -> dict[str, RouteStats]:
    """Per-route figures of one window of increases."""
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
                if lab.get("reason") == "QUOTA_EXCEEDED":
                    stats.over_quota += value
                else:
                    stats.shed += value
            elif lab["code"] == "DEADLINE_EXCEEDED":
                stats.timeouts += value
        elif name == "inferline_layer_latency_seconds_bucket":
            # Summed over traffic classes: the figures are per route.
            buckets[(lab["route"], lab["layer"])].append((float(lab["le"]), value))
        elif name == "inferline_cost_total":
            stats = of(lab["route"])
            stats.cost = (0.0 if math.isnan(stats.cost) else stats.cost) + value
    for (route, layer), per_class in buckets.items():
        merged: dict[float, float] = defaultdict(float)
        for bound, count in per_class:
            merged[bound] += count
        of(route).layer_quantiles_ms[layer] = tuple(histogram_quantile(q, merged.items()) * 1000 for q in QUANTILES)
    return routes


def model_stats(window: Samples) -> dict[str, dict[str, float]]:
    """Per Triton model: batch efficiency (rows per execution), queue and compute ms per request, in the window.

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


@dataclass
class Snapshot:
    """What happened in one window: per route, per model, and how long the window was."""

    window_s: float
    routes: dict[str, RouteStats]
    models: dict[str, dict[str, float]]

    @classmethod
    def between(cls, previous: Samples, current: Samples, window_s: float) -> Snapshot:
        window = delta(current, previous)
        return cls(window_s, route_stats(window), model_stats(window))

    def active_routes(self) -> list[RouteStats]:
        return [self.routes[r] for r in sorted(self.routes) if self.routes[r].requests > 0]

    def idle_routes(self) -> list[str]:
        return [r for r in sorted(self.routes) if self.routes[r].requests <= 0]

    def rate(self, stats: RouteStats) -> float:
        return stats.requests / self.window_s if self.window_s > 0 else math.nan


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.1f}%"


def _num(x: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _shares(stats: RouteStats) -> str:
    ordered = sorted(stats.served_by.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / stats.ok * 100:.0f}%" for k, v in ordered if v and stats.ok)


def _quantiles(stats: RouteStats, layer: str) -> tuple[float, ...]:
    return stats.layer_quantiles_ms.get(layer, (math.nan,) * len(QUANTILES))


def _table(title: str, columns: Iterable[str], left: Iterable[str]) -> Table:
    table = Table(title=title, title_justify="left")
    lefts = set(left)
    for column in columns:
        # A cell is never cut: a column too narrow for its cells makes the caller pick the narrow layout.
        table.add_column(column, justify="left" if column in lefts else "right", no_wrap=True, overflow="fold")
    return table


def _wide_routes(snapshot: Snapshot) -> Table:
    columns = ("route", "req/s", "layer", "p50 ms", "p95 ms", "p99 ms", "served_by", "fallback", "shed",
               "quota", "timeouts", "cost/1K")  # fmt: skip
    table = _table(f"inferline routes (last {snapshot.window_s:.0f} s)", columns, ("route", "layer", "served_by"))
    for stats in snapshot.active_routes():
        for i, layer in enumerate(LAYERS):
            first = i == 0
            table.add_row(
                stats.route if first else "",
                _num(snapshot.rate(stats), ".1f") if first else "",
                layer,
                *(_num(v) for v in _quantiles(stats, layer)),
                _shares(stats) if first else "",
                _pct(stats.fallback_rate) if first else "",
                _pct(stats.shed_rate) if first else "",
                _pct(stats.quota_rate) if first else "",
                _pct(stats.timeout_rate) if first else "",
                _num(stats.cost_per_1k, ".4f") if first else "",
            )
    return table


def _route_block(snapshot: Snapshot, stats: RouteStats) -> Group:
    """One route, narrow: its figures as lines, then its latency per layer."""
    lines = [
        Text.assemble((stats.route, "bold"), f"  {_num(snapshot.rate(stats), '.1f')} req/s"),
        Text(f"served_by  {_shares(stats) or '-'}"),
        Text(
            f"fallback {_pct(stats.fallback_rate)}  shed {_pct(stats.shed_rate)}  quota {_pct(stats.quota_rate)}  "
            f"timeouts {_pct(stats.timeout_rate)}  cost/1K {_num(stats.cost_per_1k, '.4f')}"
        ),
    ]
    latency = _table("", ("layer", "p50 ms", "p95 ms", "p99 ms"), ("layer",))
    for layer in LAYERS:
        latency.add_row(layer, *(_num(v) for v in _quantiles(stats, layer)))
    return Group(*lines, latency)


def _models(snapshot: Snapshot) -> Table:
    table = _table("Triton models", ("model", "rows/exec", "queue ms/req", "compute ms/req"), ("model",))
    for model in sorted(snapshot.models):
        m = snapshot.models[model]
        table.add_row(
            model, _num(m.get("batch_efficiency", math.nan)), _num(m.get("queue_ms", math.nan)),
            _num(m.get("compute_ms", math.nan)),
        )  # fmt: skip
    return table


def _fits(console: Console, renderable: RenderableType, width: int) -> bool:
    """Whether ``renderable`` at its natural width (measured with room to spare) fits in ``width``."""
    options: ConsoleOptions = console.options.update_width(_UNBOUNDED)
    return Measurement.get(console, options, renderable).maximum <= width


def render(snapshot: Snapshot, width: int, console: Console | None = None) -> Group:
    """The routes as a table where ``width`` holds it, else one block per route; then the models."""
    console = console or Console(width=width)
    parts: list[RenderableType] = []
    wide = _wide_routes(snapshot)
    if _fits(console, wide, width):
        parts.append(wide)
    else:
        parts.append(Text(f"inferline routes (last {snapshot.window_s:.0f} s)", style="italic"))
        for stats in snapshot.active_routes():
            parts += [Text(""), _route_block(snapshot, stats)]
    if not snapshot.active_routes():
        parts.append(Text("no requests in the window"))
    if idle := snapshot.idle_routes():
        parts.append(Text("idle: " + ", ".join(idle), overflow="fold"))
    parts += [Text(""), _models(snapshot)]
    return Group(*parts)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def as_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot for scripts: rates per second and shares in 0..1, null where undefined."""
    routes = {
        stats.route: {
            "requests": stats.requests,
            "requests_per_s": _finite(snapshot.rate(stats)),
            "served_by": {k: _finite(v / stats.ok) if stats.ok else None for k, v in stats.served_by.items() if v},
            "fallback_rate": _finite(stats.fallback_rate),
            "shed_rate": _finite(stats.shed_rate),
            "quota_rate": _finite(stats.quota_rate),
            "timeout_rate": _finite(stats.timeout_rate),
            "cost_per_1k": _finite(stats.cost_per_1k),
            "latency_ms": {
                layer: dict(zip(("p50", "p95", "p99"), map(_finite, _quantiles(stats, layer)), strict=True))
                for layer in LAYERS
            },
        }
        for stats in snapshot.routes.values()
    }
    models = {
        model: {k: _finite(m.get(k, math.nan)) for k in ("batch_efficiency", "queue_ms", "compute_ms")}
        for model, m in snapshot.models.items()
    }
    return {"window_s": snapshot.window_s, "routes": routes, "models": models}


class StatsView:
    """Scrapes of one router over a sliding window of ``window_s`` seconds.

    ``refresh`` scrapes and compares with the oldest scrape still in the window (the newest
    one at least ``window_s`` old, once there is one): None until there are two scrapes.
    """

    def __init__(
        self,
        url: str,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        fetch: Callable[[str], Samples] = scrape,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self._url = url
        self._window_s = window_s
        self._fetch = fetch
        self._clock = clock
        self._scrapes: deque[tuple[float, Samples]] = deque()

    def refresh(self) -> Snapshot | None:
        current = self._fetch(self._url)
        now = self._clock()
        self._scrapes.append((now, current))
        # Keep one scrape at least window_s old (the baseline), and drop the ones before it.
        while len(self._scrapes) > 2 and now - self._scrapes[1][0] >= self._window_s:
            self._scrapes.popleft()
        if len(self._scrapes) < 2:
            return None
        then, previous = self._scrapes[0]
        return Snapshot.between(previous, current, now - then)


def _measure_once(view: StatsView, window_s: float) -> Snapshot:
    """Two scrapes ``window_s`` apart (the wait is the measurement itself); says so on stderr after the first."""
    import sys

    view.refresh()
    print(f"measuring for {window_s:g} s (--window)...", file=sys.stderr, flush=True)
    time.sleep(window_s)
    snapshot = view.refresh()
    if snapshot is None:
        raise RuntimeError("a second scrape gave no window")  # cannot happen: two scrapes were taken
    return snapshot


def run(url: str, *, interval_s: float, window_s: float, once: bool, json_lines: bool) -> None:
    """``inferline stats``: live, or ``once`` (one window, then exit); ``json_lines``: one JSON object per refresh.

    Raises:
        urllib.error.URLError, OSError: the endpoint cannot be read.
    """
    import json
    import sys

    from rich.live import Live

    view = StatsView(url, window_s)
    console = Console()
    if once:
        snapshot = _measure_once(view, window_s)
        if json_lines:
            sys.stdout.write(json.dumps(as_json(snapshot)) + "\n")
        else:
            console.print(render(snapshot, console.width, console))
        return
    if json_lines:
        view.refresh()
        while True:
            time.sleep(interval_s)
            if (latest := view.refresh()) is not None:
                sys.stdout.write(json.dumps(as_json(latest)) + "\n")
                sys.stdout.flush()
    waiting = Text(f"first figures in {interval_s:g} s; a window grows to {window_s:g} s", style="dim")
    view.refresh()
    with Live(waiting, console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval_s)
            if (latest := view.refresh()) is not None:
                live.update(render(latest, console.width, console))
