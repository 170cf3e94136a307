"""Exactly once: a job SIGKILLed at random points and resumed, and a job split into shards,
each give every input row exactly once, the same rows and scores as one clean run."""

from __future__ import annotations

import asyncio
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from inferline.batch import BatchJobSpec, Shard, run_batch
from inferline.core.config import load_config
from inferline.triton.launcher import TritonLauncher
from tests.integration.router_fixtures import write_test_config
from tests.integration.test_batch_run import read_output
from tests.waiting import wait_until

pytestmark = pytest.mark.requires_triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUTE = "request_features_only"
ROWS, CHUNK_ROWS = 3000, 100
BAD_ROWS = [17, 1234, 2999]
KILLS = 3
RATE = 1000
"""Rows/s the killed runs may score (--max-rows-per-s): a job of 30 chunks lasts seconds, so
each kill, a few commits after the last one, lands mid-job."""
COMPARED = ["input_row", "driver_id", "score", "decision"]


@pytest.fixture(scope="module")
def job_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """(config, input): ``ROWS`` rows with null keys at ``BAD_ROWS``, in row groups unlike the chunks.

    The route ``ROUTE`` takes every feature from the input (no Feast source): what is under
    test is the commit protocol, and each of the job processes this module starts is then
    spared importing Feast (seconds each on a busy machine).
    """
    tmp = tmp_path_factory.mktemp("batch-resume")
    config = write_test_config(tmp / "inferline.yaml")
    raw = yaml.safe_load(config.read_text())
    route = raw["routes"]["driver_ranking"]
    route["features"] = [{"name": f["name"], "default": f["default"]} for f in route["features"]]
    raw["routes"][ROUTE] = route
    config.write_text(yaml.safe_dump(raw))
    rng = np.random.default_rng(5)
    ids = [None if i in BAD_ROWS else 1001 + (i * 13) % 1000 for i in range(ROWS)]
    columns = {"driver_id": pa.array(ids, pa.int64())}
    columns |= {f["name"]: pa.array(rng.uniform(0.1, 30, ROWS)) for f in route["features"]}
    pq.write_table(pa.table(columns), tmp / "in.parquet", row_group_size=256)
    return config, tmp / "in.parquet"


@pytest.fixture(scope="module")
def clean_run(
    job_input: tuple[pathlib.Path, pathlib.Path],
    triton_server: TritonLauncher,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pd.DataFrame, str]:
    """The output and errors file of one uninterrupted run."""
    config, input_path = job_input
    out = tmp_path_factory.mktemp("clean") / "out"
    spec = BatchJobSpec.build(route=ROUTE, input_path=input_path, output_dir=out, chunk_rows=CHUNK_ROWS)
    asyncio.run(run_batch(load_config(config), spec, triton_server.grpc_url))
    return read_output(out), (out / "_errors.csv").read_text()


def committed(out: pathlib.Path) -> int:
    manifest = out / "_inferline/shard-0-of-1/manifest.jsonl"
    return manifest.read_bytes().count(b"\n") if manifest.is_file() else 0


def batch_command(config: pathlib.Path, input_path: pathlib.Path, out: pathlib.Path, url: str) -> list[str]:
    command = [sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(config), "--route", ROUTE]
    return [*command, "--input", str(input_path), "--output", str(out), "--triton-url", url]


def assert_same_rows(got: pd.DataFrame, errors: str, clean: tuple[pd.DataFrame, str]) -> None:
    want, want_errors = clean
    assert not got["input_row"].duplicated().any()
    assert sorted([*got["input_row"], *BAD_ROWS]) == list(range(ROWS))
    pd.testing.assert_frame_equal(got[COMPARED], want[COMPARED])
    assert errors == want_errors


def test_sigkill_at_random_points_then_resume_gives_every_row_once(
    job_input: tuple[pathlib.Path, pathlib.Path],
    triton_server: TritonLauncher,
    clean_run: tuple[pd.DataFrame, str],
    tmp_path: pathlib.Path,
) -> None:
    """A SIGTERM first (an orderly cancel: exit 130), then SIGKILLs at random points, then a last resume."""
    config, input_path = job_input
    out = tmp_path / "out"
    command = batch_command(config, input_path, out, triton_server.grpc_url)
    command += ["--chunk-rows", str(CHUNK_ROWS)]
    rng = random.Random(14)
    log_path = tmp_path / "batch.log"
    log = log_path.open("ab")
    for run, sig in enumerate([signal.SIGTERM] + [signal.SIGKILL] * KILLS):
        resume = ["--resume"] if run else []
        process = subprocess.Popen([*command, *resume, "--max-rows-per-s", str(RATE)], stdout=log, stderr=log)
        target = committed(out) + rng.randint(1, 4)
        wait_until(lambda: committed(out) >= target or process.poll() is not None, "chunks committed", 120, 0.001)  # noqa: B023
        time.sleep(rng.uniform(0, 0.03))  # a random point between (or inside) commits
        process.send_signal(sig)
        process.wait(timeout=120)
        expected = 130 if sig == signal.SIGTERM else -signal.SIGKILL
        assert process.returncode == expected, f"run {run} ended with {process.returncode}: see {log_path}"
        assert not (out / "_inferline/shard-0-of-1/summary.json").exists()
    final = subprocess.run([*command, "--resume"], stdout=log, stderr=log, timeout=300)
    log.close()
    text = log_path.read_text()
    assert final.returncode == 0, text[-3000:]
    assert "cancelled: committed chunks are kept, --resume continues" in text
    assert_same_rows(read_output(out), (out / "_errors.csv").read_text(), clean_run)


async def test_shards_together_give_every_row_once(
    job_input: tuple[pathlib.Path, pathlib.Path],
    triton_server: TritonLauncher,
    clean_run: tuple[pd.DataFrame, str],
    tmp_path: pathlib.Path,
) -> None:
    config, input_path = job_input
    out = tmp_path / "out"
    summaries = []
    for index in range(3):
        spec = BatchJobSpec.build(
            route=ROUTE, input_path=input_path, output_dir=out, chunk_rows=CHUNK_ROWS, shard=Shard(index=index, count=3)
        )
        summaries.append(await run_batch(load_config(config), spec, triton_server.grpc_url))
    assert [s["chunks"] for s in summaries] == [10, 10, 10]
    errors = "".join(
        (out / f"_errors-shard-{i}-of-3.csv").read_text().removeprefix("row,column,reason\n") for i in range(3)
    )
    merged = "row,column,reason\n" + "".join(
        sorted(errors.splitlines(keepends=True), key=lambda line: int(line.split(",")[0]))
    )
    assert_same_rows(read_output(out), merged, clean_run)
