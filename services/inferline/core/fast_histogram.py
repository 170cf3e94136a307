"""A Prometheus histogram family that costs ~1 µs per observation on the hot path.

prometheus_client's ``Histogram.observe`` takes a lock and walks every bucket per call;
with five layer timings per request that was ~50 µs of the router's CPU per request
(measured with cProfile on the Predict path). Here an observation is one ``bisect`` and
two list updates (the GIL makes them atomic enough: a scrape may see a sum one sample
ahead of its counts, which Prometheus tolerates), and the cumulative buckets are built
only when Prometheus scrapes, through a custom collector.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.total = 0.0


class FastHistogram(Collector):
    """Histogram with labels; ``series(*labels)`` returns a handle whose ``observe`` is cheap."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = list(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def declare(self, labels: tuple[str, ...]) -> None:
        """Create the series of ``labels`` with no observations (zeros), if it is not there yet."""
        if labels not in self._series:
            self._series[labels] = _Series(len(self._bounds))

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(len(self._bounds))
        series.counts[bisect.bisect_left(self._bounds, value)] += 1
        series.total += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, series in list(self._series.items()):
            cumulative, running = [], 0
            for bound, count in zip([*map(str, self._bounds), "+Inf"], series.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(labels), cumulative, series.total)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
