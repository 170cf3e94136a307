"""The ``BatchJobs`` gRPC service: batch jobs submitted by callers, run by the serving process.

``request.py`` checks a submitted job, ``store.py`` keeps the jobs' state (SQLite, or
Postgres), ``manager.py`` runs them (each in a child process: ``process.py``, and
``job_process.py`` in the child), ``servicer.py`` is the gRPC adapter. ``BatchJobsService``
puts them together for the router's app (``inferline.app``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry

from inferline.batch.service.manager import JobRunner
from inferline.batch.service.servicer import SERVICE_NAME, BatchJobsServicer
from inferline.batch.service.store import JobStore
from inferline.core.config import InferlineConfig
from inferline.v1 import batch_jobs_pb2_grpc

if TYPE_CHECKING:
    from inferline.router.gate import RequestGate

logger = logging.getLogger(__name__)

STATE_FILE = "_batch_jobs.sqlite"
"""The state file's name in ``batch_jobs.output_root`` when ``batch_jobs.state_path`` is unset."""

__all__ = ["SERVICE_NAME", "STATE_FILE", "BatchJobsService"]


class BatchJobsService:
    """The servicer, its job runner and its store, with the app's start and close."""

    def __init__(
        self,
        config: InferlineConfig,
        gate: RequestGate,
        triton_url: str,
        registry: CollectorRegistry | None = None,
        *,
        online_wait_s: Callable[[], float] | None = None,
    ) -> None:
        """``online_wait_s``: the router's queue wait, which its jobs yield to (``JobRunner``)."""
        jobs = config.batch_jobs
        assert jobs.output_root is not None, "batch_jobs is off"
        self.store = JobStore(jobs.state_url or jobs.state_path or jobs.output_root / STATE_FILE)
        self.runner = JobRunner(config, self.store, triton_url, registry, online_wait_s=online_wait_s)
        self.servicer = BatchJobsServicer(config, gate, self.store, self.runner)
        self._runs_jobs = jobs.run_jobs
        """False (``batch_jobs.run_jobs``): the runner never starts, so it claims no job; Cancel
        still flags the job in the store for the process running it."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        batch_jobs_pb2_grpc.add_BatchJobsServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        if self._runs_jobs:
            await self.runner.start()
        else:
            logger.info("batch jobs: served here, run by the other processes sharing the state (batch_jobs.run_jobs)")

    async def close(self) -> None:
        try:
            await self.runner.close()
        finally:
            self.store.close()
