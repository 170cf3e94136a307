"""A batch job's online feature reads in worker processes, against the materialised Feast demo repo.

The pool must read what the in-process store reads; a Feast error fails the read (as it
fails an in-process one) and leaves the pool working; a worker that dies fails the read
with ``BatchJobFailed`` (resumable) instead of hanging; and no worker outlives its job,
closed or SIGKILLed, and each runs at the job's niceness.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferline.batch.errors import BatchJobFailed
from inferline.batch.feature_workers import FeatureReadError, FeatureReadPool
from inferline.core.entities import EntityId
from inferline.features.store import FeastOnlineStore
from inferline.triton.launcher import TritonLauncher
from tests.integration.router_fixtures import write_test_config
from tests.integration.test_batch_run import ROUTE, batch_config, feast_source
from tests.waiting import wait_until

pytestmark = pytest.mark.requires_feast

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFS = ["driver_hourly_stats:conv_rate", "driver_hourly_stats:acc_rate", "driver_hourly_stats:avg_daily_trips"]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def pool(tmp_path: pathlib.Path) -> Iterator[FeatureReadPool]:
    config = batch_config(tmp_path)
    feast_source(config)  # skips without the materialised repo
    workers = FeatureReadPool(str(config.feature_store.feast_repo), 2)
    try:
        workers.start(REFS, "driver_id", 0)
        yield workers
    finally:
        workers.close()


async def test_the_workers_read_what_the_in_process_store_reads(pool: FeatureReadPool, tmp_path: pathlib.Path) -> None:
    ids: list[EntityId] = [1001 + (i * 37) % 5000 for i in range(2500)]
    ids += [5, 999_999_999]  # unknown to the store
    parts = [ids[start : start + 1000] for start in range(0, len(ids), 1000)]

    got = np.concatenate(await asyncio.gather(*(pool.read(REFS, "driver_id", part) for part in parts)))

    store = FeastOnlineStore(batch_config(tmp_path).feature_store.feast_repo)
    try:
        read = await store.read(REFS, "driver_id", ids)
    finally:
        await store.close()
    want = np.array([read[ref] for ref in REFS], dtype=np.float32).T
    assert got.dtype == np.float32 and got.shape == (len(ids), len(REFS))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[-2:]).all() and not np.isnan(got[:-2]).any()
    assert len(pool.pids) == 2 and os.getpid() not in pool.pids


async def test_a_feast_error_fails_the_read_and_the_pool_keeps_working(pool: FeatureReadPool) -> None:
    with pytest.raises(FeatureReadError, match="FeatureViewNotFoundException: Feature view nope does not exist"):
        await pool.read(["nope:x"], "driver_id", [1001])
    assert (await pool.read(REFS, "driver_id", [1001])).shape == (1, 3)


async def test_a_dead_worker_fails_reads_resumably_and_close_ends_the_others(pool: FeatureReadPool) -> None:
    pids = pool.pids
    os.kill(pids[0], signal.SIGKILL)

    with pytest.raises(BatchJobFailed, match="a feature read process died"):
        # Bounded: a broken pool must fail the read, never leave it waiting.
        await asyncio.wait_for(pool.read(REFS, "driver_id", list(range(1001, 2001))), 60)
    await asyncio.to_thread(pool.close)
    assert not any(alive(pid) for pid in pids)


def test_close_ends_every_worker(pool: FeatureReadPool) -> None:
    pids = pool.pids
    pool.close()
    assert pids and not any(alive(pid) for pid in pids)


def test_a_sigkilled_job_leaves_no_feature_workers(tmp_path: pathlib.Path, triton_server: TritonLauncher) -> None:
    """A job started 3 steps nicer than this process: its workers run at its niceness, and
    once it is SIGKILLed (no chance to close them) they and their fork server exit."""
    feast_source(batch_config(tmp_path))
    config = write_test_config(tmp_path / "inferline.yaml")
    n = 200_000
    ids = pa.array(1001 + np.random.default_rng(1).integers(0, 100_000, n), pa.int64())
    pq.write_table(pa.table({"driver_id": ids}), tmp_path / "in.parquet")
    command = ["nice", "-n", "3", sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(config)]
    command += ["--route", ROUTE, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    command += ["--triton-url", triton_server.grpc_url, "--feature-processes", "2", "--max-rows-per-s", "2000"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as job:
        lines: queue.Queue[str] = queue.Queue()
        assert job.stderr is not None
        stderr = job.stderr

        # The job's stderr reaches its fork server and workers too: EOF once they are all gone.
        def read() -> None:
            for text in stderr:
                lines.put(text)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        workers: list[int] = []
        fork_server: set[int] = set()
        try:
            while "feature read processes (pids" not in (line := lines.get(timeout=120)):
                assert job.poll() is None, f"the job ended ({job.returncode}): {line}"
            workers = [int(pid) for pid in line.split("(pids ", 1)[1].split(")", 1)[0].split()]
            assert len(workers) == 2
            own = os.getpriority(os.PRIO_PROCESS, 0)
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in workers] == [own + 3, own + 3]
            fork_server = {parent(pid) for pid in workers}
            assert fork_server != {job.pid} and len(fork_server) == 1  # forked by the fork server, not the job
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait(timeout=60)
        wait_until(lambda: not any(alive(pid) for pid in [*workers, *fork_server]), "feature workers gone", 60)
        reader.join(timeout=60)  # before the pipe is closed under it
        assert not reader.is_alive()
