"""Prometheus counters of the features service's hot cache and online-store reads.

Read from ``FeaturesService.counts()`` when scraped (a custom collector), so the request
path only adds to plain integers. Per view set (label ``view``: the feature views it reads):

- ``inferline_feature_cache_lookups_total{view, result="hit"|"miss"}``: entity lookups in
  the hot cache; the hit rate over a window is the increase of ``hit`` over that of both;
- ``inferline_feature_store_reads_total{view}``: reads of the online store (Feast);
- ``inferline_feature_store_entities_total{view}``: entities those reads asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from inferline.features.service import FeaturesService


class FeatureCacheCollector(Collector):
    """Exports ``service``'s hot-cache and store-read counters on the registry it is registered with."""

    def __init__(self, service: FeaturesService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "inferline_feature_cache_lookups",
            "Entity lookups in the features service's hot cache, by result (hit or miss)",
            labels=["view", "result"],
        )
        reads = CounterMetricFamily(
            "inferline_feature_store_reads", "Reads of the online feature store (Feast)", labels=["view"]
        )
        entities = CounterMetricFamily(
            "inferline_feature_store_entities", "Entities asked for by online feature store reads", labels=["view"]
        )
        totals: dict[str, list[int]] = {}  # view sets reading the same views share a label: summed
        for c in self._service.counts():
            t = totals.setdefault(c.views, [0, 0, 0, 0])
            t[0] += c.lookups - c.misses
            t[1] += c.misses
            t[2] += c.store_reads
            t[3] += c.store_entities
        for view, (hits, misses, n_reads, n_entities) in totals.items():
            lookups.add_metric([view, "hit"], hits)
            lookups.add_metric([view, "miss"], misses)
            reads.add_metric([view], n_reads)
            entities.add_metric([view], n_entities)
        yield lookups
        yield reads
        yield entities
