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
import collections
import gc
import math
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc

DEMO_KEY = "inferline-demo-key"
ROUTE = "driver_ranking"
DEGRADED = frozenset({"LIGHT", "CACHE", "BASELINE"})
CLIENT_SLACK_S = 0.01
"""How much later than its deadline this process may notice an answer gRPC received in time."""

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

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def answered_at(self) -> float:
        return self.sent_at + self.latency_s


class PredictClient:
    """Predict calls with the demo key over one ``grpc.aio`` channel (create it inside the test's loop)."""

    def __init__(self, address: str, api_key: str = DEMO_KEY) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    async def __aenter__(self) -> PredictClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
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
    objects takes 100+ ms here). ``max_loop_lag_s`` is the longest the loop was late.
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
    ) -> None:
        self._address = address
        self._interval_s = 1.0 / rate_per_s
        self._deadline_s = deadline_s
        self._entities = entities or cycling(range(1001, 1101))
        self._route = route
        self._traffic_class = traffic_class
        self._request_features = dict(request_features or {})
        self._client: PredictClient | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.samples: list[Sample] = []
        self.max_loop_lag_s = 0.0

    async def __aenter__(self) -> SteadyLoad:
        gc.collect()
        gc.freeze()
        self._client = PredictClient(self._address)
        self._ticker = asyncio.create_task(self._tick(), name="steady-load")
        self._watchdog = asyncio.create_task(self._watch_loop(), name="loop-lag")
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
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
            gc.unfreeze()
        self.samples.sort(key=lambda s: s.sent_at)
        return self.samples

    async def _watch_loop(self, step_s: float = 0.005) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(step_s)
            self.max_loop_lag_s = max(self.max_loop_lag_s, time.monotonic() - before - step_s)

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
        + f" after {s.latency_s * 1000:.1f} ms (router {s.router_ms:.1f} ms){f' {s.details}' if s.details else ''}"
        for s in samples[:limit]
    )


def assert_all_answered_in_time(samples: Sequence[Sample], client_lag_s: float | None = None) -> None:
    """Every call got an answer before its deadline, with scores in [0, 1]; the culprits are listed otherwise.

    In time means status OK: every call carries its deadline as a gRPC deadline, and an
    answer that has not arrived by then fails DEADLINE_EXCEEDED on the client. The
    latency measured here also holds how long this test's own event loop took to notice
    the answer, a few ms at times on shared cores: it may exceed the deadline by at most
    ``CLIENT_SLACK_S``. ``client_lag_s`` (the load's worst event-loop lag) is reported with
    a failure: a client that stalled can miss deadlines on its own.
    """
    assert samples, "no calls were made"
    lag = "" if client_lag_s is None else f" (client event loop lagged {client_lag_s * 1000:.1f} ms at worst)"
    failed = [s for s in samples if not s.ok]
    assert not failed, f"{len(failed)} of {len(samples)} calls failed{lag}: {describe(failed)}"
    late = [s for s in samples if s.latency_s >= s.deadline_s + CLIENT_SLACK_S]
    assert not late, f"{len(late)} answers seen after their deadline{lag}: {describe(late)}"
    bad = [s for s in samples if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s.scores.values())]
    assert not bad, f"scores outside [0, 1] or not finite reached the caller: {[s.scores for s in bad[:5]]}"


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
