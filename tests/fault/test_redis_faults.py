"""Score cache in Redis: a stalled or stopped Redis costs callers nothing, and the cache is really used.

The router writes good answers through to Redis off the caller's path and reads it only
on the degradation path, so while Redis is paused (SIGSTOP) or stopped every call must
still be served PRIMARY before its deadline. Then, with the router's Triton stopped,
entities answered before must come back from Redis: served_by CACHE, the same score.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
import redis

from inferline.triton.launcher import TritonLauncher
from tests.fault.load import (
    PredictClient,
    SteadyLoad,
    assert_all_answered_in_time,
    between,
    cycling,
    percentile,
    summarize,
)
from tests.integration.redis_fixtures import RedisServer
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_redis]

KEY_PREFIX = "fault"
DEADLINE_S = 0.1
RATE_PER_S = 50.0
PHASE_S = 2.0
LOAD_POOL = range(1001, 1101)
SEEN = [1501, 1502, 1503, 1504, 1505]
"""Entities answered once by PRIMARY just before Triton is stopped."""
UNSEEN = [1901, 1902, 1903]
"""Entities never asked for: no cache entry, so the light model answers them."""
CACHE_TIMEOUT_MS = 20
"""The cache read bound (default 5 ms), widened: these shared machines stall for ms at times."""


@pytest.fixture
def score_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, left running (resumed, restarted) whatever the test did to it."""
    yield redis_server
    if redis_server.process.poll() is None:
        redis_server.resume()
    redis_server.start()


@pytest.fixture
def router(routers: Routers, fault_triton: TritonLauncher, score_redis: RedisServer) -> Iterator[ServerProcess]:
    score_cache = {
        "backend": "redis",
        "redis_url": score_redis.url,
        "key_prefix": KEY_PREFIX,
        "timeout_ms": CACHE_TIMEOUT_MS,
    }
    with routers.running("redis-cache", triton=fault_triton, score_cache=score_cache) as server:
        yield server


def cached_entities(url: str, ids: list[int]) -> list[int]:
    """Those of ``ids`` with an entry in Redis (the router's keys for tenant demo, route driver_ranking)."""
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        values = client.mget([f"{KEY_PREFIX}:demo:driver_ranking:{i}" for i in ids])
    return [i for i, v in zip(ids, values, strict=True) if v is not None]


async def test_redis_stalls_and_restarts_never_reach_callers(
    router: ServerProcess, score_redis: RedisServer, fault_triton: TritonLauncher
) -> None:
    async with SteadyLoad(
        router.address, rate_per_s=RATE_PER_S, deadline_s=DEADLINE_S, entities=cycling(LOAD_POOL)
    ) as load:
        await asyncio.sleep(PHASE_S)
        written = await asyncio.to_thread(cached_entities, score_redis.url, list(LOAD_POOL))
        score_redis.pause()
        paused_at = time.monotonic()
        try:
            await asyncio.sleep(PHASE_S)
        finally:
            score_redis.resume()
        resumed_at = time.monotonic()
        await asyncio.sleep(PHASE_S / 2)
        await asyncio.to_thread(score_redis.stop)
        stopped_at = time.monotonic()
        await asyncio.sleep(PHASE_S)
        await asyncio.to_thread(score_redis.start)
        started_at = time.monotonic()
        await asyncio.sleep(PHASE_S)
    samples = load.samples
    print(
        f"\nbefore: {summarize(between(samples, 0, paused_at))}"
        f"\nRedis paused: {summarize(between(samples, paused_at, resumed_at))}"
        f"\nRedis stopped: {summarize(between(samples, stopped_at, started_at))}"
        f"\nRedis restarted: {summarize(between(samples, started_at))}"
        f"\np99 {percentile([s.latency_s for s in samples], 99) * 1000:.1f} ms vs deadline {DEADLINE_S * 1000:.0f} ms; "
        f"client loop lag max {load.max_loop_lag_s * 1000:.1f} ms"
    )
    assert len(written) > len(LOAD_POOL) // 2, f"only {len(written)} answers written through to Redis"
    log = [line for line in router.log_path.read_text(errors="replace").splitlines() if "score cache" in line]
    # The router did feel both faults (its cache client logs an outage's start and end once each).
    assert sum("unavailable" in line for line in log) >= 2, log
    assert sum("recovered" in line for line in log) >= 2, log
    assert_all_answered_in_time(samples, load.max_loop_lag_s)
    assert {s.served_by for s in samples} == {"PRIMARY"}, summarize(samples)

    # The cache is really used: answers written through to Redis come back once Triton is gone.
    async with PredictClient(router.address) as client:
        primary = {i: await client.predict([i], deadline_s=0.25) for i in SEEN}
        assert {s.served_by for s in primary.values()} == {"PRIMARY"}
        await asyncio.sleep(0.5)  # write-behind
        assert await asyncio.to_thread(cached_entities, score_redis.url, SEEN) == SEEN  # after Redis' restart too

        await asyncio.to_thread(fault_triton.stop)
        cached = {i: await client.predict([i], deadline_s=DEADLINE_S) for i in SEEN}
        unseen = [await client.predict([i], deadline_s=DEADLINE_S) for i in UNSEEN]
    print(
        "with Triton stopped: "
        + ", ".join(f"{i}: {s.served_by}/{s.reason} age {s.cache_age_ms:.0f} ms" for i, s in cached.items())
        + "; unseen: "
        + ", ".join(f"{s.served_by}/{s.reason}" for s in unseen)
    )
    assert_all_answered_in_time([*cached.values(), *unseen])
    for i, sample in cached.items():
        assert sample.served_by == "CACHE", sample
        assert sample.reason in {"MODEL_UNAVAILABLE", "CIRCUIT_OPEN"}, sample
        assert sample.cache_age_ms > 0
        assert sample.scores[i] == pytest.approx(primary[i].scores[i], abs=1e-6)
    assert {s.served_by for s in unseen} == {"LIGHT"}
    assert all(s.code is grpc.StatusCode.OK for s in unseen)
