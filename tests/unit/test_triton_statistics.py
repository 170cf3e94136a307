"""``TritonStatisticsCollector``: exported values from hand-built Triton statistics, and cost per route."""

from __future__ import annotations

import asyncio
import inspect
import logging
import pathlib

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.grpc import service_pb2

from inferline.core.config import InferlineConfig
from inferline.core.metrics import ServingMetrics
from inferline.triton.executor import ModelUnavailable
from inferline.triton.statistics import TritonStatisticsCollector, parse_gpu_utilization
from tests.waiting import eventually

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYERS_MS = {"total": 5.0}


def _config() -> InferlineConfig:
    """The demo config with a second route sharing driver_ranker (GPU alternate) and round prices."""
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    shared = dict(raw["routes"]["driver_ranking"])
    features = shared["primary"]["features"]
    shared["alternates"] = [{"model": "driver_ranker_gpu", "features": features, "device": "gpu"}]
    raw["routes"]["driver_scoring"] = shared
    raw["device_classes"] = {"cpu": {"cost_per_hour": 3.6}, "gpu": {"cost_per_hour": 36.0}}  # 0.001 and 0.01 per s
    return InferlineConfig.model_validate(raw)


def _duration(ns: int, count: int = 1) -> service_pb2.StatisticDuration:
    return service_pb2.StatisticDuration(count=count, ns=ns)


def _model(
    name: str,
    inferences: int,
    executions: int,
    *,
    version: str = "1",
    requests: int = 0,
    queue_ns: int = 0,
    compute_ns: tuple[int, int, int] = (0, 0, 0),
    batches: tuple[tuple[int, int, int], ...] = (),
) -> service_pb2.ModelStatistics:
    """``batches``: (batch size, executions, busy ns split 1:2:1 over input, infer and output)."""
    stats = service_pb2.InferStatistics(
        success=_duration(0, requests),
        queue=_duration(queue_ns, requests),
        compute_input=_duration(compute_ns[0], requests),
        compute_infer=_duration(compute_ns[1], requests),
        compute_output=_duration(compute_ns[2], requests),
    )
    batch_stats = [
        service_pb2.InferBatchStatistics(
            batch_size=size,
            compute_input=_duration(ns // 4, n),
            compute_infer=_duration(ns // 2, n),
            compute_output=_duration(ns // 4, n),
        )
        for size, n, ns in batches
    ]
    return service_pb2.ModelStatistics(
        name=name,
        version=version,
        inference_count=inferences,
        execution_count=executions,
        inference_stats=stats,
        batch_stats=batch_stats,
    )


def _response(*models: service_pb2.ModelStatistics) -> service_pb2.ModelStatisticsResponse:
    return service_pb2.ModelStatisticsResponse(model_stats=list(models))


def _ranker(inferences: int, busy_ns: int) -> service_pb2.ModelStatistics:
    return _model("driver_ranker", inferences, inferences, requests=inferences, batches=((1, inferences, busy_ns),))


class FakeSource:
    """Answers with the responses queued in ``answers``: a response, or an exception to raise."""

    def __init__(self) -> None:
        self.answers: list[service_pb2.ModelStatisticsResponse | Exception] = []

    async def model_statistics(self) -> service_pb2.ModelStatisticsResponse:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Parts:
    def __init__(self, metrics_url: str | None = None, gpu_text: str | Exception = "", interval_s: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        self.metrics = ServingMetrics(self.registry)
        self.source = FakeSource()
        self.now = 0.0
        self.gpu_text = gpu_text
        self.collector = TritonStatisticsCollector(
            self.source,
            _config(),
            self.metrics,
            metrics_url=metrics_url,
            interval_s=interval_s,
            fetch_text=self._fetch,
            clock=lambda: self.now,
        )
        self.registry.register(self.collector)

    async def _fetch(self, url: str) -> str:
        if isinstance(self.gpu_text, Exception):
            raise self.gpu_text
        return self.gpu_text

    async def snapshot(self, answer: service_pb2.ModelStatisticsResponse | Exception) -> bool:
        self.source.answers.append(answer)
        return await self.collector.refresh()

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def answer(self, route: str, model: str, rows: int, calls: int, served_by: str = "PRIMARY") -> None:
        for _ in range(calls):
            self.metrics.observe_success(route, "standard", served_by, "", LAYERS_MS)
            self.metrics.observe_model_answer(route, model, rows)


async def test_triton_figures_are_exported_per_model_summed_over_versions() -> None:
    parts = Parts()
    v1 = _model(
        "driver_ranker", 60, 4, requests=30, queue_ns=200_000_000,
        compute_ns=(100_000_000, 300_000_000, 100_000_000), batches=((16, 2, 40_000_000), (14, 2, 20_000_000)),
    )  # fmt: skip
    v2 = _model(
        "driver_ranker", 30, 2, version="2", requests=10, queue_ns=50_000_000,
        compute_ns=(0, 500_000_000, 0), batches=((15, 2, 40_000_000),),
    )  # fmt: skip
    assert await parts.snapshot(_response(v1, v2))
    labels = {"model": "driver_ranker"}
    assert parts.value("inferline_triton_inferences_total", **labels) == 90
    assert parts.value("inferline_triton_executions_total", **labels) == 6
    assert parts.value("inferline_triton_requests_total", **labels) == 40
    assert parts.value("inferline_triton_batch_efficiency", **labels) == 15.0
    assert parts.value("inferline_triton_queue_seconds_total", **labels) == pytest.approx(0.25, abs=1e-12)
    assert parts.value("inferline_triton_compute_seconds_total", **labels) == pytest.approx(1.0, abs=1e-12)
    # Device time comes from the executions (batch_stats), not from the per-request sums.
    busy = parts.value("inferline_triton_busy_seconds_total", model="driver_ranker", device="cpu")
    assert busy == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize(
    ("model", "device"),
    [
        ("driver_ranker_gpu", "gpu"),
        ("driver_ranker__batch", "cpu"),
        ("driver_ranker_light", "cpu"),
        ("other", "unknown"),
    ],
)
async def test_busy_time_is_labelled_with_the_device_of_the_route_variant(model: str, device: str) -> None:
    parts = Parts()
    await parts.snapshot(_response(_model(model, 8, 1, batches=((8, 1, 4_000_000),))))
    assert parts.value("inferline_triton_busy_seconds_total", model=model, device=device) == pytest.approx(0.004)


async def test_a_model_never_executed_has_no_batch_efficiency() -> None:
    parts = Parts()
    await parts.snapshot(_response(_model("driver_ranker", 0, 0)))
    assert parts.value("inferline_triton_executions_total", model="driver_ranker") == 0
    assert parts.value("inferline_triton_batch_efficiency", model="driver_ranker") is None


async def test_routes_sharing_a_model_split_its_cost_by_their_rows() -> None:
    parts = Parts()
    await parts.snapshot(_response(_ranker(100, 1_000_000_000)))  # baseline: nothing charged for the past
    parts.answer("driver_ranking", "driver_ranker", rows=1, calls=30)
    parts.answer("driver_scoring", "driver_ranker", rows=1, calls=10)
    parts.answer("driver_ranking", "", rows=1, calls=10, served_by="CACHE")  # answered, no model work
    await parts.snapshot(_response(_ranker(140, 3_000_000_000)))  # 2 s busy on cpu at 0.001 per s
    assert parts.value("inferline_model_calls_total", route="driver_ranking", model="driver_ranker") == 30
    assert parts.value("inferline_cost_total", route="driver_ranking") == pytest.approx(0.0015)
    assert parts.value("inferline_cost_total", route="driver_scoring") == pytest.approx(0.0005)
    assert parts.value("inferline_cost_per_1k_requests", route="driver_ranking") == pytest.approx(0.0015 / 40 * 1000)
    assert parts.value("inferline_cost_per_1k_requests", route="driver_scoring") == pytest.approx(0.0005 / 10 * 1000)


async def test_cost_follows_rows_and_the_price_of_each_device() -> None:
    parts = Parts()
    gpu = _model("driver_ranker_gpu", 0, 0)
    await parts.snapshot(_response(_ranker(0, 0), gpu))
    parts.answer("driver_ranking", "driver_ranker", rows=3, calls=10)  # 30 rows
    parts.answer("driver_scoring", "driver_ranker", rows=1, calls=10)  # 10 rows
    parts.answer("driver_scoring", "driver_ranker_gpu", rows=5, calls=2)
    gpu = _model("driver_ranker_gpu", 10, 1, batches=((10, 1, 500_000_000),))  # 0.5 s on gpu at 0.01 per s
    await parts.snapshot(_response(_ranker(40, 4_000_000_000), gpu))  # 4 s on cpu at 0.001 per s
    assert parts.value("inferline_cost_total", route="driver_ranking") == pytest.approx(0.003)
    assert parts.value("inferline_cost_total", route="driver_scoring") == pytest.approx(0.001 + 0.005)
    assert parts.value("inferline_cost_per_1k_requests", route="driver_scoring") == pytest.approx(0.006 / 12 * 1000)


async def test_rows_the_routes_did_not_answer_keep_their_share_of_the_cost() -> None:
    parts = Parts()
    await parts.snapshot(_response(_ranker(0, 0)))
    parts.answer("driver_ranking", "driver_ranker", rows=1, calls=40)
    await parts.snapshot(_response(_ranker(80, 2_000_000_000)))  # 40 more rows: another client of this Triton
    assert parts.value("inferline_cost_total", route="driver_ranking") == pytest.approx(0.001)


async def test_a_restarted_triton_counts_from_zero() -> None:
    parts = Parts()
    await parts.snapshot(_response(_ranker(0, 0)))
    parts.answer("driver_ranking", "driver_ranker", rows=1, calls=50)
    await parts.snapshot(_response(_ranker(50, 5_000_000_000)))
    parts.answer("driver_ranking", "driver_ranker", rows=1, calls=10)
    await parts.snapshot(_response(_ranker(10, 1_000_000_000)))  # figures went down: a new server
    assert parts.value("inferline_cost_total", route="driver_ranking") == pytest.approx(0.006)
    assert parts.value("inferline_triton_inferences_total", model="driver_ranker") == 10


async def test_no_cost_before_the_first_snapshot_and_no_per_1k_without_answers() -> None:
    parts = Parts()
    assert parts.value("inferline_cost_total", route="driver_ranking") == 0
    parts.answer("driver_ranking", "driver_ranker", rows=1, calls=5)  # before the baseline: not counted
    await parts.snapshot(_response(_ranker(5, 1_000_000_000)))
    await parts.snapshot(_response(_ranker(5, 1_000_000_000)))
    assert parts.value("inferline_cost_total", route="driver_ranking") == 0
    assert parts.value("inferline_cost_per_1k_requests", route="driver_ranking") is None


async def test_unreachable_triton_keeps_the_last_snapshot_and_warns_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = Parts()
    await parts.snapshot(_response(_ranker(7, 0)))
    with caplog.at_level(logging.WARNING, logger="inferline.triton.statistics"):
        for now in (1.0, 30.0, 59.0, 61.0):
            parts.now = now
            assert not await parts.snapshot(ModelUnavailable("model server statistics unavailable: UNAVAILABLE"))
    assert parts.value("inferline_triton_inferences_total", model="driver_ranker") == 7
    assert len([r for r in caplog.records if "keeping the last snapshot" in r.message]) == 2


GPU_TEXT = """\
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-aaaa"} 0.75
nv_gpu_utilization{gpu_uuid="GPU-bbbb"} 0.25
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="driver_ranker",version="1"} 95
"""


async def test_gpu_utilization_is_read_from_triton_metrics() -> None:
    parts = Parts(metrics_url="http://triton:8002/metrics", gpu_text=GPU_TEXT)
    await parts.snapshot(_response())
    assert parts.value("inferline_device_utilization", device="gpu", gpu_uuid="GPU-aaaa") == 0.75
    assert parts.value("inferline_device_utilization", device="gpu", gpu_uuid="GPU-bbbb") == 0.25
    parts.gpu_text = OSError("connection refused")
    await parts.snapshot(_response())
    assert parts.value("inferline_device_utilization", device="gpu", gpu_uuid="GPU-aaaa") == 0.75


async def test_no_gpu_no_utilization_series() -> None:
    assert parse_gpu_utilization('nv_inference_count{model="m",version="1"} 3\n') == {}
    parts = Parts()  # no metrics port known
    await parts.snapshot(_response(_ranker(1, 0)))
    assert "inferline_device_utilization{" not in generate_latest(parts.registry).decode()


async def test_a_scrape_never_waits_on_triton() -> None:
    parts = Parts()
    await parts.snapshot(_response(_ranker(3, 0)))
    hung = asyncio.Event()

    async def never_answers() -> service_pb2.ModelStatisticsResponse:
        await hung.wait()
        raise AssertionError("unreachable")

    parts.source.model_statistics = never_answers  # type: ignore[method-assign]
    refresh = asyncio.create_task(parts.collector.refresh())
    await asyncio.sleep(0)  # the refresh is now waiting on Triton
    assert not inspect.iscoroutinefunction(parts.collector.collect)
    assert "inferline_triton_inferences_total" in generate_latest(parts.registry).decode()
    assert parts.value("inferline_triton_inferences_total", model="driver_ranker") == 3
    refresh.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refresh


async def test_start_takes_a_snapshot_and_refreshes_in_the_background() -> None:
    parts = Parts(interval_s=0.01)
    parts.source.answers = [_response(_ranker(1, 0)), *[_response(_ranker(2, 0))] * 50]
    await parts.collector.start()
    assert parts.value("inferline_triton_inferences_total", model="driver_ranker") == 1
    await eventually(lambda: parts.value("inferline_triton_inferences_total", model="driver_ranker") == 2, "a refresh")
    await parts.collector.stop()
    assert parts.value("inferline_triton_inferences_total", model="driver_ranker") == 2
