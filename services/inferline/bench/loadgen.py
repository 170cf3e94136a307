"""Open-loop Poisson load generator, sequential latency probe and knee sweep.

Open loop: arrival times are drawn up front from a seeded exponential inter-arrival
sequence and laid on an absolute timeline; each request is launched as its own task at
its scheduled time whether or not earlier ones have answered, so a slow server meets
the offered rate instead of slowing the generator down (no coordinated omission).

A target is any ``async call(i) -> None`` that raises on failure (``grpc.aio.AioRpcError``
is recorded by its status code name, anything else by its exception type name). The
generator shares the machine with the servers it drives, so the hot path is kept thin:
one task per request, preallocated result slots, no per-request objects beyond the task.

Timing: ``time.perf_counter`` throughout. *Latency* runs from the moment the request's
task starts running to its answer; how late that start was against the schedule is the
*start lag*; their sum, the *response time*, runs from the scheduled arrival. Deadline
misses, goodput and the knee criteria use the response time, so a generator that lags
(on a shared machine, usually because the CPUs are saturated) can only make the target
look worse, never better. When the generator could not keep its schedule (p99 start lag
above ``max_start_lag_s``, 5 ms by default) the result says ``fell_behind=True``: the
step measured the machine's saturation as much as the target. The event loop's timers
have ~1 ms resolution, so requests due within ``_LAUNCH_EARLY_S`` are launched a little
early: start lag can be slightly negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

CallFn = Callable[[int], Awaitable[None]]
"""A load target: performs request number ``i``; raises on failure."""

OK = "OK"
"""Outcome of a request that returned normally."""
UNFINISHED = "UNFINISHED"
"""Outcome of a request still unanswered when the run's drain timeout ran out."""

_LAUNCH_EARLY_S = 0.0005
"""Requests due within this much are launched now rather than after another timer tick."""
_MIN_SLEEP_S = 0.001
"""Shortest sleep; shorter ones would spin the loop (uvloop timers have ms resolution)."""


def poisson_schedule(rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process of ``rate`` per second.

    Inter-arrival gaps are exponential with mean ``1 / rate``, from ``random.Random(seed)``,
    so the same seed gives the same schedule. Offsets are strictly below ``duration_s``.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if duration_s <= 0:
        return []
    rng = random.Random(seed)
    gap = rng.expovariate
    offsets: list[float] = []
    t = gap(rate)
    while t < duration_s:
        offsets.append(t)
        t += gap(rate)
    return offsets


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * n))
    return sorted_values[min(rank, n) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3) if not math.isnan(seconds) else math.nan


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency percentiles in milliseconds over ``count`` answered requests."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_s: Iterable[float]) -> LatencySummary:
        values = sorted(latencies_s)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(values),
            p50_ms=_ms(percentile(values, 50)),
            p95_ms=_ms(percentile(values, 95)),
            p99_ms=_ms(percentile(values, 99)),
            max_ms=_ms(values[-1]),
            mean_ms=_ms(math.fsum(values) / len(values)),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request of an open-loop run."""

    index: int
    scheduled_s: float
    """Scheduled launch time, seconds from the start of the run (warm-up included)."""
    start_lag_s: float
    """How late the request's task started against its schedule (may be slightly negative)."""
    latency_s: float
    """Start of the call to its answer (or error)."""
    outcome: str
    """``OK``, a gRPC status code name (``UNAVAILABLE``, ...), an exception type name, or ``UNFINISHED``."""


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one open-loop run; counts and rates cover the measured window only."""

    rate: float
    """Nominal arrival rate asked for (requests per second)."""
    duration_s: float
    """Length of the measured window (after warm-up)."""
    deadline_s: float
    offered_rate: float
    """Arrivals actually scheduled in the window per second (the Poisson draw)."""
    achieved_rate: float
    """OK answers per second, over the window stretched to the last answer."""
    goodput: float
    """OK answers within the deadline (response time) per second of the window."""
    sent: int
    ok: int
    ok_within_deadline: int
    missed_deadline: int
    """OK answers whose response time exceeded the deadline (not goodput)."""
    latency: LatencySummary
    """Latency (start of the call to answer) of OK answers, within the deadline or not."""
    response_time: LatencySummary
    """Response time (scheduled arrival to answer: start lag + latency) of OK answers."""
    errors: dict[str, int]
    """Failed requests by outcome (gRPC status code name, exception type, ``UNFINISHED``)."""
    start_lag_p50_ms: float
    start_lag_p99_ms: float
    start_lag_max_ms: float
    fell_behind: bool
    """The generator missed its own schedule (p99 start lag above the limit)."""
    generator_cpu: float
    """CPU time of the generator's process over the run's wall time (1.0 = one core busy)."""
    records: list[RequestRecord] = field(default_factory=list, repr=False, compare=False)

    @property
    def goodput_fraction(self) -> float:
        """Goodput over offered rate (1.0 means every arrival was answered OK in time)."""
        return self.goodput / self.offered_rate if self.offered_rate > 0 else math.nan

    def to_dict(self, include_records: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        out["goodput_fraction"] = round(self.goodput_fraction, 4)
        if include_records:
            out["records"] = [asdict(r) for r in self.records]
        return out


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return type(exc).__name__


FULL_COLLECTIONS_OFF = 1 << 30
"""The collector's third threshold while a run sends: never reached, so no full collection."""


@contextlib.contextmanager
def no_full_collections() -> Iterator[None]:
    """While the block runs, the collector never walks the whole heap.

    An open-loop run keeps every request's task, and the heap grows with them: measured in a
    generator at 2,861 requests a second, full collections stopped it for 35–63 ms, several
    times a run. Every call it had in flight then had its answer read late, and every arrival
    due was sent late, so a pause of the load generator's own showed up as the server's
    latency (and, with less of the deadline left, as its misses). What exists before the run
    is frozen out of the collector's sight (``gc.freeze``), and the oldest generation is not
    collected until the block ends; the young ones still are, and so are cycles that die young.
    """
    frozen_before = gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTIONS_OFF)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)
        if not frozen_before:  # a process that froze its own objects keeps them frozen
            gc.unfreeze()


async def run_open_loop(
    call: CallFn,
    *,
    rate: float,
    duration_s: float,
    deadline_s: float,
    warmup_s: float = 0.0,
    seed: int = 0,
    max_start_lag_s: float = 0.005,
    drain_timeout_s: float | None = None,
    keep_records: bool = True,
) -> LoadResult:
    """Drive ``call`` with Poisson arrivals of ``rate`` per second for ``warmup_s + duration_s``.

    Arrivals in the first ``warmup_s`` are sent but left out of every statistic. After the
    last launch the run waits up to ``drain_timeout_s`` (default ``deadline_s + 15``) for
    outstanding requests; any still running then are cancelled and count as ``UNFINISHED``.
    Targets should carry their own gRPC deadline well inside the drain timeout.
    """
    offsets = poisson_schedule(rate, warmup_s + duration_s, seed)
    n = len(offsets)
    lag: list[float] = [math.nan] * n
    latency: list[float] = [math.nan] * n
    outcome: list[str] = [UNFINISHED] * n
    started: list[float] = [math.nan] * n
    perf = time.perf_counter

    async def one(i: int, due: float) -> None:
        start = perf()
        started[i] = start
        lag[i] = start - due
        try:
            await call(i)
        except asyncio.CancelledError:
            latency[i] = perf() - start
            raise
        except Exception as exc:  # the outcome is the measurement
            latency[i] = perf() - start
            outcome[i] = _outcome_of(exc)
        else:
            latency[i] = perf() - start
            outcome[i] = OK

    with no_full_collections():
        cpu0, wall0 = time.process_time(), perf()
        loop = asyncio.get_running_loop()
        create_task = loop.create_task
        sleep = asyncio.sleep
        tasks: list[asyncio.Task[None]] = []
        append = tasks.append
        t0 = perf() + 0.002
        i = 0
        while i < n:
            now = perf()
            due = t0 + offsets[i]
            wait = due - now
            if wait > _LAUNCH_EARLY_S:
                await sleep(max(wait - _LAUNCH_EARLY_S, _MIN_SLEEP_S))
                continue
            horizon = now + _LAUNCH_EARLY_S
            while i < n and t0 + offsets[i] <= horizon:
                append(create_task(one(i, t0 + offsets[i])))
                i += 1

        if tasks:
            drain = deadline_s + 15.0 if drain_timeout_s is None else drain_timeout_s
            _, pending = await asyncio.wait(tasks, timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            end = perf()
            for j in range(n):
                if outcome[j] == UNFINISHED and not math.isnan(started[j]):
                    latency[j] = end - started[j]
    cpu = (time.process_time() - cpu0) / max(perf() - wall0, 1e-9)

    return _summarize(
        offsets=offsets,
        lag=lag,
        latency=latency,
        outcome=outcome,
        t0=t0,
        started=started,
        rate=rate,
        warmup_s=warmup_s,
        duration_s=duration_s,
        deadline_s=deadline_s,
        max_start_lag_s=max_start_lag_s,
        keep_records=keep_records,
        generator_cpu=cpu,
    )


def _summarize(
    *,
    offsets: list[float],
    lag: list[float],
    latency: list[float],
    outcome: list[str],
    t0: float,
    started: list[float],
    rate: float,
    warmup_s: float,
    duration_s: float,
    deadline_s: float,
    max_start_lag_s: float,
    keep_records: bool,
    generator_cpu: float,
) -> LoadResult:
    measured = [j for j, off in enumerate(offsets) if off >= warmup_s]
    ok_lat: list[float] = []
    ok_resp: list[float] = []
    errors: Counter[str] = Counter()
    within = 0
    last_answer = t0 + warmup_s + duration_s
    for j in measured:
        if outcome[j] == OK:
            lat = latency[j]
            resp = lag[j] + lat
            ok_lat.append(lat)
            ok_resp.append(resp)
            if resp <= deadline_s:
                within += 1
            last_answer = max(last_answer, started[j] + lat)
        else:
            errors[outcome[j]] += 1
    stretched = max(last_answer - (t0 + warmup_s), duration_s)
    records = [RequestRecord(j, offsets[j], lag[j], latency[j], outcome[j]) for j in measured] if keep_records else []
    return LoadResult(
        rate=rate,
        duration_s=duration_s,
        deadline_s=deadline_s,
        achieved_rate=round(len(ok_lat) / stretched, 3) if stretched > 0 else math.nan,
        generator_cpu=round(generator_cpu, 3),
        records=records,
        **_observed(
            ok_lat=ok_lat,
            ok_resp=ok_resp,
            within=within,
            errors=errors,
            lags=[lag[j] for j in measured],
            sent=len(measured),
            duration_s=duration_s,
            max_start_lag_s=max_start_lag_s,
        ),
    )


def _observed(
    *,
    ok_lat: list[float],
    ok_resp: list[float],
    within: int,
    errors: Counter[str],
    lags: list[float],
    sent: int,
    duration_s: float,
    max_start_lag_s: float,
) -> dict[str, Any]:
    """The ``LoadResult`` fields that follow from the measured requests alone (one run, or merged runs)."""
    lags = sorted(x for x in lags if not math.isnan(x))
    lag_p99 = percentile(lags, 99)
    window = duration_s if duration_s > 0 else math.nan
    return {
        "offered_rate": round(sent / window, 3),
        "goodput": round(within / window, 3),
        "sent": sent,
        "ok": len(ok_lat),
        "ok_within_deadline": within,
        "missed_deadline": len(ok_lat) - within,
        "latency": LatencySummary.of(ok_lat),
        "response_time": LatencySummary.of(ok_resp),
        "errors": dict(sorted(errors.items())),
        "start_lag_p50_ms": _ms(percentile(lags, 50)),
        "start_lag_p99_ms": _ms(lag_p99),
        "start_lag_max_ms": _ms(lags[-1]) if lags else math.nan,
        "fell_behind": bool(lags) and lag_p99 > max_start_lag_s,
    }


@dataclass(frozen=True)
class SequentialResult:
    """Unloaded latency: one call at a time, each after the previous answered."""

    latency: LatencySummary
    """Latency of OK calls."""
    errors: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def measure_sequential(
    calls: Mapping[str, CallFn], *, warmup: int = 300, count: int = 2000
) -> dict[str, SequentialResult]:
    """Unloaded latency of each target, calls interleaved round-robin across targets.

    Interleaving spreads background noise (other processes on the machine) evenly over the
    targets instead of letting it land on whichever one was measured at the time.
    """
    names = list(calls)
    lat: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, Counter[str]] = {name: Counter() for name in names}
    perf = time.perf_counter
    gc.collect()
    for i in range(warmup + count):
        for name in names:
            start = perf()
            try:
                await calls[name](i)
            except Exception as exc:
                if i >= warmup:
                    errors[name][_outcome_of(exc)] += 1
                continue
            if i >= warmup:
                lat[name].append(perf() - start)
    return {name: SequentialResult(LatencySummary.of(lat[name]), dict(sorted(errors[name].items()))) for name in names}


def rate_ladder(
    start: float, *, max_rate: float, factor: float | None = None, increment: float | None = None
) -> list[float]:
    """Rates ``start, start*factor, ...`` (or ``start, start+increment, ...``) up to ``max_rate``."""
    if (factor is None) == (increment is None):
        raise ValueError("give exactly one of factor and increment")
    if start <= 0 or max_rate < start:
        raise ValueError("need 0 < start <= max_rate")
    if (factor is not None and factor <= 1.0) or (increment is not None and increment <= 0):
        raise ValueError("the ladder must increase")
    rates: list[float] = []
    r = start
    while r <= max_rate * (1 + 1e-9):
        rates.append(round(r, 1))
        r = r * factor if factor is not None else r + (increment or 0.0)
    return rates


@dataclass(frozen=True)
class SweepStep:
    result: LoadResult
    passed: bool
    reason: str | None
    """Why the step failed (None when it passed)."""

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, **self.result.to_dict()}


@dataclass(frozen=True)
class SweepResult:
    """Steps of a rate sweep and the knee they found."""

    p99_limit_ms: float
    goodput_min_fraction: float
    steps: list[SweepStep]
    knee_rate: float | None
    """Highest nominal rate whose step passed (None if the first step failed)."""
    knee_goodput: float | None
    """Goodput measured at the knee step."""
    stopped_reason: str
    """``first failing step at R/s: ...``, or ``reached max rate`` (the knee is then a lower bound)."""
    knee_is_lower_bound: bool
    """The sweep ran out of rates before a step failed: the real knee is higher."""
    generator_fell_behind_at: list[float]
    """Rates of steps where the generator missed its schedule (the machine was saturated)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "knee_rate": self.knee_rate,
            "knee_goodput": self.knee_goodput,
            "knee_is_lower_bound": self.knee_is_lower_bound,
            "stopped_reason": self.stopped_reason,
            "generator_fell_behind_at": self.generator_fell_behind_at,
            "p99_limit_ms": self.p99_limit_ms,
            "goodput_min_fraction": self.goodput_min_fraction,
            "steps": [s.to_dict() for s in self.steps],
        }


GENERATOR_FELL_BEHIND = "generator fell behind"


def step_verdict(
    result: LoadResult, *, p99_limit_s: float, goodput_min_fraction: float, strict_generator: bool = False
) -> str | None:
    """Why a step fails the knee criteria, or None if it passes.

    Passing: some requests answered OK, p99 response time of OK answers is under
    ``p99_limit_s``, and goodput is at least ``goodput_min_fraction`` of offered. With
    ``strict_generator`` a step where the generator fell behind fails too.
    """
    if strict_generator and result.fell_behind:
        return f"{GENERATOR_FELL_BEHIND} (p99 start lag {result.start_lag_p99_ms:.1f} ms)"
    if result.ok == 0:
        return f"no OK answers (errors {result.errors})"
    p99 = result.response_time.p99_ms
    if not p99 < p99_limit_s * 1000.0:
        return f"p99 {p99:.1f} ms >= {p99_limit_s * 1000.0:.0f} ms"
    if result.goodput < goodput_min_fraction * result.offered_rate:
        return (
            f"goodput {result.goodput:.0f}/s < {goodput_min_fraction:.0%} of offered "
            f"{result.offered_rate:.0f}/s (errors {result.errors}, late {result.missed_deadline})"
        )
    return None


async def sweep(
    call: CallFn,
    *,
    rates: Sequence[float],
    step_s: float,
    warmup_s: float,
    deadline_s: float,
    p99_limit_s: float | None = None,
    goodput_min_fraction: float = 0.95,
    seed: int = 0,
    strict_generator: bool = False,
    after_step: Callable[[LoadResult], Awaitable[str | None]] | None = None,
    on_step: Callable[[SweepStep], None] | None = None,
    keep_records: bool = False,
) -> SweepResult:
    """Run ``rates`` in order, one open-loop step each, until the first failing step.

    ``after_step`` runs after each step (e.g. a liveness check of the server); a non-None
    return fails the step with that reason. ``on_step`` sees each step as it finishes.
    """
    limit = deadline_s if p99_limit_s is None else p99_limit_s
    steps: list[SweepStep] = []
    knee: SweepStep | None = None
    stopped = "reached max rate"
    for k, rate in enumerate(rates):
        result = await run_open_loop(
            call,
            rate=rate,
            duration_s=step_s,
            deadline_s=deadline_s,
            warmup_s=warmup_s,
            seed=seed + k,
            keep_records=keep_records,
        )
        reason = step_verdict(
            result, p99_limit_s=limit, goodput_min_fraction=goodput_min_fraction, strict_generator=strict_generator
        )
        if after_step is not None:
            extra = await after_step(result)
            if extra is not None:
                reason = extra if reason is None else f"{extra}; {reason}"
        step = SweepStep(result, reason is None, reason)
        steps.append(step)
        if on_step is not None:
            on_step(step)
        if reason is not None:
            stopped = f"first failing step at {rate:g}/s: {reason}"
            break
        knee = step
    return SweepResult(
        p99_limit_ms=limit * 1000.0,
        goodput_min_fraction=goodput_min_fraction,
        steps=steps,
        knee_rate=knee.result.rate if knee else None,
        knee_goodput=knee.result.goodput if knee else None,
        stopped_reason=stopped,
        knee_is_lower_bound=knee is not None and len(steps) == len(rates) and steps[-1].passed,
        generator_fell_behind_at=[st.result.rate for st in steps if st.result.fell_behind],
    )


def merge_load_results(results: Sequence[LoadResult], *, max_start_lag_s: float = 0.005) -> LoadResult:
    """One ``LoadResult`` for several generators that drove the same target at the same time.

    Each generator (e.g. one per process, each with its share of the rate and its own seed)
    covered the same measured window; every result must hold its records
    (``keep_records=True``), from which latencies, response times and start lags are
    recomputed. Rates, counts and ``generator_cpu`` (cores busy) are summed. The merged
    records keep each generator's request numbers, so an ``index`` is not unique.
    """
    if not results:
        raise ValueError("nothing to merge")
    if any(r.sent and not r.records for r in results):
        raise ValueError("every result needs its records (run_open_loop(..., keep_records=True))")
    duration = max(r.duration_s for r in results)
    deadline = results[0].deadline_s
    records = [rec for r in results for rec in r.records]
    ok_lat = [rec.latency_s for rec in records if rec.outcome == OK]
    ok_resp = [rec.start_lag_s + rec.latency_s for rec in records if rec.outcome == OK]
    within = sum(1 for t in ok_resp if t <= deadline)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    return LoadResult(
        rate=round(sum(r.rate for r in results), 3),
        duration_s=duration,
        deadline_s=deadline,
        achieved_rate=round(sum(r.achieved_rate for r in results), 3),
        generator_cpu=round(sum(r.generator_cpu for r in results), 3),
        records=records,
        **_observed(
            ok_lat=ok_lat,
            ok_resp=ok_resp,
            within=within,
            errors=errors,
            lags=[rec.start_lag_s for rec in records],
            sent=len(records),
            duration_s=duration,
            max_start_lag_s=max_start_lag_s,
        ),
    )
