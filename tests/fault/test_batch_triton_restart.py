"""Batch jobs stream their requests to Triton: a Triton killed part-way, a slow model beside a fast one.

The job sends its requests over one ModelStreamInfer stream (``InferStream``): a killed
Triton breaks that stream with requests on it. Every such request must fail over to a
retry on a new stream once Triton is back, and the output must still hold every input row
exactly once, each with the score Triton gives it.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferline.batch import run_batch
from inferline.core.config import TritonConfig
from inferline.core.deadline import Deadline
from inferline.triton.executor import TritonExecutor
from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import SLOW_DELAY_MS, SLOW_MODEL
from tests.integration.test_batch_run import batch_config, read_output, spec
from tests.waiting import eventually

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]

ROWS = 60_000
CHUNK_ROWS = 2048
"""Flat out, 4 requests in flight: Triton is killed with requests on the stream and most of
the job still to do."""


async def test_a_job_rides_out_a_triton_restart(tmp_path: pathlib.Path, triton_config: TritonConfig) -> None:
    config = batch_config(tmp_path)
    rows = pd.DataFrame(
        {
            "driver_id": (1001 + np.arange(ROWS) % 1000).astype(np.int64),
            "trip_distance_km": np.linspace(0.5, 25.0, ROWS),
        }
    )
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "in.parquet")
    launcher = TritonLauncher(triton_config, models=("driver_ranker",), log_path=tmp_path / "triton.log")
    launcher.start()
    try:
        # Retries of 0.1, 0.2, 0.4 … s, at most 5 s apart: 12 attempts span ~40 s, past a restart.
        job = spec(tmp_path / "in.parquet", tmp_path / "out", chunk_rows=CHUNK_ROWS, attempts=12)
        running = asyncio.create_task(run_batch(config, job, launcher.grpc_url))
        manifest = tmp_path / "out/_inferline/shard-0-of-1/manifest.jsonl"
        await eventually(lambda: manifest.is_file() and manifest.read_text().count("\n") >= 1, "a first chunk")
        pid = launcher.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(launcher.restart)
        summary = await asyncio.wait_for(running, 120)

        assert (summary["status"], summary["rows"], summary["errors"]) == ("complete", ROWS, 0)
        assert summary["this_run"]["retries"] > 0, "Triton was killed mid-job: some request must have been retried"
        out = read_output(tmp_path / "out")
        assert out["input_row"].tolist() == list(range(ROWS))  # every row once
        assert out["driver_id"].tolist() == rows["driver_id"].tolist()
        # The same scores as a job that met no outage, on the same Triton.
        clean = spec(tmp_path / "in.parquet", tmp_path / "clean", chunk_rows=CHUNK_ROWS)
        await run_batch(config, clean, launcher.grpc_url)
        np.testing.assert_allclose(out["score"].to_numpy(), read_output(tmp_path / "clean")["score"].to_numpy())
    finally:
        launcher.stop()


async def test_a_slow_models_stream_does_not_hold_back_another_models(fault_triton: TritonLauncher) -> None:
    """Triton answers a stream in request order: each model gets a stream of its own, so a
    variant measured beside a job's requests on a slow one is answered when it is done."""
    fault_triton.start()  # no-op while it runs (another fault test may have stopped it)
    executor = TritonExecutor(fault_triton.grpc_url, stream_calls=True)
    row = np.array([[0.5, 0.8, 500, 3]], np.float32)
    try:
        slow = asyncio.create_task(
            executor.infer(SLOW_MODEL, row, deadline=Deadline.after(30), priority=3, input_name="features")
        )
        await eventually(lambda: executor.in_flight(SLOW_MODEL) == 1, "the slow request to be sent")
        fast = await executor.infer("driver_ranker", row, deadline=Deadline.after(30), priority=3)
        assert fast.scores.shape == (1,)
        assert not slow.done(), f"the fast answer waited for the slow one ({SLOW_DELAY_MS} ms)"
        assert (await slow).scores.shape == (1,)
    finally:
        await executor.close()
