"""Client side of the fault tests: Predict calls recorded one by one, and a steady load of them.

``PredictClient.predict`` sends one call with its own gRPC deadline and records what the
caller saw (status code, who served it and why, latency) as a ``Sample``; it never raises
for an RPC error. ``SteadyLoad`` sends such calls at a fixed rate from a background task
(open loop: a call starts on schedule whether or not earlier ones have answered), so a
test can break a dependency in the middle of the traffic and then look at every call.
Times are ``time.monotonic()`` readings, the clock the tests use for the faults too.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import gc
import math
import os
import pathlib
import re
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from inferline.core.metrics import LATENCY_BUCKETS_S
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc

DEMO_KEY = "inferline-demo-key"
ROUTE = "driver_ranking"
DEGRADED = frozenset({"LIGHT", "CACHE", "BASELINE"})
CLIENT_SLACK_S = 0.01
"""How much later than its deadline this process may notice an answer gRPC received in time."""
CONNECT_TIMEOUT_S = 30.0
"""How long a client waits for its channel to connect before any call (a router that is up connects at once)."""
IN_TIME_SHARE = 0.995
"""Share of calls a client on a busy shared machine must see answered in time, the machine's
measured lag taken out (``assert_answered_in_time``)."""
BUSY_SHARE = 0.95
"""Share of calls that must be seen in time however busy the machine (``assert_answered_in_time``)."""
LOOP_TICK_S = 0.005
"""Period of the ``LoopWatch`` tick."""
STALL_FLOOR_S = 0.001
"""Loop lateness under this is the timers' resolution, not a stall."""

EntityPicker = Callable[[int], Sequence[int]]
"""Entities of the ``i``-th call of a load."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One Predict call as the caller saw it."""

    sent_at: float
    """``time.monotonic()`` just before the call was sent."""
    latency_s: float
    deadline_s: float
    code: grpc.StatusCode
    served_by: str
    """PRIMARY, LIGHT, CACHE or BASELINE; empty when the call failed."""
    reason: str
    """Degradation reason without its prefix (e.g. MODEL_UNAVAILABLE); empty when not degraded."""
    features_degraded: bool
    cache_age_ms: float
    entities: tuple[int, ...]
    scores: dict[int, float]
    """Score by entity id, as answered."""
    details: str
    """The status message of a failed call."""
    router_ms: float = 0.0
    """The router's own ``timings.total_ms`` (arrival to answer, without transport)."""
    model_name: str = ""
    """The model that answered (the variant route selection chose, or the light model)."""
    client_stall_s: float = 0.0
    """How long this process's event loop stood still between the call's deadline and the
    moment it noticed the outcome (``LoopWatch``): lateness of the client's own, which no
    server can be blamed for; 0 for a call noticed before its deadline. Set by ``LoopWatch.annotate``."""
    server_wait_s: float = 0.0
    """How long the router's threads (added up) waited for a CPU while the call was out (their
    schedstat run delays, sampled by ``LoopWatch``): the machine's lag on the server's side,
    which the router does not control either. Set by ``LoopWatch.annotate`` when it knows the router's pid."""
    server_ran_s: float = 0.0
    """CPU time the router's main thread got while the call was out (shown with a late call:
    a router that ran all along was busy with its own work, not held back)."""

    @property
    def machine_lag_s(self) -> float:
        """Time the machine held back the client or the router during the call (stall + wait)."""
        return self.client_stall_s + self.server_wait_s

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def answered_at(self) -> float:
        return self.sent_at + self.latency_s


class LoopWatch:
    """The machine's lag: when this process's event loop stood still, and how long the router waited for a CPU.

    A tick sleeps ``tick_s`` and notes how much later than asked it woke up. A late tick
    means nothing in this process's loop could run for that long (it waited for a CPU on a
    busy machine, or a callback held the loop), so an answer that arrived then was noticed
    that much later, and a call sent then left that much later. Stalls are kept as
    (end, length); ``stalled_s`` says how much of a call's window this process spent
    stalled, time the server cannot be blamed for. Lateness under ``STALL_FLOOR_S`` is the
    timers' own resolution and is not counted.

    Given the router's pid, each tick also reads how long each of the router's threads has
    waited for a CPU so far (``/proc/<pid>/task/<tid>/schedstat``, the run delay: its event
    loop and gRPC's own threads, which read and write the calls), so ``server_wait_s`` can
    say how much the machine kept the router from running during a call: a router that was
    runnable but not run cannot be blamed either, while one that held its own loop (a
    blocking call, a long collection) was running, which ``server_ran_s`` shows, and is not
    excused.
    """

    def __init__(self, tick_s: float = LOOP_TICK_S, server_pid: int | None = None) -> None:
        self.tick_s = tick_s
        self._server_pid = server_pid
        self._server_tasks = None if server_pid is None else pathlib.Path(f"/proc/{server_pid}/task")
        self._thread_waits: dict[int, int] = {}
        """Run delay (ns) of each router thread at the last reading."""
        self._wait_at: list[float] = []
        self._waited: list[float] = []
        """Run delay of all the router's threads together since the first reading, at each ``_wait_at``."""
        self._main_ran: list[float] = []
        """CPU time of the router's main thread, at each ``_wait_at``."""
        self._ends: list[float] = []
        self._lengths: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._due = math.inf
        """When the pending tick is due (inf: none pending)."""
        self.max_lag_s = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-watch")

    async def stop(self) -> None:
        """Stop ticking; a stall still going on (the pending tick overdue) is recorded first."""
        task, self._task = self._task, None
        if task is not None:
            self._note(time.monotonic())
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._due = time.monotonic() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self._note(time.monotonic())

    def _note(self, now: float) -> None:
        lag = now - self._due
        if lag >= STALL_FLOOR_S:
            self._ends.append(now)
            self._lengths.append(lag)
            self.max_lag_s = max(self.max_lag_s, lag)
        self._due = math.inf  # each tick is noted once
        if self._server_tasks is not None:
            self._read_server(now)

    def _read_server(self, now: float) -> None:
        """Add up how long the router's threads have waited for a CPU, and how long its main thread ran."""
        assert self._server_tasks is not None
        try:
            tids = [int(t) for t in os.listdir(self._server_tasks)]
        except OSError:  # the router is gone: nothing more to learn
            self._server_tasks = None
            return
        waited_ns = 0
        for tid in tids:
            try:
                ran_ns, wait_ns, _ = (int(v) for v in (self._server_tasks / str(tid) / "schedstat").read_text().split())
            except (OSError, ValueError):  # the thread just ended
                continue
            # A thread first seen now started since the last reading: all its wait is new.
            waited_ns += wait_ns - self._thread_waits.get(tid, 0 if self._wait_at else wait_ns)
            self._thread_waits[tid] = wait_ns
            if tid == self._server_pid:
                self._main_ran.append(ran_ns / 1e9)
        if len(self._main_ran) == len(self._wait_at):  # the main thread could not be read: keep the series aligned
            self._main_ran.append(self._main_ran[-1] if self._main_ran else 0.0)
        self._wait_at.append(now)
        self._waited.append((self._waited[-1] if self._waited else 0.0) + waited_ns / 1e9)

    def server_wait_s(self, start: float, end: float) -> float:
        """Seconds the router's threads (added up) waited for a CPU in ``[start, end]`` (0 without its pid).

        The cumulative run delays are read once a tick; between ticks they are taken as
        growing evenly."""
        return max(0.0, _at(self._wait_at, self._waited, end) - _at(self._wait_at, self._waited, start))

    def server_ran_s(self, start: float, end: float) -> float:
        """Seconds of CPU the router's main thread got in ``[start, end]`` (0 without its pid): with a
        ``server_wait_s`` near 0, time it spent on its own work (a long collection, a blocking call)."""
        return max(0.0, _at(self._wait_at, self._main_ran, end) - _at(self._wait_at, self._main_ran, start))

    def stalled_s(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` this process's loop stood still (overlap with every stall seen)."""
        total = 0.0
        for k in range(bisect.bisect_left(self._ends, start), len(self._ends)):
            stall_end = self._ends[k]
            stall_start = stall_end - self._lengths[k]
            if stall_start >= end:
                break
            total += max(0.0, min(end, stall_end) - max(start, stall_start))
        return total

    def annotate(self, samples: Iterable[Sample]) -> list[Sample]:
        """``samples`` with ``client_stall_s`` filled in. Call it once the calls are over: a stall
        that held back the noticing of an outcome is recorded only when the loop moves again.

        Only stalls after a call's deadline count: one while the call was merely waiting
        cost it nothing, one across its deadline kept an answer that may have come in time
        from being seen."""
        return [
            dataclasses.replace(
                s,
                client_stall_s=self.stalled_s(s.sent_at + s.deadline_s, s.answered_at),
                server_wait_s=self.server_wait_s(s.sent_at, s.answered_at),
                server_ran_s=self.server_ran_s(s.sent_at, s.answered_at),
            )
            for s in samples
        ]


def _at(times: Sequence[float], values: Sequence[float], t: float) -> float:
    """``values`` (a cumulative series read at ``times``) at ``t``, linearly between readings."""
    if not times:
        return 0.0
    k = bisect.bisect_left(times, t)
    if k == 0:
        return values[0]
    if k == len(times):
        return values[-1]
    t0, t1 = times[k - 1], times[k]
    return values[k - 1] + (values[k] - values[k - 1]) * (t - t0) / (t1 - t0)


class PredictClient:
    """Predict calls with the demo key over one ``grpc.aio`` channel (create it inside the test's loop).

    ``async with`` connects the channel first, so that no timed call pays for the TCP and
    HTTP/2 set-up (on a busy machine a cold first call can spend its whole deadline
    there, before the router ever sees it), and starts ``watch``, the client's own lag
    (``LoopWatch``), for the judging of its calls (``assert_answered_in_time``).
    """

    def __init__(self, address: str, api_key: str = DEMO_KEY, *, server_pid: int | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self.watch = LoopWatch(server_pid=server_pid)

    async def __aenter__(self) -> PredictClient:
        await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        self.watch.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.watch.stop()
        await self._channel.close(grace=None)

    async def predict(
        self,
        entities: Sequence[int],
        *,
        deadline_s: float,
        route: str = ROUTE,
        traffic_class: str = "critical",
        request_features: Mapping[str, float] | None = None,
    ) -> Sample:
        """One call with a gRPC deadline of ``deadline_s``; errors are recorded, not raised."""
        request = pb.PredictRequest(
            route=route,
            entities=[pb.EntityKey(name="driver_id", int64_value=e) for e in entities],
            traffic_class=traffic_class,
            request_features=dict(request_features or {}),
        )
        sent_at = time.monotonic()
        try:
            response = await self._stub.Predict(request, timeout=deadline_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            latency_s = time.monotonic() - sent_at
            return Sample(
                sent_at, latency_s, deadline_s, err.code(), "", "", False, 0.0, tuple(entities), {}, err.details() or ""
            )
        latency_s = time.monotonic() - sent_at
        reason = pb.DegradationReason.Name(response.degradation_reason).removeprefix("DEGRADATION_REASON_")
        return Sample(
            sent_at=sent_at,
            latency_s=latency_s,
            deadline_s=deadline_s,
            code=grpc.StatusCode.OK,
            served_by=pb.ServedBy.Name(response.served_by).removeprefix("SERVED_BY_"),
            reason="" if reason == "UNSPECIFIED" else reason,
            features_degraded=response.features_degraded,
            cache_age_ms=response.cache_age_ms,
            entities=tuple(entities),
            scores={p.entity.int64_value: p.score for p in response.predictions},
            details="",
            router_ms=response.timings.total_ms,
            model_name=response.model_name,
        )


def cycling(pool: Sequence[int], per_call: int = 1) -> EntityPicker:
    """Picker that walks ``pool`` round-robin, ``per_call`` distinct entities a call."""

    def pick(i: int) -> Sequence[int]:
        return [pool[(i * per_call + k) % len(pool)] for k in range(per_call)]

    return pick


class SteadyLoad:
    """Predict calls at a fixed rate until stopped; every call is kept as a ``Sample``.

    Use as ``async with SteadyLoad(...) as load:`` inside the test's event loop; leaving
    the block stops sending and waits for the calls in flight (each ends by its deadline).
    The client must not stall, or its own calls miss their deadlines: tests run blocking
    waits in threads, and the objects alive at the start are frozen out of the garbage
    collector's sight for the run (a full collection over pytest's, pandas' and gRPC's
    objects takes 100+ ms here). Even so a busy machine stalls it now and then: ``watch``
    (``LoopWatch``, its client's) measures those stalls, and with ``server_pid`` the router's
    waits for a CPU, and the samples ``stop`` returns carry each its own (``client_stall_s``,
    ``server_wait_s``). ``max_loop_lag_s`` is the longest the loop was late.
    """

    def __init__(
        self,
        address: str,
        *,
        rate_per_s: float = 50.0,
        deadline_s: float = 0.1,
        entities: EntityPicker | None = None,
        route: str = ROUTE,
        traffic_class: str = "critical",
        request_features: Mapping[str, float] | None = None,
        server_pid: int | None = None,
    ) -> None:
        self._address = address
        self._server_pid = server_pid
        self._interval_s = 1.0 / rate_per_s
        self._deadline_s = deadline_s
        self._entities = entities or cycling(range(1001, 1101))
        self._route = route
        self._traffic_class = traffic_class
        self._request_features = dict(request_features or {})
        self._client: PredictClient | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.watch = LoopWatch(server_pid=server_pid)  # the client's own, once it exists
        self.samples: list[Sample] = []

    async def __aenter__(self) -> SteadyLoad:
        gc.collect()
        gc.freeze()
        self._client = PredictClient(self._address, server_pid=self._server_pid)
        self.watch = self._client.watch
        await self._client.__aenter__()
        self._ticker = asyncio.create_task(self._tick(), name="steady-load")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> list[Sample]:
        """Stop sending, wait for the calls in flight, close the channel; returns every sample."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if self._calls:
            await asyncio.gather(*self._calls)
        if self._client is not None:
            await self._client.close()
            self._client = None
            gc.unfreeze()
            self.samples = sorted(self.watch.annotate(self.samples), key=lambda s: s.sent_at)
        return self.samples

    @property
    def max_loop_lag_s(self) -> float:
        """The longest this process's event loop was late during the load."""
        return self.watch.max_lag_s

    async def _tick(self) -> None:
        next_at = time.monotonic()
        i = 0
        while True:
            task = asyncio.create_task(self._one(i))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            i += 1
            now = time.monotonic()
            # Behind schedule (the loop was busy): go on from now rather than catch up in a burst.
            next_at = max(next_at + self._interval_s, now - self._interval_s)
            await asyncio.sleep(max(next_at - now, 0.0))

    async def _one(self, i: int) -> None:
        assert self._client is not None
        sample = await self._client.predict(
            self._entities(i),
            deadline_s=self._deadline_s,
            route=self._route,
            traffic_class=self._traffic_class,
            request_features=self._request_features,
        )
        self.samples.append(sample)


def between(samples: Iterable[Sample], start: float, end: float = math.inf) -> list[Sample]:
    """Samples sent in ``[start, end)``."""
    return [s for s in samples if start <= s.sent_at < end]


def primary_share(samples: Sequence[Sample]) -> float:
    """Share of ``samples`` served by PRIMARY (NaN when empty)."""
    return sum(s.served_by == "PRIMARY" for s in samples) / len(samples) if samples else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(samples: Sequence[Sample]) -> str:
    """One line: count, outcomes by status / served_by / reason, latency p50 / p99 / max in ms."""
    outcomes = collections.Counter(
        (s.served_by + (f"/{s.reason}" if s.reason else "")) if s.ok else s.code.name for s in samples
    )
    latencies = [s.latency_s * 1000 for s in samples]
    return (
        f"{len(samples)} calls {dict(sorted(outcomes.items()))}; latency ms p50 {percentile(latencies, 50):.1f} "
        f"p99 {percentile(latencies, 99):.1f} max {max(latencies, default=math.nan):.1f}"
    )


def describe(samples: Sequence[Sample], limit: int = 5) -> str:
    """The first ``limit`` samples, one by one: when sent, outcome, client and router latency."""
    return "; ".join(
        f"sent at {s.sent_at:.3f}: {s.served_by or s.code.name}"
        + (f"/{s.reason}" if s.reason else "")
        + f" after {s.latency_s * 1000:.1f} ms (router {s.router_ms:.1f} ms"
        + (f", machine lag {s.machine_lag_s * 1000:.1f} ms" if s.machine_lag_s else "")
        + (f", router ran {s.server_ran_s * 1000:.1f} ms" if s.server_ran_s else "")
        + f"){f' {s.details}' if s.details else ''}"
        for s in samples[:limit]
    )


def in_time(sample: Sample) -> bool:
    """Answered, and seen within ``CLIENT_SLACK_S`` of the deadline once the client's own stall
    after the deadline (``client_stall_s``) is taken out."""
    return sample.ok and sample.latency_s - sample.client_stall_s < sample.deadline_s + CLIENT_SLACK_S


def assert_answered_in_time(
    samples: Sequence[Sample],
    *,
    router: RouterAccount | None = None,
    statuses: Iterable[grpc.StatusCode] = (),
    share: float = IN_TIME_SHARE,
) -> None:
    """The router answered every call before its deadline, and the client saw (nearly) every answer in time.

    What the server controls is judged on every call, strictly:

    * each call ended OK or DEADLINE_EXCEEDED (or with one of ``statuses``): nothing else
      (UNAVAILABLE, INTERNAL, ...) ever reaches a caller;
    * each answer's scores are finite and in [0, 1];
    * each answer the client got was, by the router's own clock (``router_ms``, arrival to
      answer), within its deadline, but for the time the machine kept the router's main
      thread waiting for a CPU meanwhile (``server_wait_s``): a router that was not run
      cannot answer;
    * with ``router`` (its metrics around the calls): so was every answer it sent, also
      those the client gave up on (each over the deadline by its own clock needs a call the
      machine held the router back for ``CLIENT_SLACK_S`` or more), and it sent at least
      as many as the client got.

    What the client saw also holds the transport and the machine's delays: on a busy
    2-core machine, shared with the router and Triton, an answer the router sent in time
    can still be seen late or miss the gRPC deadline. So the client's view is judged on a
    share, with the machine's measured lag taken out:

    * a call is in time when ``in_time`` (this process's stall after the deadline taken out);
    * a call that is not is excused when the machine held back this process's loop or the
      router's main thread for ``CLIENT_SLACK_S`` or more while it was out
      (``machine_lag_s``, measured by ``LoopWatch``): neither the router nor the client
      controls a CPU it is not given;
    * at most ``1 - share`` of the calls, rounded down, may be late without excuse (with
      fewer than ``1 / (1 - share)`` calls, none), and at most ``1 - BUSY_SHARE`` late at
      all, however busy the machine was: an excuse never turns into judging nothing.
    """
    assert samples, "no calls were made"
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, *statuses}
    other = [s for s in samples if s.code not in allowed]
    assert not other, f"{len(other)} of {len(samples)} calls ended with another status: {describe(other)}"
    bad = [s for s in samples if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s.scores.values())]
    assert not bad, f"scores outside [0, 1] or not finite reached the caller: {[s.scores for s in bad[:5]]}"
    answers = [s for s in samples if s.ok]
    slow = [s for s in answers if s.router_ms - s.server_wait_s * 1000 >= s.deadline_s * 1000]
    assert not slow, f"{len(slow)} answers took the router itself past their deadline: {describe(slow)}"
    if router is not None:
        held_back = sum(s.server_wait_s >= CLIENT_SLACK_S for s in samples)
        assert router.answers >= len(answers), f"{router}; the client got {len(answers)}"
        assert router.answers - router.in_time <= held_back, (
            f"{router}; the machine held the router back during only {held_back} calls"
        )

    judged = [s for s in samples if s.code not in set(statuses)]
    late = [s for s in judged if not in_time(s)]
    unexcused = [s for s in late if s.machine_lag_s < CLIENT_SLACK_S]
    context = (
        f"{len(late)} of {len(judged)} calls not seen in time, {len(unexcused)} of them without the machine's "
        f"excuse; {router or 'no router account'}"
    )
    most_unexcused, most_late = int(len(judged) * (1 - share)), int(len(judged) * (1 - BUSY_SHARE))
    assert len(unexcused) <= most_unexcused, f"{context} (at most {most_unexcused} may be): {describe(unexcused)}"
    assert len(late) <= most_late, f"{context} (at most {most_late} may be late at all): {describe(late)}"


def scrape_metrics(metrics_port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """The router's Prometheus samples as ``{'name{labels}': value}`` (exposition text, parsed plainly)."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _labelled(values: Mapping[str, float], name: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The keys of ``values`` (``scrape_metrics``) that are samples of ``name``, with their labels."""
    for key in values:
        metric, brace, rest = key.partition("{")
        if metric == name:
            yield key, dict(_LABEL.findall(rest)) if brace else {}


@dataclass(frozen=True, slots=True)
class RouterAccount:
    """What the router itself says it did with a route's calls between two scrapes of its metrics.

    The router counts an answer when it hands it to gRPC, so this holds the answers a
    client gave up on too (it saw DEADLINE_EXCEEDED): the server's side of the story,
    free of the client's and the transport's delays.
    """

    answers: int
    """Calls it answered (status OK), degraded or not."""
    in_time: int
    """Of those, the answers whose own arrival-to-answer time (layer ``total``) was within the deadline."""
    served: dict[str, int]
    """Answers by ``served_by`` or ``served_by/reason``, as ``summarize`` names them."""
    errors: dict[str, int]
    """Calls it ended with another status, by code name (e.g. RESOURCE_EXHAUSTED when shed)."""

    def __str__(self) -> str:
        return (
            f"router: {self.answers} answers ({self.in_time} within the deadline by its own clock) "
            f"{self.served}, errors {self.errors}"
        )


def router_account(
    before: Mapping[str, float],
    after: Mapping[str, float],
    *,
    route: str,
    deadline_s: float,
    traffic_classes: Iterable[str] | None = None,
) -> RouterAccount:
    """The router's ``RouterAccount`` of ``route`` (of ``traffic_classes`` only, if given) from two
    ``scrape_metrics``; ``deadline_s`` must be one of the latency histogram's bucket bounds."""
    if deadline_s not in LATENCY_BUCKETS_S:
        raise ValueError(f"{deadline_s} s is no bucket bound of the router's latency histogram")
    classes = None if traffic_classes is None else set(traffic_classes)

    def deltas(name: str, **match: str) -> Iterator[tuple[dict[str, str], float]]:
        for key, labels in _labelled(after, name):
            if labels.get("route") != route or (classes is not None and labels.get("traffic_class") not in classes):
                continue
            if all(labels.get(k) == v for k, v in match.items()):
                yield labels, after[key] - before.get(key, 0.0)

    served: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for labels, n in deltas("inferline_requests_total"):
        if n and labels["code"] == "OK":
            served[labels["served_by"] + (f"/{labels['reason']}" if labels["reason"] else "")] += int(n)
        elif n:
            errors[labels["code"]] += int(n)
    in_time = sum(
        n
        for labels, n in deltas("inferline_layer_latency_seconds_bucket", layer="total")
        if float(labels["le"]) == deadline_s
    )
    return RouterAccount(sum(served.values()), int(in_time), dict(sorted(served.items())), dict(sorted(errors.items())))
