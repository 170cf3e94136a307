"""A BatchJobs service job in its child process (``JobProcess``), against the real Triton and
Feast demo store: it yields to the router's queue wait the router tells it through the pipe
(paused while the wait is over its target, running flat out when it is not), and relays its
progress and gauges back."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from inferline.batch.metrics import BatchMetrics
from inferline.batch.output import ChunkRecord
from inferline.batch.service.process import JobProcess
from inferline.batch.spec import BatchJobSpec
from inferline.triton.launcher import TritonLauncher
from tests.integration.test_batch_run import ROUTE, batch_config, feast_source
from tests.waiting import eventually

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]

ROWS, CHUNK_ROWS = 4000, 100


class Progress:
    """The job's observer: rows of the chunks committed so far."""

    def __init__(self) -> None:
        self.rows = 0

    def started(self, total_rows: int | None, done: Mapping[int, ChunkRecord]) -> None:
        pass

    def committed(self, record: ChunkRecord) -> None:
        self.rows += record.input_rows


async def rows_settle(progress: Progress, *, quiet_s: float, within_s: float) -> int:
    """The committed rows once no chunk has committed for ``quiet_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    rows, since = progress.rows, loop.time()
    while loop.time() - since < quiet_s:
        assert loop.time() < deadline, f"rows still moving after {within_s} s ({progress.rows})"
        await asyncio.sleep(0.02)
        if progress.rows != rows:
            rows, since = progress.rows, loop.time()
    return rows


def write_input(path: pathlib.Path) -> pathlib.Path:
    ids = 1001 + np.arange(ROWS) % 1000
    pq.write_table(pa.table({"driver_id": pa.array(ids, pa.int64()), "trip_distance_km": np.full(ROWS, 3.0)}), path)
    return path


async def test_a_job_pauses_while_the_router_waits_and_runs_when_it_does_not(
    tmp_path: pathlib.Path, triton_server: TritonLauncher
) -> None:
    config = batch_config(tmp_path)
    feast_source(config)
    spec = BatchJobSpec.build(
        route=ROUTE,
        input_path=write_input(tmp_path / "in.parquet"),
        output_dir=tmp_path / "out",
        chunk_rows=CHUNK_ROWS,
        yield_interval_s=0.1,
        max_rows_per_s=2000,  # ~2 s flat out: time for the router's signal to act on it
    )
    router_wait_s = [1.0]  # a router whose requests wait a second: far over any target
    registry = CollectorRegistry()
    progress = Progress()
    job = JobProcess(
        config,
        spec,
        triton_server.grpc_url,
        observer=progress,
        metrics=BatchMetrics(registry, ROUTE),
        online_wait_s=lambda: router_wait_s[0],
    )

    def gauge(name: str) -> float | None:  # the job's gauges, relayed from its process every second
        return registry.get_sample_value(f"inferline_batch_{name}", {"route": ROUTE})

    run = asyncio.ensure_future(job.run())
    try:
        # The router's wait told to the job, and the job's concurrency brought down to nothing.
        await eventually(
            lambda: gauge("online_queue_wait_seconds") == 1.0 and gauge("concurrency_limit") == 0,
            "the job paused",
            within_s=120,
        )
        # Requests already in flight when it paused still finish and their chunks commit (their
        # reports reach this process through the pipe, late on a busy machine); then nothing
        # moves. Flat out at 2,000 rows/s a chunk commits every 50 ms: ten yield intervals
        # without one is the pause.
        settled = await rows_settle(progress, quiet_s=1.0, within_s=60)
        assert settled < ROWS
        assert gauge("concurrency_limit") == 0

        router_wait_s[0] = 0.0  # the router's queue is empty again: the job takes Triton back
        summary = await asyncio.wait_for(run, 120)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    assert (summary["rows"], progress.rows) == (ROWS, ROWS)
    assert summary["yield"]["paused_share"] > 0
