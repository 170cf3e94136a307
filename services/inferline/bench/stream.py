"""The stream benchmark: what one ``inferline stream run`` worker sustains, its latency at half
that, and how long it takes to catch up after a burst.

One worker process, one run, three phases on the same streams:

1. **sustained**: ``backlog`` events are appended before the worker starts; the rate at which
   it drains them (between the 10th and 90th percentile of the output times, leaving out its
   start-up and the stragglers) is its sustained events/s;
2. **steady**: events at ``steady_share`` (50 %) of that rate for ``steady_s``; end-to-end
   latency (event appended → result appended) p50/p99 from the entries' own timestamps;
3. **burst**: ``burst_factor`` (3×) that rate for ``burst_s`` (10 s), then the steady rate
   again until the burst's events are all answered; recovery = last output of a burst
   event − the burst's last event.

The worker runs with a budget and a lag threshold no phase reaches (``WORKER_ARGS``), so
every event is scored by the primary model: the figures are the primary path's, not the
degradation ladder's. ``worker_src`` runs the worker from another source tree (an older
commit exported with ``git archive``) to compare versions on the same machine in one sitting.
"""

from __future__ import annotations

import asyncio
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferline.bench.stream_engines import BenchStreams, open_bench_streams
from inferline.bench.stream_stats import (
    StreamOutput,
    drain_rate,
    latency,
    offered_rate,
    recovery_s,
    served_by_shares,
)
from inferline.demo.driver_data import driver_ids

ROUTE = "driver_ranking"
GROUP = "bench"
TICK_S = 0.01
"""The producer appends what is due every tick, in one pipeline (Redis) or batch of publishes (NATS)."""
WORKER_ARGS = ("--budget-ms", "600000", "--lag-high", "1000000000", "--lag-low", "1000")
"""No deadline and no light mode in any phase: a backlog's events are old, and lag is the point."""


@dataclass(frozen=True)
class StreamBenchConfig:
    engine: str
    server_url: str
    config: pathlib.Path
    triton_url: str
    backlog: int = 20_000
    steady_share: float = 0.5
    steady_s: float = 20.0
    burst_factor: float = 3.0
    burst_s: float = 10.0
    rate: float | None = None
    """Base rate for the steady and burst phases; None: the sustained rate measured in phase 1."""
    worker_src: pathlib.Path | None = None
    worker_args: Sequence[str] = ()
    timeout_s: float = 300.0
    """Longest wait for a phase's outputs (a stuck worker fails the run instead of hanging it)."""
    seed: int = 1
    prefix: str = field(default_factory=lambda: f"streambench:{uuid.uuid4().hex[:8]}")


class EventMaker:
    """Events of demo drivers drawn uniformly (online features from the demo store), with a trip distance."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._ids = driver_ids()

    def __call__(self, n: int) -> list[dict[str, str]]:
        ids = self._rng.choice(self._ids, n)
        km = self._rng.gamma(2.0, 3.0, n)
        return [{"driver_id": str(i), "trip_distance_km": f"{d:.2f}"} for i, d in zip(ids, km, strict=True)]


class WorkerProcess:
    """``inferline stream run`` as a child process; SIGTERM finishes its in-flight events."""

    def __init__(self, cfg: StreamBenchConfig, streams: BenchStreams, log: pathlib.Path) -> None:
        command = [
            sys.executable, "-m", "inferline.cli", "stream", "run", "--config", str(cfg.config), "--route", ROUTE,
            "--source", streams.source_url, "--group", GROUP, "--sink", streams.sink_url,
            "--triton-url", cfg.triton_url, "--consumer", "bench-worker", *WORKER_ARGS, *cfg.worker_args,
        ]  # fmt: skip
        env = dict(os.environ)
        if cfg.worker_src is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cfg.worker_src), env.get("PYTHONPATH")]))
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the stream worker exited ({self.process.returncode}):\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def produce(
    streams: BenchStreams, make: Callable[[int], list[dict[str, str]]], rate: float, duration_s: float
) -> list[str]:
    """Append events at ``rate`` for ``duration_s`` (what is due every ``TICK_S``); their ids."""
    total = int(rate * duration_s)
    ids: list[str] = []
    started = time.monotonic()
    while len(ids) < total:
        due = min(total, int(rate * (time.monotonic() - started))) - len(ids)
        if due > 0:
            ids += await streams.append(make(min(due, 5000)))
        await asyncio.sleep(TICK_S)
    return ids


async def collect(
    streams: BenchStreams, worker: WorkerProcess, expected: int, timeout_s: float, seen: list[StreamOutput]
) -> None:
    """Wait until ``expected`` outputs exist in all, then append the new ones to ``seen``."""
    deadline = time.monotonic() + timeout_s
    while await streams.output_count() < expected:
        worker.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{await streams.output_count()} of {expected} outputs after {timeout_s} s")
        await asyncio.sleep(0.1)
    while len(seen) < expected:
        seen += await streams.read_new()
        if time.monotonic() > deadline:
            raise RuntimeError(f"read back {len(seen)} of {expected} outputs after {timeout_s} s")


def _of(outputs: Sequence[StreamOutput], ids: Sequence[str]) -> list[StreamOutput]:
    wanted = set(ids)
    return [o for o in outputs if o.event_id in wanted]


def _r(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _latency(outputs: Sequence[StreamOutput]) -> dict[str, Any]:
    s = latency(outputs)
    return {"count": s.count, "p50_ms": s.p50_ms, "p95_ms": s.p95_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms}


async def run_stream_bench(cfg: StreamBenchConfig) -> dict[str, Any]:
    """The three phases against one fresh worker; a JSON-ready result."""
    streams = open_bench_streams(cfg.engine, cfg.server_url, cfg.prefix)
    make = EventMaker(cfg.seed)
    await streams.start()
    seen: list[StreamOutput] = []
    with tempfile.TemporaryDirectory(prefix="inferline-stream-bench-") as tmp:
        worker = None
        try:
            backlog: list[str] = []
            while len(backlog) < cfg.backlog:
                backlog += await streams.append(make(min(2000, cfg.backlog - len(backlog))))
            worker = WorkerProcess(cfg, streams, pathlib.Path(tmp) / "worker.log")
            await collect(streams, worker, len(backlog), cfg.timeout_s, seen)
            sustained = _of(seen, backlog)
            measured = drain_rate(sustained)
            base = cfg.rate if cfg.rate is not None else measured

            steady_rate = base * cfg.steady_share
            steady = await produce(streams, make, steady_rate, cfg.steady_s)
            await collect(streams, worker, len(backlog) + len(steady), cfg.timeout_s, seen)

            burst_rate = base * cfg.burst_factor
            burst = await produce(streams, make, burst_rate, cfg.burst_s)
            after: list[str] = []
            expected = len(backlog) + len(steady) + len(burst)
            while await streams.output_count() < expected:  # the steady rate again while the backlog drains
                worker.check()
                after += await produce(streams, make, steady_rate, 1.0)
                if len(after) > steady_rate * cfg.timeout_s:
                    raise RuntimeError("the burst's backlog did not drain within the timeout")
            await collect(streams, worker, expected + len(after), cfg.timeout_s, seen)
        finally:
            if worker is not None:
                worker.stop()
            await streams.close()
    steady_out, burst_out = _of(seen, steady), _of(seen, burst)
    return {
        "engine": cfg.engine,
        "worker_src": str(cfg.worker_src) if cfg.worker_src else "installed",
        "worker_args": [*WORKER_ARGS, *cfg.worker_args],
        "sustained": {
            "events": len(sustained),
            "events_per_s": _r(measured),
            "served_by": served_by_shares(sustained),
        },
        "steady": {
            "target_events_per_s": _r(steady_rate),
            "offered_events_per_s": _r(offered_rate(steady_out)),
            "seconds": cfg.steady_s,
            "latency": _latency(steady_out),
            "served_by": served_by_shares(steady_out),
        },
        "burst": {
            "target_events_per_s": _r(burst_rate),
            "offered_events_per_s": _r(offered_rate(burst_out)),
            "seconds": cfg.burst_s,
            "events": len(burst_out),
            "recovery_s": _r(recovery_s(burst_out), 2),
            "latency": _latency(burst_out),
            "served_by": served_by_shares(burst_out),
        },
    }
