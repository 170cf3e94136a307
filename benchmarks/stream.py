"""Stream inference: one worker's sustained events/s, its end-to-end latency at half that rate,
and its recovery after a burst at three times it (inferline.bench.stream holds the logic).

Starts the bundled Triton (or uses ``--triton-url``) and one ``inferline stream run`` worker on
streams of its own on the given server (Redis at 127.0.0.1:6379 or NATS JetStream at
127.0.0.1:4222), which it deletes afterwards; events are demo drivers (Feast demo store).
Prints one JSON object.

    .venv/bin/python benchmarks/stream.py --engine redis
    .venv/bin/python benchmarks/stream.py --engine nats --backlog 10000
    # the same against an older worker (e.g. before a change), in the same sitting:
    git archive <commit> services/inferline | tar -x -C /tmp/old
    .venv/bin/python benchmarks/stream.py --worker-src /tmp/old/services
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib

from inferline.bench.stream import StreamBenchConfig, run_stream_bench
from inferline.core.config import load_config
from inferline.route_check import route_models
from inferline.triton.launcher import TritonLauncher

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVERS = {"redis": "redis://127.0.0.1:6379", "nats": "nats://127.0.0.1:4222"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=sorted(SERVERS), default="redis")
    parser.add_argument("--server-url", default=None, help="the engine's server (default: its local one)")
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    parser.add_argument("--triton-url", default=None, help="a running Triton (default: start the bundled one)")
    parser.add_argument("--backlog", type=int, default=20_000, help="events drained for the sustained rate")
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--burst-s", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=None, help="base rate (default: the sustained one measured)")
    parser.add_argument("--worker-src", type=pathlib.Path, default=None, help="run the worker from this source tree")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra option of the worker (repeatable)")
    args = parser.parse_args()

    def run(url: str) -> dict[str, object]:
        cfg = StreamBenchConfig(
            engine=args.engine, server_url=args.server_url or SERVERS[args.engine], config=args.config,
            triton_url=url, backlog=args.backlog, steady_s=args.steady_s, burst_s=args.burst_s, rate=args.rate,
            worker_src=args.worker_src, worker_args=args.worker_arg,
        )  # fmt: skip
        return asyncio.run(run_stream_bench(cfg))

    if args.triton_url is not None:
        result = run(args.triton_url)
    else:
        config = load_config(args.config)
        with TritonLauncher(config.triton, models=route_models(config)) as launcher:
            result = run(launcher.grpc_url)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
