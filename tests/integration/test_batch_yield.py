"""Yielding to online traffic on a real Triton whose batch class has its own model copy.

With ``driver_ranker__batch`` the job's requests and the online classes' requests sit in
different models' queues, so Triton's statistics tell them apart: the controller is on by
default, ignores the job's own queueing, and holds the job back only while online requests
queue. The target here is 1 ns, so any online queueing reads as pressure: the test is of
the signal's source, not of a threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client import CollectorRegistry

from inferline.batch import BatchJobSpec, run_batch
from inferline.core.config import ClassBatchingConfig, ClassCopiesConfig, TritonConfig
from inferline.triton.launcher import TritonLauncher
from tests.integration.test_batch_run import ROUTE, batch_config, feast_source
from tests.waiting import eventually

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]

COPIES = ClassCopiesConfig(
    models=["driver_ranker"],
    classes={"batch": ClassBatchingConfig(max_queue_delay_us=20_000, preferred_batch_sizes=[128])},
)
PACED = {"yield_queue_ms": 1e-6, "yield_interval_s": 0.02, "request_rows": 16, "max_rows_per_s": 1600}
"""16-row requests, 100 a second: the job spans many 20 ms intervals, each with requests of its own."""


@pytest.fixture(scope="module")
def copies_triton(triton_config: TritonConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    config = triton_config.model_copy(update={"class_copies": COPIES})
    launcher = TritonLauncher(config, log_path=tmp_path_factory.mktemp("triton-batch-copy") / "tritonserver.log")
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


@contextlib.asynccontextmanager
async def online_traffic(url: str) -> AsyncIterator[None]:
    """Two callers sending single-row critical requests (priority 1) to the base model until left."""
    row = np.array([[0.5, 0.8, 500.0, 3.0]], np.float32)
    stop = asyncio.Event()

    async def caller(client: aioclient.InferenceServerClient) -> None:
        while not stop.is_set():
            tensor = aioclient.InferInput("features", list(row.shape), "FP32")
            tensor.set_data_from_numpy(row)
            await client.infer("driver_ranker", [tensor], priority=1, client_timeout=60)  # never cancelled

    async with aioclient.InferenceServerClient(url) as client:
        callers = [asyncio.create_task(caller(client)) for _ in range(2)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*callers)


async def test_the_job_yields_to_online_requests_and_not_to_its_own(
    tmp_path: pathlib.Path, copies_triton: TritonLauncher
) -> None:
    config = batch_config(
        tmp_path,
        INFERLINE_TRITON__CLASS_COPIES__MODELS='["driver_ranker"]',
        INFERLINE_TRITON__CLASS_COPIES__CLASSES='{"batch": {"max_queue_delay_us": 20000}}',
    )
    feast_source(config)
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1401), pa.int64())}), tmp_path / "in.parquet")

    def spec(out: str, **options: object) -> BatchJobSpec:
        merged = {**PACED, **options}
        return BatchJobSpec.build(route=ROUTE, input_path=tmp_path / "in.parquet", output_dir=tmp_path / out, **merged)

    alone = await run_batch(config, spec("alone"), copies_triton.grpc_url)

    # Online requests queue for as long as they run, so the job would wait them out: they run
    # until the job has been seen held back, then stop, and the job finishes.
    registry = CollectorRegistry()
    limit = {"route": ROUTE}
    async with online_traffic(copies_triton.grpc_url):
        job = asyncio.create_task(run_batch(config, spec("beside"), copies_triton.grpc_url, registry=registry))
        await eventually(
            lambda: job.done() or (registry.get_sample_value("inferline_batch_concurrency_limit", limit) or 4) < 4,
            "the job held back",
        )
    beside_online = await job
    default = await run_batch(config, spec("default", yield_queue_ms=None), copies_triton.grpc_url)

    assert alone["model"] == beside_online["model"] == "driver_ranker__batch"
    assert (alone["rows"], beside_online["rows"]) == (400, 400)
    assert alone["yield"]["intervals"] > 0
    assert alone["yield"]["throttled_share"] == 0  # its own queueing is in the copy's queue, not counted
    assert beside_online["yield"]["throttled_share"] > 0
    assert default["yield"] is not None  # on by default when the class has its own copy
