"""RedisRateLimiter against a real redis-server: a quota shared by replicas, isolation, expiry, outages.

Fault tests pause (SIGSTOP) the session's server or point at a port nobody listens on,
and always leave the server running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from inferline.core.config import QuotaConfig, RateLimitConfig, TenantConfig
from inferline.core.ports import LOOPBACK, free_port
from inferline.router.quota import RedisRateLimiter
from tests.integration.redis_fixtures import RedisServer

SLOW_RATE = 0.1
"""One request per 10 s: nothing refills while a test runs, however loaded the machine."""
BURST = 5
HEALTHY_TIMEOUT_MS = 2000.0
"""Generous, so a healthy-Redis test is never decided locally by a slow shared machine."""
FAULT_TIMEOUT_MS = 50.0
HANG_S = HEALTHY_TIMEOUT_MS / 1000 / 2
"""A check against a stalled or absent Redis must give up at its own 50 ms timeout. One that
waited for anything else (the 2 s of a healthy config, a TCP timeout, a stalled socket) takes
seconds: half the healthy timeout, 20x the fault one, tells the two apart on any machine that
is up, however busy."""
RECOVERY_WITHIN_S = 30.0
"""How long checks may go on being decided locally after Redis resumed (they need a fresh
connection; seconds would be a hang, not slowness)."""
_prefixes = itertools.count()
T = TypeVar("T")


def tenants(rate_per_s: float = SLOW_RATE, burst: int = BURST) -> dict[str, TenantConfig]:
    quota = QuotaConfig(rate_per_s=rate_per_s, burst=burst)
    return {
        "a": TenantConfig(routes=["driver_ranking"], quota=quota),
        "b": TenantConfig(routes=["driver_ranking"], quota=quota),
        "free": TenantConfig(routes=["driver_ranking"]),
    }


def rate_limit(url: str, timeout_ms: float = HEALTHY_TIMEOUT_MS) -> RateLimitConfig:
    """A config with a key prefix of its own, so tests never see each other's buckets."""
    return RateLimitConfig(
        backend="redis", redis_url=url, key_prefix=f"test-quota{next(_prefixes)}", timeout_ms=timeout_ms
    )


@pytest.fixture
async def client(redis_left_running: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(redis_left_running.url)
    yield redis_client
    await redis_client.aclose()


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    """The result of ``call`` and how long it took (loop time, seconds)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await call
    return result, loop.time() - started


async def checks_within_fault_timeout(limiter: RedisRateLimiter, tenant: str, n: int) -> list[bool]:
    """``n`` checks of ``tenant``, each decided at the Redis timeout, not a hang; whether each was allowed."""
    allowed = []
    for _ in range(n):
        decision, check_s = await timed(limiter.check(tenant))
        assert check_s < HANG_S
        allowed.append(decision.allowed)
    return allowed


async def test_replicas_share_one_quota(redis_left_running: RedisServer, client: aioredis.Redis) -> None:
    config = rate_limit(redis_left_running.url)
    replica_1 = RedisRateLimiter(tenants(), config)  # its own client
    replica_2 = RedisRateLimiter(tenants(), config, client)  # a client handed in
    try:
        decisions = [await (replica_1 if i % 2 else replica_2).check("a") for i in range(2 * BURST)]
        assert [d.allowed for d in decisions] == [True] * BURST + [False] * BURST  # BURST in all, not per replica
        assert replica_1.fallbacks == replica_2.fallbacks == 0
    finally:
        await replica_1.close()
        await replica_2.close()
    assert await client.ping()  # the caller's client stays open


async def test_concurrent_checks_are_atomic(redis_left_running: RedisServer) -> None:
    config = rate_limit(redis_left_running.url)
    replicas = [RedisRateLimiter(tenants(), config) for _ in range(3)]
    try:
        decisions = await asyncio.gather(*(replicas[i % 3].check("a") for i in range(30)))
        assert sum(d.allowed for d in decisions) == BURST
        assert sum(r.fallbacks for r in replicas) == 0
    finally:
        for replica in replicas:
            await replica.close()


async def test_tenants_have_separate_buckets(redis_left_running: RedisServer) -> None:
    limiter = RedisRateLimiter(tenants(), rate_limit(redis_left_running.url))
    try:
        assert [(await limiter.check("a")).allowed for _ in range(BURST + 1)] == [True] * BURST + [False]
        assert (await limiter.check("b")).allowed
        assert all([(await limiter.check("free")).allowed for _ in range(3 * BURST)])
    finally:
        await limiter.close()


async def test_retry_after_is_within_one_interval_and_honoured(redis_left_running: RedisServer) -> None:
    rate = 20.0  # 50 ms per request
    limiter = RedisRateLimiter(tenants(rate, burst=1), rate_limit(redis_left_running.url))
    try:
        assert (await limiter.check("a")).allowed
        refused = await limiter.check("a")
        assert not refused.allowed
        assert 0 < refused.retry_after_s <= 1 / rate + 1e-6
        await asyncio.sleep(refused.retry_after_s + 0.005)
        assert (await limiter.check("a")).allowed
        assert limiter.fallbacks == 0
    finally:
        await limiter.close()


async def test_key_expires_when_the_bucket_is_full_again(
    redis_left_running: RedisServer, client: aioredis.Redis
) -> None:
    config = rate_limit(redis_left_running.url)
    # One request a second: the key's TTL, two seconds at most, cannot run out between the
    # checks and the look at it however slow the machine (at 10 a second it was 200 ms).
    limiter = RedisRateLimiter(tenants(rate_per_s=1, burst=3), config)
    try:
        for _ in range(2):
            assert (await limiter.check("a")).allowed
        ttl_ms = await client.pttl(f"{config.key_prefix}:a")
        assert 0 < ttl_ms <= 2000  # two requests of a second each to refill
        assert await client.exists(f"{config.key_prefix}:free") == 0
    finally:
        await limiter.close()


async def test_unreachable_redis_decides_locally_within_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="inferline.router.quota")
    config = rate_limit(f"redis://{LOOPBACK}:{free_port()}/0", FAULT_TIMEOUT_MS)
    limiter = RedisRateLimiter(tenants(burst=3), config)
    try:
        allowed = await checks_within_fault_timeout(limiter, "a", 4)
        assert allowed == [True, True, True, False]  # the replica's local bucket: limited, not lifted
        assert (await limiter.check("free")).allowed
        assert limiter.fallbacks == 4
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await limiter.close()


async def test_stalled_redis_decides_locally_within_timeout_and_recovers(
    redis_left_running: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inferline.router.quota")
    limiter = RedisRateLimiter(tenants(burst=3), rate_limit(redis_left_running.url, FAULT_TIMEOUT_MS))
    try:
        assert (await limiter.check("b")).allowed  # connected and the script loaded
        redis_left_running.pause()
        try:
            allowed = await checks_within_fault_timeout(limiter, "a", 4)
        finally:
            redis_left_running.resume()
        assert allowed == [True, True, True, False]
        assert limiter.fallbacks == 4
        deadline = time.monotonic() + RECOVERY_WITHIN_S
        while True:  # the first checks may still meet connections broken by the stall
            before = limiter.fallbacks
            await limiter.check("b")
            if limiter.fallbacks == before:
                break  # decided by Redis again
            assert time.monotonic() < deadline, (
                f"checks still decided locally {RECOVERY_WITHIN_S} s after Redis resumed"
            )
            await asyncio.sleep(0.05)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("unavailable" in m for m in messages) == 1
        assert sum("recovered" in m for m in messages) == 1
    finally:
        await limiter.close()
