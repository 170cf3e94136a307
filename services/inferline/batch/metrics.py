"""Prometheus metrics of a running batch job, on an injected registry (``--metrics-port`` serves them).

Names start with ``inferline_batch_``; the one label is the route, so a scrape of several
shards' processes sums cleanly. Rows are counted when their chunk commits: a row counted
once is in the output once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetricFamilies:
    """The metrics of a registry; ``route`` gives one route's series (the BatchJobs service runs
    jobs of several routes in one process, and a registry takes each metric name once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "inferline_batch_rows_total",
            "Input rows committed: scored into a part file, or written to the errors file",
            ["route", "outcome"],
            registry=registry,
        )
        self.chunks = Counter(
            "inferline_batch_chunks_total",
            "Chunks committed (part file and manifest line)",
            ["route"],
            registry=registry,
        )
        self.retries = Counter(
            "inferline_batch_retries_total", "Triton requests of the job tried again", ["route"], registry=registry
        )
        self.variant_switches = Counter(
            "inferline_batch_variant_switches_total",
            "Times a job behind its deadline moved the rest of its rows to another variant",
            ["route", "from_variant", "to_variant"],
            registry=registry,
        )
        self.concurrency_limit = Gauge(
            "inferline_batch_concurrency_limit",
            "Triton requests the job may have in flight now (lowered while online traffic waits)",
            ["route"],
            registry=registry,
        )
        self.online_queue_wait = Gauge(
            "inferline_batch_online_queue_wait_seconds",
            "Mean Triton queue time of the online classes' requests over the last interval",
            ["route"],
            registry=registry,
        )

    def route(self, route: str) -> BatchMetrics:
        return BatchMetrics(None, route, families=self)


class BatchMetrics:
    def __init__(
        self, registry: CollectorRegistry | None, route: str, *, families: BatchMetricFamilies | None = None
    ) -> None:
        """``registry``: where the metrics go, or None with the ``families`` of a registry they are in already."""
        if families is None:
            assert registry is not None
            families = BatchMetricFamilies(registry)
        self.scored = families.rows.labels(route, "scored")
        self.errors = families.rows.labels(route, "error")
        self.chunks = families.chunks.labels(route)
        self.retries = families.retries.labels(route)
        self._route = route
        self._variant_switches = families.variant_switches
        self.concurrency_limit = families.concurrency_limit.labels(route)
        self.online_queue_wait = families.online_queue_wait.labels(route)

    def committed(self, rows: int, errors: int) -> None:
        self.scored.inc(rows)
        self.errors.inc(errors)
        self.chunks.inc()

    def switched(self, from_variant: str, to_variant: str) -> None:
        """The job moved to another variant (``VariantSwitcher``)."""
        self._variant_switches.labels(self._route, from_variant, to_variant).inc()
