"""Online latency through the router beside a BatchJobs service job (``benchmarks/batch.py --service``).

``inferline up`` as installed (the embedded gateway in front), with the BatchJobs service on
(``batch_jobs`` set by environment overrides, over a temporary directory), then phases that
alternate — alone, beside a job, alone, beside a job, … — each ``phase_s`` of open-loop
Poisson ``Predict`` calls of the ``critical`` class (100 ms deadline, Zipf entities over the
demo store). A job phase submits a job over a large input (drivers uniform over the demo
store, so Feast is on its path), waits until its first chunk is committed, drives the load,
then cancels the job. Alternating phases in one run is what makes the comparison fair on a
shared, noisy machine.

Reported per phase: online p50/p99 response time of OK answers, answers in time, errors,
and the job's rows/s over the phase; and the median p99 beside a job over the median alone.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from inferline.bench.harness import ServerProcess, health_serving, inferline_up, wait_until
from inferline.bench.loadgen import LoadResult, run_open_loop
from inferline.bench.targets import DEMO_API_KEY, predict_target
from inferline.core.ports import free_ports
from inferline.demo.driver_data import driver_ids
from inferline.v1 import batch_jobs_pb2 as pb
from inferline.v1 import batch_jobs_pb2_grpc as pb_grpc

TENANT = "demo"
INPUT_NAME = "drivers.parquet"


def write_input(path: pathlib.Path, rows: int, seed: int = 1) -> None:
    """``rows`` demo drivers drawn uniformly over the whole demo store (most read from it at
    least once: the hot cache helps little) with a request-time trip distance, in row groups."""
    rng = np.random.default_rng(seed)
    ids = driver_ids()
    writer = None
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        table = pa.table(
            {
                "driver_id": pa.array(rng.choice(ids, n), pa.int64()),
                "trip_distance_km": pa.array(rng.gamma(2.0, 3.0, n)),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


@dataclass
class ServiceJobSettings:
    config: pathlib.Path
    rows: int = 400_000
    """Input rows of each job: more than a phase scores, so the job runs flat out throughout."""
    rate: float = 100.0
    """Online Predict calls a second."""
    phase_s: float = 8.0
    rounds: int = 2
    """Alone/job pairs."""
    process_nice: int | None = None
    """``batch_jobs.process_nice`` (None: the config's)."""
    results_dir: pathlib.Path = field(default_factory=lambda: pathlib.Path("benchmarks/results"))


def phase_summary(result: LoadResult) -> dict[str, Any]:
    """A phase's online figures: response times (from the scheduled arrival) of OK answers."""
    return {
        "sent": result.sent,
        "ok_in_time": result.ok_within_deadline,
        "p50_ms": round(result.response_time.p50_ms, 2),
        "p99_ms": round(result.response_time.p99_ms, 2),
        "errors": sum(result.errors.values()),
        "generator_fell_behind": result.fell_behind,
    }


def p99_ratio(phases: list[dict[str, Any]]) -> float | None:
    """Median p99 beside a job over the median p99 alone (the issue's bound: at most 1.2)."""
    alone = [p["p99_ms"] for p in phases if p["name"] == "alone" and p["p99_ms"] == p["p99_ms"]]
    beside = [p["p99_ms"] for p in phases if p["name"] == "job" and p["p99_ms"] == p["p99_ms"]]
    if not alone or not beside:
        return None
    return round(float(np.median(beside)) / float(np.median(alone)), 3)


async def _job_rows(stub: Any, job_id: str, metadata: Any) -> pb.BatchJob:
    reply = await stub.GetBatchJob(pb.GetBatchJobRequest(job_id=job_id), metadata=metadata, timeout=5)
    job: pb.BatchJob = reply.job
    return job


async def _online_phase(url: str, settings: ServiceJobSettings, seed: int) -> dict[str, Any]:
    target = predict_target(url, traffic_class="critical", deadline_s=0.1)
    try:
        result = await run_open_loop(
            target.call, rate=settings.rate, duration_s=settings.phase_s, deadline_s=0.1, warmup_s=0.5, seed=seed
        )
    finally:
        await target.close()
    return phase_summary(result)


async def run_service_jobs(settings: ServiceJobSettings) -> dict[str, Any]:
    """Start ``inferline up`` with the service on, run the alternating phases, return the report."""
    with tempfile.TemporaryDirectory(prefix="inferline-service-jobs-") as tmp:
        root = pathlib.Path(tmp)
        (root / "in" / TENANT).mkdir(parents=True)
        (root / "out" / TENANT).mkdir(parents=True)
        write_input(root / "in" / TENANT / INPUT_NAME, settings.rows)
        env = {
            "INFERLINE_BATCH_JOBS__INPUT_ROOT": str(root / "in"),
            "INFERLINE_BATCH_JOBS__OUTPUT_ROOT": str(root / "out"),
        }
        if settings.process_nice is not None:
            env["INFERLINE_BATCH_JOBS__PROCESS_NICE"] = str(settings.process_nice)
        port, metrics_port = free_ports(2)
        server = ServerProcess(
            "inferline up",
            f"127.0.0.1:{port}",
            inferline_up(settings.config.resolve(), port, metrics_port, gateway=True),
            root / "up.log",
            env=env,
        )
        server.start()
        phases: list[dict[str, Any]] = []
        try:
            await wait_until(lambda: health_serving(server.url), "inferline up", server, 180)
            metadata = [("authorization", f"Bearer {DEMO_API_KEY}")]
            async with grpc.aio.insecure_channel(server.url) as channel:
                stub: Any = pb_grpc.BatchJobsStub(channel)  # grpc.aio: the generated stubs are typed for sync calls
                await _online_phase(server.url, ServiceJobSettings(settings.config, rate=settings.rate, phase_s=2), 0)
                for k in range(2 * settings.rounds):
                    if k % 2 == 0:
                        phase = {"name": "alone", **await _online_phase(server.url, settings, k + 1)}
                    else:
                        phase = {"name": "job", **await _beside_job(stub, metadata, server, settings, k)}
                    phases.append(phase)
        finally:
            server.stop(timeout_s=30)
    return {
        "topology": "inferline up as installed (embedded gateway in front), bundled Triton, Feast SQLite demo store",
        "rows_per_job": settings.rows,
        "online_rate": settings.rate,
        "phase_s": settings.phase_s,
        "process_nice": settings.process_nice,
        "phases": phases,
        "p99_beside_job_over_alone": p99_ratio(phases),
    }


async def _beside_job(
    stub: Any,
    metadata: Any,
    server: ServerProcess,
    settings: ServiceJobSettings,
    k: int,
) -> dict[str, Any]:
    spec = pb.BatchJobSpec(route="driver_ranking", input=INPUT_NAME, output=f"job-{k}")
    job = (await stub.SubmitBatchJob(pb.SubmitBatchJobRequest(spec=spec), metadata=metadata, timeout=30)).job

    async def scoring() -> bool:
        state = await _job_rows(stub, job.job_id, metadata)
        if state.state in (pb.BATCH_JOB_STATE_FAILED, pb.BATCH_JOB_STATE_SUCCEEDED):
            raise RuntimeError(f"job ended before its phase: {state.error or 'succeeded'}")
        return state.rows_done > 0

    await wait_until(scoring, "the job's first chunk", server, 120)
    before, started = (await _job_rows(stub, job.job_id, metadata)).rows_done, time.monotonic()
    online = await _online_phase(server.url, settings, k + 1)
    after, took = (await _job_rows(stub, job.job_id, metadata)).rows_done, time.monotonic() - started
    await stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=metadata, timeout=30)
    return {**online, "job_rows_per_s": round((after - before) / took, 1)}
