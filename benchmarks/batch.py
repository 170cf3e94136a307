"""Batch job throughput against the best rate Triton gives large direct requests, and the job's peak RSS.

One run, one machine, the bundled Triton (or ``--triton-url``), model ``driver_ranker``:

* ``direct``: tritonclient.grpc.aio sends the rows straight to Triton in requests of the
  model's ``max_batch_size`` with ``--concurrency`` in flight (random feature rows, no
  feature store), once as unary calls and once over one stream (``stream_infer``, as the
  job sends): the better of the two is the best rate Triton reaches with large requests here;
* ``job``: ``inferline batch run`` on a Parquet file of the same number of rows, drivers
  drawn uniformly over the demo store's (online features from the demo Feast repo,
  request-time feature from the file), run as its own process so its peak RSS is its own
  (``getrusage(RUSAGE_CHILDREN)``).

It prints one JSON object: rows/s of both, their ratio (the issue's target: >= 0.9), the
job's peak RSS and its summary (rows per Triton execution, cost per 1K rows).

``--interference``: online p50/p99 of single-row critical requests (priority 1, open-loop
Poisson at ``--online-rate``) straight to Triton's ``driver_ranker``, for ``--phase-s``
seconds each: alone, beside a batch job that does not yield (``--yield-queue-ms 0``), and
beside one that does (the default, 2 ms). The Triton started here has a copy of the model
for the batch class (``triton.class_copies``), as the yield controller needs; each job
runs on ``--rows`` rows and is stopped (SIGTERM) when its phase ends.

``--service``: online latency through the router (``inferline up`` as installed, gateway in
front) alone and beside a job of the BatchJobs service, in alternating phases
(``inferline.bench.service_jobs``); ``--job-nice`` sets ``batch_jobs.process_nice``.

    .venv/bin/python benchmarks/batch.py --rows 200000
    .venv/bin/python benchmarks/batch.py --interference --online-rate 200 --phase-s 8
    .venv/bin/python benchmarks/batch.py --service --rows 400000 --online-rate 100 --phase-s 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import numpy as np
import tritonclient.grpc.aio as aioclient

from inferline.bench.process_tree import TreeMemory
from inferline.bench.service_jobs import ServiceJobSettings, run_service_jobs, write_input
from inferline.core.config import load_config
from inferline.route_check import route_models
from inferline.triton.launcher import TritonLauncher

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "driver_ranker"


async def direct_rate(url: str, rows: int, request_rows: int, concurrency: int) -> float:
    """Rows/s of ``rows`` random rows sent straight to Triton, ``concurrency`` requests in flight."""
    batch = np.random.default_rng(2).random((request_rows, 4), dtype=np.float32)
    requests = -(-rows // request_rows)
    async with aioclient.InferenceServerClient(url) as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                tensor = aioclient.InferInput("features", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                # Never cancelled (docs/triton.md): a long client deadline, priority of batch.
                await client.infer(MODEL, [tensor], priority=3, client_timeout=120)

        shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
        await worker(1)  # warm the channel
        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in shares))
        return requests * request_rows / (time.perf_counter() - started)


async def direct_streamed_rate(url: str, rows: int, request_rows: int, concurrency: int) -> float:
    """As ``direct_rate``, over one ModelStreamInfer stream (tritonclient's ``stream_infer``),
    ``concurrency`` requests on it at once: the way the job sends."""
    batch = np.random.default_rng(2).random((request_rows, 4), dtype=np.float32)
    requests = -(-rows // request_rows)
    window = asyncio.Semaphore(concurrency)

    async def inputs(count: int) -> AsyncIterator[dict[str, object]]:
        for i in range(count):
            await window.acquire()
            tensor = aioclient.InferInput("features", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            yield {"model_name": MODEL, "inputs": [tensor], "priority": 3, "request_id": str(i)}

    async def run(count: int) -> None:
        async with aioclient.InferenceServerClient(url) as client:
            answered = 0
            async for _result, error in client.stream_infer(inputs(count)):
                if error is not None:
                    raise SystemExit(f"direct streamed request failed: {error}")
                window.release()
                answered += 1
                if answered == count:
                    return

    await run(1)  # warm the channel
    started = time.perf_counter()
    await run(requests)
    return requests * request_rows / (time.perf_counter() - started)


def job(args: argparse.Namespace, url: str, input_path: pathlib.Path, out: pathlib.Path) -> dict[str, object]:
    command = [sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(args.config)]
    command += ["--route", "driver_ranking", "--input", str(input_path), "--output", str(out), "--triton-url", url]
    command += ["--chunk-rows", str(args.chunk_rows), "--concurrency", str(args.concurrency)]
    if args.feature_processes is not None:
        command += ["--feature-processes", str(args.feature_processes)]
    command += ["--view-scan", args.view_scan]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = TreeMemory(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    wall_s = time.perf_counter() - started
    sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"batch run failed ({process.returncode}):\n{stderr[-3000:]}")
    summary: dict[str, object] = json.loads(stdout)
    summary["wall_s"] = round(wall_s, 2)
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    summary["peak_tree_rss_mib"] = round(sampler.peak_rss / 2**20, 1)
    summary["peak_tree_pss_mib"] = round(sampler.peak_pss / 2**20, 1)
    return summary


COPIES = {"models": [MODEL], "classes": {"batch": {"max_queue_delay_us": 20000, "preferred_batch_sizes": [128]}}}
"""The batch class's copy of the model: its own queue (the yield signal leaves it out), a wide window."""


async def online_latencies(url: str, rate: float, duration_s: float, seed: int = 3) -> list[float]:
    """Latencies (s) of single-row priority-1 requests sent open-loop (Poisson) for ``duration_s``."""
    row = np.array([[0.5, 0.8, 500.0, 3.0]], np.float32)
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    async with aioclient.InferenceServerClient(url) as client:

        async def one() -> None:
            tensor = aioclient.InferInput("features", list(row.shape), "FP32")
            tensor.set_data_from_numpy(row)
            started = time.perf_counter()
            await client.infer(MODEL, [tensor], priority=1, client_timeout=60)  # never cancelled
            latencies.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        due = start
        while due - start < duration_s:
            due += rng.exponential(1 / rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def interference(args: argparse.Namespace) -> dict[str, object]:
    import yaml

    raw = yaml.safe_load(args.config.read_text())
    raw.setdefault("triton", {})["class_copies"] = COPIES
    with tempfile.TemporaryDirectory(prefix="inferline-batch-online-") as tmp:
        config_path = pathlib.Path(tmp) / "inferline.yaml"
        for key in ("model_repository", "server_env"):
            raw["triton"][key] = str((args.config.parent / raw["triton"][key]).resolve())
        raw["feature_store"]["feast_repo"] = str((args.config.parent / raw["feature_store"]["feast_repo"]).resolve())
        config_path.write_text(yaml.safe_dump(raw))
        config = load_config(config_path)
        input_path = pathlib.Path(tmp) / "in.parquet"
        write_input(input_path, args.rows)
        phases: dict[str, object] = {}
        with TritonLauncher(config.triton, models=route_models(config)) as launcher:
            url = launcher.grpc_url
            asyncio.run(online_latencies(url, args.online_rate, 1.0))  # warm-up
            for name, yield_ms in (("alone", None), ("job_not_yielding", "0"), ("job_yielding", "2")):
                job = None
                if yield_ms is not None:
                    command = [sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(config_path)]
                    command += ["--route", "driver_ranking", "--input", str(input_path), "--triton-url", url]
                    command += ["--output", f"{tmp}/out-{name}", "--yield-queue-ms", yield_ms]
                    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    assert job.stderr is not None
                    for line in job.stderr:  # scoring starts right after this line
                        if "chunks already done" in line:
                            break
                latencies = np.array(asyncio.run(online_latencies(url, args.online_rate, args.phase_s)))
                if job is not None:
                    job.send_signal(signal.SIGTERM)
                    job.communicate(timeout=120)
                phases[name] = {
                    "requests": len(latencies),
                    "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
                    "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
                }
    return {
        "topology": "bundled Triton (CPU, python backend) with a batch-class copy; online calls straight to Triton",
        "online_rate": args.online_rate,
        "phase_s": args.phase_s,
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    parser.add_argument("--triton-url", default=None, help="a running Triton (default: start the bundled one)")
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--feature-processes", type=int, default=None, help="the job's --feature-processes (default: the job's own)"
    )
    parser.add_argument(
        "--view-scan", choices=["auto", "always", "never"], default="auto", help="the job's --view-scan"
    )
    parser.add_argument("--interference", action="store_true", help="online p99 alone and beside a job")
    parser.add_argument("--online-rate", type=float, default=200.0)
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument(
        "--service", action="store_true", help="online p99 through the router alone and beside a BatchJobs service job"
    )
    parser.add_argument("--rounds", type=int, default=2, help="--service: alone/job phase pairs")
    parser.add_argument("--job-nice", type=int, default=None, help="--service: batch_jobs.process_nice")
    args = parser.parse_args()
    if args.service:
        settings = ServiceJobSettings(
            args.config, rows=args.rows, rate=args.online_rate, phase_s=args.phase_s, rounds=args.rounds,
            process_nice=args.job_nice,
        )  # fmt: skip
        print(json.dumps(asyncio.run(run_service_jobs(settings)), indent=2))
        return
    if args.interference:
        print(json.dumps(interference(args), indent=2))
        return
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
            direct_unary = asyncio.run(direct_rate(url, args.rows, 128, args.concurrency))
            direct_streamed = asyncio.run(direct_streamed_rate(url, args.rows, 128, args.concurrency))
            summary = job(args, url, input_path, pathlib.Path(tmp) / "out")
    finally:
        if launcher is not None:
            launcher.stop()
    this_run = summary["this_run"]
    assert isinstance(this_run, dict)
    job_rate = float(this_run["rows_per_s"])
    direct = max(direct_unary, direct_streamed)  # the best rate Triton reaches directly
    result = {
        "topology": f"bundled Triton (CPU, python backend) on this machine; {args.concurrency} requests in flight",
        "rows": args.rows,
        "direct_rows_per_s": round(direct, 1),
        "direct_unary_rows_per_s": round(direct_unary, 1),
        "direct_streamed_rows_per_s": round(direct_streamed, 1),
        "job_rows_per_s": job_rate,
        "job_vs_direct": round(job_rate / direct, 3),
        "job_wall_s": summary["wall_s"],
        "job_peak_rss_mib": summary["peak_rss_mib"],
        "job_peak_tree_rss_mib": summary["peak_tree_rss_mib"],
        "job_peak_tree_pss_mib": summary["peak_tree_pss_mib"],
        "job_summary": summary,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
