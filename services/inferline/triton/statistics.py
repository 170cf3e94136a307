"""``TritonStatisticsCollector``: Triton's statistics as Prometheus metrics, and what each route costs.

Batch efficiency, queue and compute time and busy time per model come from Triton's
statistics API, GPU utilization from its metrics endpoint (the only place Triton reports
it, and only with GPUs). A background task takes a snapshot every ``interval_s``;
``collect()`` hands out the last one, so a scrape never waits on Triton. When Triton does
not answer, the last snapshot stays and a warning is logged at most once a minute.

What Triton's figures mean (``ModelStatistics``, summed here over a model's versions):

* ``inference_count`` counts rows, ``execution_count`` model executions: their ratio is
  the average batch, rows per execution (batch efficiency).
* ``inference_stats`` queue and compute durations are summed over *requests*: a request
  in a batch carries the whole execution's compute time, so ``rate(compute) /
  rate(requests)`` is a request's mean compute time, not device time.
* ``batch_stats`` durations are summed over *executions*: the time the model kept its
  device busy (seen on the bundled Triton: 40 requests in 4 executions gave 16.5 ms of
  request compute time and 1.6 ms of execution time).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from tritonclient.grpc import service_pb2

from inferline.core.background import BackgroundTask, every
from inferline.core.config import InferlineConfig
from inferline.core.metrics import ServingMetrics
from inferline.triton.class_copies import COPY_SEPARATOR

logger = logging.getLogger(__name__)

UNKNOWN_DEVICE = "unknown"
"""Device label of a model that no route variant names."""
WARN_EVERY_S = 60.0
METRICS_TIMEOUT_S = 2.0
GPU_UTILIZATION = "nv_gpu_utilization"


class StatisticsSource(Protocol):
    async def model_statistics(self) -> service_pb2.ModelStatisticsResponse: ...


@dataclass(frozen=True, slots=True)
class ModelTotals:
    """One model's cumulative figures on Triton since it was loaded (durations in ns)."""

    inferences: int = 0
    executions: int = 0
    requests: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    """Summed over requests (``inference_stats``)."""
    busy_ns: int = 0
    """Summed over executions (``batch_stats``): device time."""

    def __add__(self, other: ModelTotals) -> ModelTotals:
        return ModelTotals(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(t: ModelTotals) -> tuple[int, ...]:
    return (t.inferences, t.executions, t.requests, t.queue_ns, t.compute_ns, t.busy_ns)


def model_totals(response: service_pb2.ModelStatisticsResponse) -> dict[str, ModelTotals]:
    """Per model name, its statistics summed over versions."""
    totals: dict[str, ModelTotals] = {}
    for s in response.model_stats:
        i = s.inference_stats
        t = ModelTotals(
            inferences=s.inference_count,
            executions=s.execution_count,
            requests=i.success.count,
            queue_ns=i.queue.ns,
            compute_ns=i.compute_input.ns + i.compute_infer.ns + i.compute_output.ns,
            busy_ns=sum(b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns for b in s.batch_stats),
        )
        totals[s.name] = totals[s.name] + t if s.name in totals else t
    return totals


def parse_gpu_utilization(text: str) -> dict[str, float]:
    """``nv_gpu_utilization`` (0..1) per ``gpu_uuid`` in Triton's metrics text; empty without GPUs."""
    return {
        sample.labels.get("gpu_uuid", ""): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == GPU_UTILIZATION
        for sample in family.samples
        if sample.name == GPU_UTILIZATION
    }


def model_devices(config: InferlineConfig) -> Callable[[str], str]:
    """``model → device class`` from the route variants; a class copy takes its model's device."""
    devices: dict[str, str] = {}
    for route in config.routes.values():
        for variant in route.all_variants:
            devices.setdefault(variant.model, variant.device)

    def device(model: str) -> str:
        found = devices.get(model)
        if found is None:
            base, sep, _ = model.rpartition(COPY_SEPARATOR)
            found = devices.get(base) if sep else None
        return found or UNKNOWN_DEVICE

    return device


class CostLedger:
    """What each route has cost since the first snapshot, from busy time and its device's price.

    Rule, applied at every snapshot to what happened since the previous one: a model's busy
    time is priced at ``cost_per_hour / 3600`` of its device, and the price is spread evenly
    over the rows it inferred. A route pays for the rows of the answers the model produced
    for it (``ServingMetrics.model_rows``):

        cost[route] += busy_s × price_per_s × route_rows / max(triton_rows, all_routes_rows)

    So two routes sharing a model split its cost by their shares of its rows (30 and 10
    rows: 3/4 and 1/4). Rows, not calls: the coalescer merges calls into one Triton
    request, and one call carries many entities. Triton's own row count is the
    denominator, so rows this router did not answer keep their share instead of being
    charged to the routes: warm-ups, the KServe front door, other router replicas sharing
    the Triton, and calls whose answer came after the caller's deadline (wasted work is
    not charged). A model whose figures went down was reloaded or Triton restarted: its
    figures then count from zero.
    """

    def __init__(self, price_per_s: Callable[[str], float]) -> None:
        self._price_per_s = price_per_s
        self.cost: dict[str, float] = {}
        self._last: dict[str, ModelTotals] | None = None
        self._last_rows: dict[tuple[str, str], int] = {}
        self._answered_base: dict[str, int] = {}

    def update(
        self, totals: Mapping[str, ModelTotals], rows: Mapping[tuple[str, str], int], answered: Mapping[str, int]
    ) -> None:
        """Charge the routes for the interval since the last snapshot (the first one only sets the baseline)."""
        if self._last is None:
            self._answered_base = dict(answered)
        else:
            interval_rows: dict[str, dict[str, int]] = {}
            for (route, model), n in rows.items():
                delta = n - self._last_rows.get((route, model), 0)
                if delta > 0:
                    interval_rows.setdefault(model, {})[route] = delta
            for model, by_route in interval_rows.items():
                self._charge(model, by_route, totals.get(model), self._last.get(model))
        self._last = dict(totals)
        self._last_rows = dict(rows)

    def _charge(
        self, model: str, by_route: dict[str, int], now: ModelTotals | None, before: ModelTotals | None
    ) -> None:
        if now is None:
            return  # not on Triton (an in-process light model): no busy time to pay
        if before is None or now.inferences < before.inferences or now.busy_ns < before.busy_ns:
            before = ModelTotals()
        busy_s = (now.busy_ns - before.busy_ns) / 1e9
        rows = max(now.inferences - before.inferences, sum(by_route.values()))
        price = busy_s * self._price_per_s(model) / rows
        for route, n in by_route.items():
            self.cost[route] = self.cost.get(route, 0.0) + price * n

    def answered_since_baseline(self, route: str, answered: int) -> int:
        return answered - self._answered_base.get(route, 0)


def _fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        body: bytes = response.read()
    return body.decode()


class TritonStatisticsCollector(Collector):
    """Prometheus collector of Triton's per-model statistics and per-route cost (see the module).

    Usage: ``registry.register(collector)``; ``await collector.start()`` after warm-up,
    ``await collector.stop()`` on shutdown. ``metrics_url`` is Triton's metrics endpoint
    (``http://host:port/metrics``), read for GPU utilization; None: no utilization series.
    """

    def __init__(
        self,
        source: StatisticsSource,
        config: InferlineConfig,
        metrics: ServingMetrics,
        *,
        metrics_url: str | None = None,
        interval_s: float = 5.0,
        fetch_text: Callable[[str], Awaitable[str]] = lambda url: asyncio.to_thread(_fetch_text, url),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._metrics = metrics
        self._routes = tuple(config.routes)
        self._device = model_devices(config)
        prices = {name: d.cost_per_hour / 3600 for name, d in config.device_classes.items()}
        self._ledger = CostLedger(lambda model: prices.get(self._device(model), 0.0))
        self._metrics_url = metrics_url
        self._interval_s = interval_s
        self._fetch_text = fetch_text
        self._clock = clock
        self._totals: dict[str, ModelTotals] = {}
        self._gpu: dict[str, float] = {}
        self._families: list[Metric] = self._build()
        self._warned_at = -math.inf
        self._task = BackgroundTask("triton-statistics", every(interval_s, self.refresh, "Triton statistics refresh"))

    def collect(self) -> Iterable[Metric]:
        """The last snapshot's families (built on the event loop; replaced whole, never mutated)."""
        return self._families

    def describe(self) -> Iterable[Metric]:
        return self._families

    async def refresh(self) -> bool:
        """Take a new snapshot; keep the last one where Triton does not answer. Returns whether it did."""
        answered = True
        try:
            response = await self._source.model_statistics()
        except Exception as err:  # ModelUnavailable from TritonExecutor; any failure keeps the snapshot
            self._warn("Triton statistics unavailable, keeping the last snapshot: %s", err)
            answered = False
        else:
            self._totals = model_totals(response)
            self._ledger.update(self._totals, self._metrics.model_rows, self._metrics.answered)
        if self._metrics_url is not None:
            try:
                self._gpu = parse_gpu_utilization(await self._fetch_text(self._metrics_url))
            except Exception as err:  # unreachable, or not exposition text: keep the last reading
                self._warn("Triton metrics at %s unavailable: %s", self._metrics_url, err)
        self._families = self._build()
        return answered

    def _warn(self, message: str, *args: Any) -> None:
        now = self._clock()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            logger.warning(message, *args)

    def _build(self) -> list[Metric]:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        inferences = counter("inferline_triton_inferences_total", "Rows Triton inferred (its inference_count)")
        executions = counter("inferline_triton_executions_total", "Model executions (batches) on Triton")
        requests = counter("inferline_triton_requests_total", "Requests Triton completed successfully")
        queue = counter("inferline_triton_queue_seconds_total", "Queue wait summed over Triton's requests")
        compute = counter("inferline_triton_compute_seconds_total", "Compute time summed over Triton's requests")
        busy = counter(
            "inferline_triton_busy_seconds_total", "Device time of the model's executions", ("model", "device")
        )
        efficiency = GaugeMetricFamily(
            "inferline_triton_batch_efficiency",
            "Average rows per execution (inferences / executions)",
            labels=["model"],
        )
        for model, t in sorted(self._totals.items()):
            inferences.add_metric([model], t.inferences)
            executions.add_metric([model], t.executions)
            requests.add_metric([model], t.requests)
            queue.add_metric([model], t.queue_ns / 1e9)
            compute.add_metric([model], t.compute_ns / 1e9)
            busy.add_metric([model, self._device(model)], t.busy_ns / 1e9)
            if t.executions:
                efficiency.add_metric([model], t.inferences / t.executions)
        return [inferences, executions, requests, queue, compute, busy, efficiency, *self._cost_families()]

    def _cost_families(self) -> list[Metric]:
        cost = CounterMetricFamily(
            "inferline_cost_total", "Device cost of the route's answers since start (CostLedger)", labels=["route"]
        )
        per_1k = GaugeMetricFamily(
            "inferline_cost_per_1k_requests", "Device cost per 1,000 answered requests since start", labels=["route"]
        )
        for route in self._routes:
            spent = self._ledger.cost.get(route, 0.0)
            cost.add_metric([route], spent)
            answered = self._ledger.answered_since_baseline(route, self._metrics.answered.get(route, 0))
            if answered > 0:
                per_1k.add_metric([route], spent / answered * 1000)
        utilization = GaugeMetricFamily(
            "inferline_device_utilization", "GPU utilization Triton reports (0..1)", labels=["device", "gpu_uuid"]
        )
        for uuid, value in sorted(self._gpu.items()):
            utilization.add_metric(["gpu", uuid], value)
        return [cost, per_1k, utilization]

    async def start(self) -> None:
        """Snapshot now (the cost baseline), then every ``interval_s`` in the background."""
        await self.refresh()
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
