"""``make demo``: start the embedded stack, send real traffic, print what it saw, shut down.

Starts ``inferline up`` (the Envoy gateway on the public port, bundled Triton, every
service in one router process and, with ``gateway.protected_lane``, a second one for the
critical class, Feast SQLite) on free ports, sends a few hundred Predict calls
over gRPC across the three traffic classes (each with its ``x-inferline-traffic-class``
header, which the gateway sheds by), prints served_by counts and p50/p99 per layer, then a
burst far over capacity per class: answered in time and by whom, shed and how fast. Then
it stops the stack with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from inferline.core.config import InferlineConfig, load_config
from inferline.core.headers import TRAFFIC_CLASS
from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_port
from inferline.gateway.render import GATEWAY_SHED_PREFIX
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc

DEMO_KEY = "inferline-demo-key"
LAYERS = ("routing_ms", "features_ms", "model_ms", "post_ms", "total_ms")


async def _traffic(
    address: str, n: int, deadline_s: float, concurrency: int
) -> tuple[list[pb.PredictResponse], Counter[str]]:
    rng = np.random.default_rng(0)
    classes = ("critical", "standard", "batch")
    responses: list[pb.PredictResponse] = []
    errors: Counter[str] = Counter()
    metadata = (("authorization", f"Bearer {DEMO_KEY}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await channel.channel_ready()  # connection set-up is not part of any request's deadline
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            ids = rng.integers(1001, 2001, size=int(rng.integers(1, 6))).tolist()
            if i % 50 == 0:
                ids.append(99_999)  # an unknown driver: its features fall back to defaults
            request = pb.PredictRequest(
                route="driver_ranking",
                entities=[pb.EntityKey(name="driver_id", int64_value=d) for d in ids],
                traffic_class=classes[i % 3],
                request_features={"trip_distance_km": float(rng.gamma(2.0, 3.0))},
            )
            async with sem:
                try:
                    call_metadata = (*metadata, (TRAFFIC_CLASS, classes[i % 3]))
                    responses.append(await stub.Predict(request, timeout=deadline_s, metadata=call_metadata))
                except grpc.aio.AioRpcError as err:
                    errors[_error_name(err)] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return responses, errors


BURST_CALLERS = 30
"""Connections the burst is sent over. Envoy takes all the streams one read of a connection
brings and writes their answers after it has been through them, so 300 calls on one
connection timed Envoy's pass over the whole burst (every shed after 29-70 ms here, however
fast each one), not a shed: from 30 callers of 10 calls each the sheds took 1.0-4.5 ms (p50)
and 3.3-27 ms at most over six runs on the same machine (2 shared cores)."""


@dataclass
class ClassOutcomes:
    """What one traffic class of the burst got: answers by whom, sheds and how fast, other errors."""

    answered: Counter[str] = field(default_factory=Counter)
    shed_ms: list[float] = field(default_factory=list)
    shed_by_gateway: int = 0
    """Of the sheds, those the gateway (Envoy) made before any Python ran."""
    errors: Counter[str] = field(default_factory=Counter)


def _burst(address: str, n: int, deadline_s: float) -> dict[str, ClassOutcomes]:
    """``n`` requests sent at once, a third of each class, each with its class header (the gateway sheds by it).

    Sent as futures of gRPC's blocking API: each answer is timed in gRPC's own completion
    callback, so how fast a shed came back is not hidden behind this process's own work of
    sending the rest of the burst (an asyncio client would see every answer only after it
    had sent all ``n``). Sent by ``BURST_CALLERS`` callers, a connection each, as a burst
    from many clients arrives.
    """
    classes = ("critical", "standard", "batch")
    outcomes = {c: ClassOutcomes() for c in classes}
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def record(traffic_class: str, started: float, future: grpc.Future[pb.PredictResponse]) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        got = outcomes[traffic_class]
        error = future.exception()
        code = error.code() if isinstance(error, grpc.RpcError) else None
        with lock:
            if error is None:
                got.answered[_served(future.result())] += 1
            elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                got.shed_ms.append(elapsed_ms)
                got.shed_by_gateway += GATEWAY_SHED_PREFIX in (error.details() or "")  # type: ignore[attr-defined]
            else:
                got.errors[code.name if code is not None else type(error).__name__] += 1
        done.release()

    with contextlib.ExitStack() as stack:
        # A channel of its own each: a local subchannel pool, else they would share one connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [stack.enter_context(grpc.insecure_channel(address, options=options)) for _ in range(BURST_CALLERS)]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        stubs = [pb_grpc.InferenceStub(channel) for channel in channels]
        requests = []
        for i in range(n):
            traffic_class = classes[i % 3]
            request = pb.PredictRequest(
                route="driver_ranking",
                entities=[pb.EntityKey(name="driver_id", int64_value=1001 + i % 1000)],
                traffic_class=traffic_class,
            )
            requests.append(
                (traffic_class, request, (("authorization", f"Bearer {DEMO_KEY}"), (TRAFFIC_CLASS, traffic_class)))
            )
        for i, (traffic_class, request, metadata) in enumerate(requests):
            started = time.perf_counter()
            future = stubs[i % len(stubs)].Predict.future(request, timeout=deadline_s, metadata=metadata)
            future.add_done_callback(functools.partial(record, traffic_class, started))
        for _ in range(n):
            done.acquire()
    return outcomes


def _report_burst(console: Console, outcomes: dict[str, ClassOutcomes], deadline_s: float) -> None:
    console.print(f"burst: per traffic class (deadline {deadline_s * 1000:.0f} ms)")
    table = Table()
    table.add_column("class")
    table.add_column("answered in time, by whom")
    table.add_column("shed (by the gateway)", justify="right")
    table.add_column("shed p50 / max ms", justify="right")
    table.add_column("other errors")
    for traffic_class, got in outcomes.items():
        answered = sum(got.answered.values())
        by_whom = ", ".join(f"{name} {count}" for name, count in got.answered.most_common())
        shed = f"{np.percentile(got.shed_ms, 50):.1f} / {max(got.shed_ms):.1f}" if got.shed_ms else "-"
        errors = ", ".join(f"{name} {count}" for name, count in got.errors.most_common()) or "-"
        sheds = f"{len(got.shed_ms)} ({got.shed_by_gateway})"
        table.add_row(traffic_class, f"{answered}: {by_whom}" if answered else "0", sheds, shed, errors)
    console.print(table)


def _error_name(err: grpc.aio.AioRpcError) -> str:
    """The status, and for a shed who shed it: the gateway (Envoy) or the router."""
    if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return err.code().name
    return "RESOURCE_EXHAUSTED (" + ("gateway" if GATEWAY_SHED_PREFIX in (err.details() or "") else "router") + ")"


def _served(response: pb.PredictResponse) -> str:
    served = pb.ServedBy.Name(response.served_by).removeprefix("SERVED_BY_")
    reason = pb.DegradationReason.Name(response.degradation_reason).removeprefix("DEGRADATION_REASON_")
    return served if reason == "UNSPECIFIED" else f"{served} ({reason})"


def _report(console: Console, title: str, responses: list[pb.PredictResponse], errors: Counter[str]) -> None:
    served = Counter(_served(r) for r in responses)
    console.print(f"{title}: {len(responses)} answers, {sum(errors.values())} errors")
    table = Table()
    table.add_column("served_by (reason)")
    table.add_column("count", justify="right")
    for name, count in served.most_common():
        table.add_row(name, str(count))
    for code, count in errors.most_common():
        table.add_row(f"error {code}", str(count))
    console.print(table)
    console.print("per-layer latency (ms), as reported in each response:")
    layers = Table()
    for col in ("layer", "p50", "p99", "max"):
        layers.add_column(col, justify="right")
    for layer in LAYERS:
        values = np.array([getattr(r.timings, layer) for r in responses])
        if len(values):
            p50, p99 = np.percentile(values, [50, 99])
            layers.add_row(layer.removesuffix("_ms"), f"{p50:.2f}", f"{p99:.2f}", f"{values.max():.2f}")
    console.print(layers)
    if responses:
        last = responses[-1]
        best = last.predictions[0]
        source = (
            f"model {last.model_name} v{last.model_version}"
            if last.model_version
            else f"served by {pb.ServedBy.Name(last.served_by).removeprefix('SERVED_BY_')}"
            + (f" {last.model_name}" if last.model_name else "")
        )
        console.print(f"example: driver {best.entity.int64_value} score {best.score:.3f} → {best.decision} ({source})")


def _topology(config: InferlineConfig) -> str:
    """What ``inferline up`` starts for ``config``, in words (``runtime.serve_process`` decides)."""
    lane = config.gateway.starts_protected_lane
    routers = "the router and its protected lane for critical calls" if lane else "the router"
    return f"Envoy in front of {routers}, bundled Triton"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="deploy/local/inferline.yaml")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--burst", type=int, default=300, help="requests sent at once in the admission phase")
    args = parser.parse_args()
    console = Console()
    port = free_port()
    log = pathlib.Path(tempfile.mkdtemp(prefix="inferline-demo-")) / "up.log"
    command = [
        sys.executable,
        "-m",
        "inferline.cli",
        "up",
        "--config",
        args.config,
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    topology = _topology(load_config(args.config))
    console.print(f"starting the embedded stack on 127.0.0.1:{port}: {topology} (log: {log})")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "INFERLINE_TRITON__GRPC_PORT": "0"}
        )
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_s=180, is_alive=lambda: proc.poll() is None)
        console.print(f"ready; sending {args.requests} Predict requests")
        responses, errors = asyncio.run(_traffic(f"127.0.0.1:{port}", args.requests, 0.25, 8))
        _report(console, "deadline 250 ms", responses, errors)
        # A deadline the main path often cannot meet (features + Triton take ~5-10 ms here) but the
        # fallback can: answered before the deadline from the cache / light model / baseline.
        console.print("now 100 requests, one at a time, with a 10 ms deadline: too short for the main path")
        tight, tight_errors = asyncio.run(_traffic(f"127.0.0.1:{port}", 100, 0.010, 1))
        _report(console, "deadline 10 ms", tight, tight_errors)
        # Admission control: far more requests at once than the route's concurrency limit. The
        # lowest classes are shed first (RESOURCE_EXHAUSTED with a retry hint); critical is never
        # shed: over the limit it gets a degraded answer (OVERLOAD) instead.
        console.print(
            f"now a burst of {args.burst} requests at once from {BURST_CALLERS} callers, a third of each class, "
            "deadline 250 ms"
        )
        _report_burst(console, _burst(f"127.0.0.1:{port}", args.burst, 0.25), 0.25)
        failed = {name: n for name, n in errors.items() if not name.startswith("RESOURCE_EXHAUSTED")}
        if errors.keys() - failed.keys():
            console.print("[yellow]some calls were shed at light load: is the machine busy?[/yellow]")
        return 0 if responses and not failed else 1
    except TimeoutError as err:
        console.print(f"[red]{err}[/red]\n" + log.read_text()[-3000:])
        return 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        console.print(f"stopped (exit code {proc.returncode})")


if __name__ == "__main__":
    sys.exit(main())
