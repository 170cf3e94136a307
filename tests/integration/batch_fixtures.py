"""Helpers of the batch tests that hold a job back: a real Prometheus endpoint standing for the
routers' queue wait (``batch run --router-metrics``), whose value the test sets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from inferline.batch.throttle import QUEUE_WAIT_METRIC
from inferline.core.ports import free_port


@contextlib.contextmanager
def routers_queue_wait(value_s: float) -> Iterator[tuple[Gauge, str]]:
    """An endpoint exporting the routers' queue-wait gauge at ``value_s``: the gauge (set it
    to move the job) and the endpoint's URL."""
    registry = CollectorRegistry()
    queue_wait = Gauge(QUEUE_WAIT_METRIC, "the router's queue wait", registry=registry)
    queue_wait.set(value_s)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield queue_wait, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def paused_by_the_routers(job_registry: CollectorRegistry, route: str, wait_s: float) -> bool:
    """Whether the job has read the routers' wait as ``wait_s`` and sends nothing (its metrics)."""
    labels = {"route": route}
    read = job_registry.get_sample_value("inferline_batch_online_queue_wait_seconds", labels)
    allowed = job_registry.get_sample_value("inferline_batch_concurrency_limit", labels)
    return read == pytest.approx(wait_s) and allowed == 0  # the gauges start at 0: both must be set
