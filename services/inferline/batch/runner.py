"""``run_batch``: plan a job, find (or start) Triton, run the job, return its summary.

The one entry point the CLI (and a future BatchJobs service) calls; everything before
``BatchJob.run`` is a check that fails with ``BatchInputError`` before any work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from inferline.batch.errors import BatchCancelled
from inferline.batch.job import BatchJob
from inferline.batch.metrics import BatchMetrics
from inferline.batch.plan import plan_job
from inferline.batch.spec import BatchJobSpec
from inferline.core.config import InferlineConfig

logger = logging.getLogger(__name__)


async def run_batch(
    config: InferlineConfig,
    spec: BatchJobSpec,
    triton_url: str | None,
    *,
    interactive: bool | None = None,
    registry: CollectorRegistry | None = None,
) -> dict[str, Any]:
    """Run one shard of a batch job; ``triton_url`` None starts the bundled Triton for it.

    ``registry``: where the job's metrics go (``BatchMetrics``); None: not kept.

    Raises:
        BatchInputError: bad options, input or output directory (nothing was done).
        BatchJobFailed: stopped part-way; ``--resume`` continues.
    """
    plan = plan_job(config, spec)
    metrics = None if registry is None else BatchMetrics(registry, spec.route)
    if triton_url is not None:
        return await BatchJob(config, plan, triton_url, interactive=interactive, metrics=metrics).run()
    from inferline.route_check import route_models
    from inferline.triton.launcher import TritonLauncher

    launcher = TritonLauncher(config.triton, models=route_models(config))
    await asyncio.to_thread(launcher.start)
    try:
        return await BatchJob(config, plan, launcher.grpc_url, interactive=interactive, metrics=metrics).run()
    finally:
        await asyncio.to_thread(launcher.stop)


async def run_until_signal(
    config: InferlineConfig, spec: BatchJobSpec, triton_url: str | None, *, metrics_port: int = 0
) -> dict[str, Any]:
    """``run_batch``, cancelled by SIGINT or SIGTERM (what ``kubectl delete`` and Ctrl-C send);
    with ``metrics_port`` its metrics are served there for Prometheus while it runs.

    Cancelling stops waiting at once: in-flight Triton calls are left to finish unobserved
    (never cancelled, docs/triton.md) and uncommitted chunks are dropped.

    Raises:
        BatchCancelled: a signal stopped the job; committed chunks stay, ``--resume`` continues.
    """
    import signal

    registry = None
    if metrics_port:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        start_http_server(metrics_port, registry=registry)
    task = asyncio.ensure_future(run_batch(config, spec, triton_url, registry=registry))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            raise BatchCancelled("cancelled: committed chunks are kept, --resume continues") from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
