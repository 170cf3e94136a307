"""Open-loop load from several generator processes, each on its own event loop and channel.

One asyncio generator shares a core with its gRPC client: past a few thousand requests per
second it cannot keep its schedule. ``Generators`` is a pool of processes (multiprocessing,
spawn), reused across runs. A run splits the rate evenly over them; each runs
``loadgen.run_open_loop`` on its share with its own seed (a sum of independent Poisson
streams is a Poisson stream of the summed rate) and a recording call of
``inferline.bench.recording``, and sends back its ``LoadResult`` with every request's
class and ``served_by``. All start at one instant: ``time.perf_counter`` is
CLOCK_MONOTONIC, shared by the processes of one Linux machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pathlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

import grpc
import uvloop

from inferline.bench.loadgen import LoadResult, poisson_schedule, run_open_loop
from inferline.bench.mix import TrafficMix
from inferline.bench.recording import CHANNEL_OPTIONS, TargetSpec, recording_call
from inferline.gateway.render import GATEWAY_SHED_PREFIX

MAX_START_LAG_S = 0.005
"""A generator whose p99 start lag exceeds this fell behind its schedule."""
START_DELAY_S = 0.5
"""Time given to the generators to build their requests and connect before the common start."""
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GenJob:
    """One generator's share of a run."""

    target: TargetSpec
    mix: TrafficMix
    rate: float
    warmup_s: float
    duration_s: float
    deadline_s: float
    seed: int
    start_at: float
    """``time.perf_counter()`` instant to start at (CLOCK_MONOTONIC: the same in every process)."""
    max_start_lag_s: float = MAX_START_LAG_S


@dataclass
class GenResult:
    """What one generator saw; ``classes`` and ``served_by`` are indexed by request number."""

    result: LoadResult
    classes: list[int]
    """Index into the mix's classes of every request (warm-up included)."""
    served_by: list[int]
    """``ServedBy`` value of every OK ``Predict`` answer (0 for the others and other kinds)."""
    error_details: dict[str, int]
    """Failed calls of the measured window by ``CODE: details`` (numbers in the details replaced by #)."""
    late_start_ms: float
    """How late the generator started against the common start instant."""
    warmup_s: float = 0.0
    """Start of the measured window, seconds from the run's start (the records' ``scheduled_s`` count from there)."""
    gateway_shed: frozenset[int] = frozenset()
    """Request numbers of the calls a gateway (Envoy) shed, told apart from the router's sheds by their message."""


async def generate(job: GenJob) -> GenResult:
    """Run one generator's open-loop share (in a generator process)."""
    n = len(poisson_schedule(job.rate, job.warmup_s + job.duration_s, job.seed))  # run_open_loop's own schedule
    classes = job.mix.draw(n, job.seed)
    # A subchannel pool per channel: channels to one address otherwise share one connection.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(job.target.url, options=options))
            for _ in range(job.target.connections)
        ]
        call, log = recording_call(
            job.target, channels, job.mix.classes, classes, deadline_s=job.deadline_s, seed=job.seed
        )
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(f"{job.target.name}: no connection to {job.target.url}") from None
        wait = job.start_at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        late = time.perf_counter() - job.start_at
        result = await run_open_loop(
            call,
            rate=job.rate,
            duration_s=job.duration_s,
            deadline_s=job.deadline_s,
            warmup_s=job.warmup_s,
            seed=job.seed,
            max_start_lag_s=job.max_start_lag_s,
            # Past every call's own gRPC deadline: the drain never cancels a call (to Triton) in flight.
            drain_timeout_s=job.target.call_timeout_s(job.deadline_s) + 5.0,
            keep_records=True,
        )
    details = log.details_of(r.index for r in result.records)  # the measured window's only
    gateway_shed = frozenset(i for i, detail in log.error_details.items() if GATEWAY_SHED_PREFIX in detail)
    return GenResult(result, classes, log.served_by, details, round(late * 1000.0, 3), job.warmup_s, gateway_shed)


def generator_main(conn: Connection, cpus: frozenset[int] | None = None, nice: int | None = None) -> None:
    """Body of a generator process: run each job received on ``conn``, send back its result.

    ``cpus``: the only CPUs this process may run on (``os.sched_setaffinity``), so that a
    benchmark can keep its load off the cores of the server it measures. ``nice``: this
    process's niceness, set before any thread starts (threads inherit it): a negative one
    schedules the generators ahead of the servers on shared cores, so that they send on time
    and read answers when they come, as a client on a machine of its own would, while still
    paying their CPU on the cores the servers use.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on
    in most distributions and on the development VM) niceness orders only the processes of
    one session: sessions share the CPU as equals, and ``inferline up`` (started by the
    benchmarks in a session of its own) is one. So with ``nice`` the generator takes a session
    of its own and gives its autogroup the niceness too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if cpus:
        os.sched_setaffinity(0, cpus)
    if nice is not None:
        os.setsid()
        with contextlib.suppress(OSError):  # no autogroups: the process's niceness alone orders it
            pathlib.Path("/proc/self/autogroup").write_text(f"{nice}\n")
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            out: GenResult | str = uvloop.run(generate(job))
        except Exception as exc:  # reported by the parent
            out = f"generator failed: {exc!r}"
        conn.send(out)


def _recv(conn: Connection, timeout_s: float) -> GenResult | str:
    if not conn.poll(timeout_s):
        return f"generator gave no result within {timeout_s:g} s"
    try:
        out: GenResult | str = conn.recv()
    except EOFError:
        return "generator process exited"
    return out


class Generators:
    """A pool of generator processes, reused across runs; use as a context manager or start/close."""

    def __init__(
        self, count: int, name: str = "bench-gen", cpus: frozenset[int] | None = None, nice: int | None = None
    ) -> None:
        """``count`` processes, pinned to ``cpus`` when given (None: wherever the OS puts them),
        at niceness ``nice`` when given (``generator_main``)."""
        if count < 1:
            raise ValueError("need at least one generator")
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for k in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=generator_main, args=(child, cpus, nice), name=f"{name}-{k}", daemon=True)
            self.conns.append(parent)
            self.procs.append(proc)
        self.executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="gen-recv")

    def __len__(self) -> int:
        return len(self.conns)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    async def run(
        self,
        target: TargetSpec,
        mix: TrafficMix,
        rate: float,
        *,
        warmup_s: float,
        duration_s: float,
        deadline_s: float,
        seed: int,
        max_start_lag_s: float = MAX_START_LAG_S,
    ) -> list[GenResult]:
        """Split ``rate`` evenly over the generators, start them together, wait for their results.

        Raises:
            RuntimeError: a generator failed (e.g. no connection) or gave no result in time.
        """
        n = len(self.conns)
        start_at = time.perf_counter() + START_DELAY_S
        for k, conn in enumerate(self.conns):
            job = GenJob(
                target, mix, rate / n, warmup_s, duration_s, deadline_s, seed * 101 + k, start_at, max_start_lag_s
            )
            conn.send(job)
        limit_s = START_DELAY_S + warmup_s + duration_s + target.call_timeout_s(deadline_s) + 30.0
        loop = asyncio.get_running_loop()
        outs = await asyncio.gather(*(loop.run_in_executor(self.executor, _recv, c, limit_s) for c in self.conns))
        failed = [o for o in outs if isinstance(o, str)]
        if failed:
            raise RuntimeError("; ".join(failed))
        return [o for o in outs if isinstance(o, GenResult)]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Generators:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
