"""Prometheus metrics of a running batch job, on an injected registry (``--metrics-port`` serves them).

Names start with ``inferline_batch_``; the one label is the route, so a scrape of several
shards' processes sums cleanly. Rows are counted when their chunk commits: a row counted
once is in the output once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry, route: str) -> None:
        rows = Counter(
            "inferline_batch_rows_total",
            "Input rows committed: scored into a part file, or written to the errors file",
            ["route", "outcome"],
            registry=registry,
        )
        self.scored = rows.labels(route, "scored")
        self.errors = rows.labels(route, "error")
        self.chunks = Counter(
            "inferline_batch_chunks_total",
            "Chunks committed (part file and manifest line)",
            ["route"],
            registry=registry,
        ).labels(route)
        self.retries = Counter(
            "inferline_batch_retries_total", "Triton requests of the job tried again", ["route"], registry=registry
        ).labels(route)
        self.concurrency_limit = Gauge(
            "inferline_batch_concurrency_limit",
            "Triton requests the job may have in flight now (lowered while online traffic waits)",
            ["route"],
            registry=registry,
        ).labels(route)
        self.online_queue_wait = Gauge(
            "inferline_batch_online_queue_wait_seconds",
            "Mean Triton queue time of the online classes' requests over the last interval",
            ["route"],
            registry=registry,
        ).labels(route)

    def committed(self, rows: int, errors: int) -> None:
        self.scored.inc(rows)
        self.errors.inc(errors)
        self.chunks.inc()
