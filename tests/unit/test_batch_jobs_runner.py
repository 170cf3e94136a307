"""``JobRunner`` on its own loop and thread, for what happens before a job reaches Triton: an input
gone since the submit fails the job (with no server path in its error), and an output another
process holds makes the job wait (not fail). Jobs that score: tests/integration/test_batch_jobs_service.py."""

from __future__ import annotations

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferline.batch.output import OutputDir
from inferline.batch.plan import plan_job
from inferline.batch.service.manager import JobRunner
from inferline.batch.service.store import JobState, JobStore, NewJob
from inferline.batch.spec import BatchJobSpec
from inferline.core.config import InferlineConfig, load_config
from tests.waiting import eventually

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNREACHABLE = "127.0.0.1:9"
"""No Triton: every test here ends before a job would call it."""


@pytest.fixture
def config(tmp_path: pathlib.Path) -> InferlineConfig:
    base = load_config(ROOT / "deploy" / "local" / "inferline.yaml")
    jobs = base.batch_jobs.model_copy(
        update={"input_root": tmp_path / "in", "output_root": tmp_path / "out", "lease_s": 1.0}
    )
    return base.model_copy(update={"batch_jobs": jobs})


def submitted(config: InferlineConfig, store: JobStore, job_id: str = "j") -> BatchJobSpec:
    """A job as the servicer would have queued it, on a fresh input of the demo tenant."""
    assert config.batch_jobs.input_root is not None and config.batch_jobs.output_root is not None
    path = config.batch_jobs.input_root / "demo" / "drivers.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"driver_id": pa.array([1001, 1002], pa.int64())}), path)
    spec = BatchJobSpec.build(
        route="driver_ranking", input_path=path, output_dir=config.batch_jobs.output_root / "demo" / "o"
    )
    job = NewJob(
        job_id=job_id,
        tenant="demo",
        request_id=None,
        api_spec={"route": "driver_ranking", "input": "drivers.parquet", "output": "o"},
        job_spec=spec.model_dump(mode="json"),
        output_key=f"{spec.output_dir}#{spec.shard.label}",
        errors_file="o/_errors.csv",
    )
    store.insert(job, max_active=10)
    return spec


async def test_an_input_gone_since_the_submit_fails_the_job(config: InferlineConfig, tmp_path: pathlib.Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    spec = submitted(config, store)
    spec.input_path.unlink()
    runner = JobRunner(config, store, UNREACHABLE)
    await runner.start()
    try:
        await eventually(lambda: store.get("demo", "j").state is JobState.FAILED, "the job failed")  # type: ignore[union-attr]
    finally:
        await runner.close()
    job = store.get("demo", "j")
    assert job is not None and (job.runs, job.owner) == (1, None)
    assert job.error == "input drivers.parquet: no such file"
    assert str(tmp_path) not in job.error


async def test_an_output_another_process_holds_makes_the_job_wait(
    config: InferlineConfig, tmp_path: pathlib.Path
) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    spec = submitted(config, store)
    held = OutputDir(spec.output_dir, spec.shard.label, False)
    held.open(plan_job(config, spec).identity(), resume=True)  # e.g. a `batch run` on the same directory
    runner = JobRunner(config, store, UNREACHABLE)
    await runner.start()
    try:
        await eventually(lambda: store.get("demo", "j").error.startswith("waiting:"), "the job waiting")  # type: ignore[union-attr]
        job = store.get("demo", "j")
        assert job is not None and job.state is JobState.RUNNING
        assert job.error == "waiting: output o: another run of shard-0-of-1 is using it"
        # Tried again once the claim has run out (lease_s), still waiting, never failed.
        await eventually(lambda: store.get("demo", "j").runs >= 2, "a second try", within_s=10)  # type: ignore[union-attr]
        assert store.get("demo", "j").state is JobState.RUNNING  # type: ignore[union-attr]
    finally:
        held.close()
        await runner.close()
