"""``inferline stats`` figures from real exposition text of ``ServingMetrics``, over a window, at any width."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from rich.console import Console
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.core.metrics import ServingMetrics
from inferline.stats import (
    Samples,
    Snapshot,
    StatsView,
    as_json,
    delta,
    histogram_quantile,
    model_stats,
    parse,
    render,
    route_stats,
)

LAYERS_MS = {"routing": 0.1, "features": 1.0, "model": 3.0, "post": 0.1, "total": 4.2}
LONG_ROUTE = "kserve:driver_ranker_gpu_canary"


def exposition(metrics: ServingMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def _triton(inferences: float, executions: float, queue_s: float, compute_s: float, requests: float) -> str:
    lines = []
    for name, value in (
        ("inferline_triton_inferences_total", inferences),
        ("inferline_triton_executions_total", executions),
        ("inferline_triton_queue_seconds_total", queue_s),
        ("inferline_triton_compute_seconds_total", compute_s),
        ("inferline_triton_requests_total", requests),
    ):
        lines += [f"# TYPE {name} counter", f'{name}{{model="driver_ranker"}} {value}']
    return "\n".join(lines) + "\n"


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.002)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.003)
    assert math.isnan(histogram_quantile(0.5, [(0.001, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(0.001, 0.0), (math.inf, 10.0)]) == 0.001


def _traffic(metrics: ServingMetrics, route: str = "r") -> None:
    for _ in range(80):
        metrics.observe_success(route, "standard", "PRIMARY", "", LAYERS_MS)
    for _ in range(15):
        metrics.observe_success(route, "critical", "CACHE", "DEADLINE", {**LAYERS_MS, "total": 60.0})
    for _ in range(3):
        metrics.observe_error(route, "batch", "RESOURCE_EXHAUSTED", "SHED")
    for _ in range(2):
        metrics.observe_error(route, "standard", "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")


def test_route_figures_of_known_traffic() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    _traffic(metrics)
    r = route_stats(parse(exposition(metrics)))["r"]
    assert (r.requests, r.ok, r.shed, r.over_quota, r.timeouts) == (100, 95, 3, 2, 15)
    assert r.served_by == {"PRIMARY": 80, "CACHE": 15}
    assert r.fallback_rate == pytest.approx(15 / 95)
    assert (r.shed_rate, r.quota_rate) == (pytest.approx(0.03), pytest.approx(0.02))
    p50, _, p99 = r.layer_quantiles_ms["total"]
    assert 4.0 <= p50 <= 5.0  # 4.2 ms falls in the (4, 5] ms bucket
    assert 50.0 <= p99 <= 75.0  # 60 ms falls in the (50, 75] ms bucket


class _Endpoint:
    """Successive exposition texts handed out as scrapes, at times a test sets (fake fetch and clock)."""

    def __init__(self) -> None:
        self.text = ""
        self.now = 0.0

    def fetch(self, url: str) -> Samples:
        return parse(self.text)


def test_the_window_slides_and_excludes_what_came_before_it() -> None:
    """Warm-up (a slow first call) before the window leaves the window's compute ms per request alone."""
    endpoint = _Endpoint()
    view = StatsView("http://x/metrics", window_s=30, fetch=endpoint.fetch, clock=lambda: endpoint.now)
    endpoint.text = _triton(inferences=1, executions=1, queue_s=0.0, compute_s=5.0, requests=1)  # warm-up: 5 s
    assert view.refresh() is None  # nothing to compare with yet
    for i in range(1, 8):  # every 10 s, 100 requests of 2 ms each
        endpoint.now = 10.0 * i
        endpoint.text = _triton(1 + 100 * i, 1 + 25 * i, 0.001 * i, 5.0 + 0.2 * i, 1 + 100 * i)
        snapshot = view.refresh()
        assert snapshot is not None
    assert snapshot.window_s == 30  # t=40 .. t=70: the newest scrape at least 30 s old
    model = snapshot.models["driver_ranker"]
    assert model["compute_ms"] == pytest.approx(2.0)
    assert model["batch_efficiency"] == pytest.approx(4.0)
    since_start = model_stats(delta(parse(endpoint.text), None))["driver_ranker"]
    assert since_start["compute_ms"] > 2.5  # the figure the window avoids


def test_the_window_is_the_change_between_scrapes() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    for _ in range(10):
        metrics.observe_success("r", "standard", "PRIMARY", "", LAYERS_MS)
    before = parse(exposition(metrics))
    for _ in range(4):
        metrics.observe_success("r", "standard", "LIGHT", "OVERLOAD", LAYERS_MS)
    snapshot = Snapshot.between(before, parse(exposition(metrics)), 2.0)
    window = snapshot.routes["r"]
    assert window.ok == 4 and window.served_by.get("PRIMARY", 0) == 0 and window.fallback_rate == 1.0
    assert snapshot.rate(window) == 2.0


def _snapshot() -> Snapshot:
    """Two busy routes (one with a long front-door name), an idle one and a Triton model, over 10 s."""
    metrics = ServingMetrics(CollectorRegistry())
    metrics.declare({"idle_route": []}, ["standard"])
    before = parse(exposition(metrics) + _triton(0, 0, 0, 0, 0))
    _traffic(metrics, "driver_ranking")
    _traffic(metrics, LONG_ROUTE)
    after = parse(exposition(metrics) + _triton(1200, 300, 0.06, 0.3, 600))
    return Snapshot.between(before, after, 10.0)


def _cells(snapshot: Snapshot) -> list[str]:
    """Every figure the view must show whole, as rendered."""
    return [
        "driver_ranking", LONG_ROUTE, "idle_route", "driver_ranker", "PRIMARY 84%, CACHE 16%", "15.8%", "3.0%",
        "2.0%", "10.0", "4.00", "0.10", "0.50",
    ]  # fmt: skip


@pytest.mark.parametrize("width", [80, 180])
def test_the_view_fits_the_terminal_and_cuts_no_cell(width: int) -> None:
    snapshot = _snapshot()
    console = Console(width=width, record=True, color_system=None)
    console.print(render(snapshot, width, console))
    out = console.export_text()
    assert "…" not in out
    assert all(len(line) <= width for line in out.splitlines())
    for cell in _cells(snapshot):
        assert cell in out, f"{cell!r} cut or missing at {width} columns:\n{out}"
    header = re.search(r"route\s+┃\s+req/s.*served_by.*cost/1K", out)
    if width == 180:
        assert header, out  # the table: one row per route and layer
    else:
        assert header is None and out.count("p99 ms") == 2, out  # one block per busy route


def test_json_is_the_same_figures_with_nulls_where_undefined() -> None:
    document = json.loads(json.dumps(as_json(_snapshot()), allow_nan=False))
    route = document["routes"]["driver_ranking"]
    assert route["requests_per_s"] == 10.0
    assert route["shed_rate"] == pytest.approx(0.03) and route["quota_rate"] == pytest.approx(0.02)
    assert route["latency_ms"]["features"]["p50"] is not None
    assert document["routes"]["idle_route"]["fallback_rate"] is None
    assert document["models"]["driver_ranker"]["batch_efficiency"] == 4.0


@pytest.fixture
def endpoint() -> Iterator[tuple[str, ServingMetrics]]:
    """A real HTTP metrics endpoint (prometheus_client's server) over a registry the test fills."""
    metrics = ServingMetrics(CollectorRegistry())
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    yield f"http://127.0.0.1:{server.server_port}/metrics", metrics
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_command_prints_one_window_as_json(endpoint: tuple[str, ServingMetrics]) -> None:
    url, metrics = endpoint
    metrics.observe_success("r", "standard", "PRIMARY", "", LAYERS_MS)  # before the window: not counted
    result = CliRunner().invoke(cli, ["stats", "--url", url, "--once", "--json", "--window", "0.2"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # stdout: the document alone ("measuring..." is on stderr)
    assert document["window_s"] >= 0.2
    assert document["routes"]["r"]["requests"] == 0


def test_the_command_refuses_a_window_that_is_not_positive() -> None:
    result = CliRunner().invoke(cli, ["stats", "--window", "0", "--once"])
    assert result.exit_code == 2


def test_total_sums_the_series_carrying_every_label_asked_for() -> None:
    from inferline.stats import parse, total

    samples = parse(
        'inferline_requests_total{code="OK",route="a"} 3\n'
        'inferline_requests_total{code="OK",route="b"} 4\n'
        'inferline_requests_total{code="NOT_FOUND",route="a"} 1\n'
        'inferline_shed_total{route="a"} 9\n'
    )
    assert total(samples, "inferline_requests_total") == 8
    assert total(samples, "inferline_requests_total", code="OK") == 7
    assert total(samples, "inferline_requests_total", code="OK", route="a") == 3
    assert total(samples, "inferline_requests_total", code="UNAVAILABLE") == 0
