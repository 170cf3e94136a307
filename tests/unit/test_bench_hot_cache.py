"""The hot-cache hit rate in bench reports: the features service's counters, exported, scraped over a window."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from inferline.bench.harness import feature_text, feature_window, scrape_feature_counters
from inferline.bench.report import hot_cache_cells, render_html
from inferline.bench.runner import step_line
from inferline.core.config import FeatureStoreConfig
from inferline.core.ports import free_port
from inferline.features import FeaturesService
from inferline.features.metrics import FeatureCacheCollector
from tests.unit.test_bench_report import synthetic_result
from tests.unit.test_features_service import ROUTE, FakeStore, later


@pytest.fixture
def served() -> Iterator[tuple[FeaturesService, FakeStore, str]]:
    """A features service whose counters a real HTTP metrics endpoint exports, as the router's does."""
    store = FakeStore()
    service = FeaturesService({"r": ROUTE, "r2": ROUTE}, store, FeatureStoreConfig(hot_cache_ttl_s=30))
    registry = CollectorRegistry()
    registry.register(FeatureCacheCollector(service))
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield service, store, f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_the_window_counts_hits_misses_and_store_reads_between_scrapes(
    served: tuple[FeaturesService, FakeStore, str],
) -> None:
    service, store, address = served
    await service.get("r", [1, 2], {}, deadline=later())  # before the window: 2 misses, 1 read
    before = scrape_feature_counters(address)
    assert before["misses"] == 2 and before["hits"] == 0 and before["store_reads"] == 1
    await service.get("r", [1, 2, 3], {}, deadline=later())  # 2 hits, 1 miss → 1 read of 1 entity
    await service.get("r2", [3, 1], {}, deadline=later())  # same view set, same cache: 2 hits
    after = scrape_feature_counters(address)
    window = feature_window(before, after)
    assert len(store.reads) == 2
    assert (window["lookups"], window["hits"]) == (5, 4)
    assert window["hot_cache_hit_rate"] == pytest.approx(0.8)
    assert (window["store_reads"], window["store_entities"]) == (1, 1)
    assert window["window_s"] > 0 and window["store_reads_per_s"] > 0
    assert feature_text(window).startswith("hot cache 80.0% hit (5 lookups), Feast ")


def test_the_counters_are_one_series_per_view_and_result(served: tuple[FeaturesService, FakeStore, str]) -> None:
    _, _, address = served
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = sorted(re.findall(r"^(inferline_feature_\w+)\{([^}]*)\} ", text, re.MULTILINE))
    assert found == [
        ("inferline_feature_cache_lookups_total", 'result="hit",view="stats"'),
        ("inferline_feature_cache_lookups_total", 'result="miss",view="stats"'),
        ("inferline_feature_store_entities_total", 'view="stats"'),
        ("inferline_feature_store_reads_total", 'view="stats"'),
    ]


def test_no_endpoint_or_no_counters_is_said_not_measured() -> None:
    gone = scrape_feature_counters(f"127.0.0.1:{free_port()}")
    assert "error" in gone
    window = feature_window(gone, gone)
    assert "error" in window
    assert feature_text(window).startswith("hot cache: not measured (")
    assert feature_text(None) == "hot cache: not measured"
    idle = {"hits": 3.0, "misses": 1.0, "store_reads": 1.0, "store_entities": 1.0, "t": 1.0}
    assert feature_window(idle, {**idle, "t": 2.0})["hot_cache_hit_rate"] is None  # no lookups in the window


WINDOW = {
    "hot_cache_hit_rate": 0.9312, "lookups": 4000, "hits": 3725, "store_reads": 250, "store_entities": 275,
    "store_reads_per_s": 125.0, "store_entities_per_s": 137.5, "window_s": 2.0,
}  # fmt: skip


@pytest.fixture
def result() -> dict[str, Any]:
    result = synthetic_result()
    predict = result["targets"][0]
    predict["entities"] = {"distribution": "zipf", "ids": [1001, 101000], "zipf_s": 1.1}
    predict["metrics"] = "127.0.0.1:9464"
    for step in predict["steps"]:
        step["features"] = WINDOW
    return result


def test_step_lines_give_the_hit_rate_of_predict_targets(result: dict[str, Any]) -> None:
    predict, triton = result["targets"]
    line = step_line(predict, predict["steps"][0])
    assert line.endswith("; hot cache 93.1% hit (4000 lookups), Feast 125 reads/s (138 entities/s)")
    assert "hot cache" not in step_line(triton, triton["steps"][0])
    unmeasured = {**predict, "metrics": None}
    assert step_line(unmeasured, {**predict["steps"][0], "features": None}).endswith("not measured (no --metrics)")


def test_the_html_report_has_hit_rate_columns_and_says_how_entities_were_drawn(result: dict[str, Any]) -> None:
    predict, triton = result["targets"]
    assert hot_cache_cells(predict, predict["steps"][0]) == ("93.1", "125")
    assert hot_cache_cells(triton, triton["steps"][0]) == ("-", "-")
    page = render_html(result)
    assert "<th>hot cache hit %</th><th>Feast reads/s</th>" in page
    assert page.count('<td class="n">93.1</td><td class="n">125</td>') == 2  # both predict steps
    assert "Zipf (s = 1.1) over ids 1001..101000" in page
    assert "from the router&#x27;s counters (127.0.0.1:9464)" in page
