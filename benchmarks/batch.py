"""Batch job throughput against the best rate Triton gives large direct requests, and the job's peak RSS.

One run, one machine, the bundled Triton (or ``--triton-url``), model ``driver_ranker``:

* ``direct``: tritonclient.grpc.aio sends the rows straight to Triton in requests of the
  model's ``max_batch_size`` with ``--concurrency`` in flight (random feature rows, no
  feature store): the best rate Triton reaches with large requests here;
* ``job``: ``inferline batch run`` on a Parquet file of the same number of rows, drivers
  drawn uniformly over the demo store's (online features from the demo Feast repo,
  request-time feature from the file), run as its own process so its peak RSS is its own
  (``getrusage(RUSAGE_CHILDREN)``).

It prints one JSON object: rows/s of both, their ratio (the issue's target: >= 0.9), the
job's peak RSS and its summary (rows per Triton execution, cost per 1K rows).

    .venv/bin/python benchmarks/batch.py --rows 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tritonclient.grpc.aio as aioclient

from inferline.core.config import load_config
from inferline.demo.driver_data import driver_ids
from inferline.route_check import route_models
from inferline.triton.launcher import TritonLauncher

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "driver_ranker"


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


async def direct_rate(url: str, rows: int, request_rows: int, concurrency: int) -> float:
    """Rows/s of ``rows`` random rows sent straight to Triton, ``concurrency`` requests in flight."""
    batch = np.random.default_rng(2).random((request_rows, 4), dtype=np.float32)
    requests = -(-rows // request_rows)
    async with aioclient.InferenceServerClient(url) as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                tensor = aioclient.InferInput("features", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                # Never cancelled (RECIPES.md "Known defect"): a long client deadline, priority of batch.
                await client.infer(MODEL, [tensor], priority=3, client_timeout=120)

        shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
        await worker(1)  # warm the channel
        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in shares))
        return requests * request_rows / (time.perf_counter() - started)


def job(args: argparse.Namespace, url: str, input_path: pathlib.Path, out: pathlib.Path) -> dict[str, object]:
    command = [sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(args.config)]
    command += ["--route", "driver_ranking", "--input", str(input_path), "--output", str(out), "--triton-url", url]
    command += ["--chunk-rows", str(args.chunk_rows), "--concurrency", str(args.concurrency)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"batch run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary: dict[str, object] = json.loads(done.stdout)
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    parser.add_argument("--triton-url", default=None, help="a running Triton (default: start the bundled one)")
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    config = load_config(args.config)
    launcher = None
    url = args.triton_url
    if url is None:
        launcher = TritonLauncher(config.triton, models=route_models(config))
        launcher.start()
        url = launcher.grpc_url
    try:
        with tempfile.TemporaryDirectory(prefix="inferline-batch-bench-") as tmp:
            input_path = pathlib.Path(tmp) / "in.parquet"
            write_input(input_path, args.rows)
            direct = asyncio.run(direct_rate(url, args.rows, 128, args.concurrency))
            summary = job(args, url, input_path, pathlib.Path(tmp) / "out")
    finally:
        if launcher is not None:
            launcher.stop()
    this_run = summary["this_run"]
    assert isinstance(this_run, dict)
    job_rate = float(this_run["rows_per_s"])
    result = {
        "topology": f"bundled Triton (CPU, python backend) on this machine; {args.concurrency} requests in flight",
        "rows": args.rows,
        "direct_rows_per_s": round(direct, 1),
        "job_rows_per_s": job_rate,
        "job_vs_direct": round(job_rate / direct, 3),
        "job_peak_rss_mib": summary["peak_rss_mib"],
        "job_summary": summary,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
