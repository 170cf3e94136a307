"""GCRA token buckets and the local rate limiter, on a fake clock; the Redis limiter's fallback on a failing client."""

from __future__ import annotations

import logging
import pathlib
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from inferline.core.config import QuotaConfig, RateLimitConfig, TenantConfig, load_config
from inferline.router.quota import (
    ALLOWED,
    LocalRateLimiter,
    QuotaDecision,
    RedisRateLimiter,
    TokenBucket,
    build_rate_limiter,
)

DEFAULT_CONFIG = pathlib.Path("deploy/local/inferline.yaml")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tenant(rate_per_s: float | None = None, burst: int = 1) -> TenantConfig:
    quota = None if rate_per_s is None else QuotaConfig(rate_per_s=rate_per_s, burst=burst)
    return TenantConfig(routes=["driver_ranking"], quota=quota)


def test_burst_is_allowed_then_refused() -> None:
    bucket = TokenBucket(rate_per_s=5, burst=3, clock=FakeClock())
    assert [bucket.try_take().allowed for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("rate", [3.0, 7.0, 0.3, 1000.0])
def test_whole_burst_passes_at_one_instant_whatever_the_rounding(rate: float) -> None:
    bucket = TokenBucket(rate, burst=50, clock=FakeClock(123456.789))
    assert [bucket.try_take().allowed for _ in range(51)] == [True] * 50 + [False]


def test_retry_after_is_exact() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=2, clock=FakeClock())
    assert bucket.try_take() == ALLOWED
    assert bucket.try_take() == ALLOWED
    refused = bucket.try_take()
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.1, abs=1e-9)


def test_waiting_exactly_retry_after_is_enough() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=3, burst=2, clock=clock)
    bucket.try_take()
    bucket.try_take()
    refused = bucket.try_take()
    clock.advance(refused.retry_after_s - 2e-6)
    assert not bucket.try_take().allowed  # early by more than the 1 µs slack: still refused
    clock.now = 1000.0 + refused.retry_after_s
    assert bucket.try_take().allowed
    assert not bucket.try_take().allowed  # one request's worth refilled, not more


def test_refill_after_time_passes_is_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10, burst=2, clock=clock)
    assert [bucket.try_take().allowed for _ in range(3)] == [True, True, False]
    clock.advance(0.1)
    assert [bucket.try_take().allowed for _ in range(2)] == [True, False]
    clock.advance(60)  # a long idle spell refills to the burst, no further
    assert [bucket.try_take().allowed for _ in range(3)] == [True, True, False]


def test_sustained_rate_is_honoured() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100, burst=1, clock=clock)
    allowed = 0
    for i in range(10_000):  # 10 s of offers every millisecond, each exactly on a boundary
        clock.now = 1000.0 + i / 1000
        allowed += bucket.try_take().allowed
    assert allowed == 1000


def test_explicit_now_overrides_the_clock() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=1, clock=FakeClock(0.0))
    assert bucket.try_take(now=50.0).allowed
    assert bucket.try_take(now=50.5) == QuotaDecision(False, 0.5)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0)])
def test_invalid_bucket_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


async def test_tenant_without_quota_is_unlimited() -> None:
    limiter = LocalRateLimiter({"free": tenant()}, clock=FakeClock())
    assert all([(await limiter.check("free")).allowed for _ in range(10_000)])
    assert (await limiter.check("not-configured")).allowed  # documented: unknown means unlimited


async def test_tenants_do_not_share_buckets() -> None:
    limiter = LocalRateLimiter({"a": tenant(1, burst=2), "b": tenant(1, burst=2)}, clock=FakeClock())
    assert [(await limiter.check("a")).allowed for _ in range(3)] == [True, True, False]
    assert [(await limiter.check("b")).allowed for _ in range(3)] == [True, True, False]
    await limiter.close()


class FailingClient:
    """Stands in for ``redis.asyncio.Redis``: every script call fails as an unreachable server would."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, script: str) -> Any:
        async def call(keys: list[str], args: list[str]) -> Any:
            self.calls += 1
            raise RedisConnectionError("connection refused")

        return call


async def test_failing_redis_falls_back_to_local_buckets_and_warns_rarely(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    client = FailingClient()
    limiter = RedisRateLimiter(
        {"a": tenant(1, burst=2), "free": tenant()},
        RateLimitConfig(backend="redis"),
        cast(aioredis.Redis, client),
        clock=clock,
    )
    caplog.set_level(logging.WARNING, logger="inferline.router.quota")
    assert [(await limiter.check("a")).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.check("free")).allowed
    assert client.calls == 3  # a tenant without quota never reaches Redis
    assert limiter.fallbacks == 3
    clock.advance(9.9)
    await limiter.check("a")
    assert len(caplog.records) == 1  # once per 10 s, not per check
    clock.advance(0.1)
    await limiter.check("a")
    assert len(caplog.records) == 2
    await limiter.close()


def test_backend_is_chosen_by_config() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert isinstance(build_rate_limiter(config), LocalRateLimiter)
    redis_config = config.model_copy(update={"rate_limit": RateLimitConfig(backend="redis")})
    assert isinstance(build_rate_limiter(redis_config), RedisRateLimiter)
