"""Per-tenant rate limits (``tenants.*.quota``): GCRA buckets in this process or shared through Redis.

``build_rate_limiter`` picks the backend from ``rate_limit.backend``. Both answer
``check(tenant) -> QuotaDecision`` with the same algorithm, so a quota means the same
thing whether one replica enforces it alone or several share it through Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from inferline.core.config import InferlineConfig, QuotaConfig, RateLimitConfig, TenantConfig
from inferline.core.deadline import Clock
from inferline.core.redis_client import fail_fast_redis

logger = logging.getLogger(__name__)

WARNING_INTERVAL_S = 10.0
"""A Redis outage is logged at most once per this many seconds, not once per request."""

BOUNDARY_SLACK_S = 1e-6
"""A request this close before its allowed time passes (1 µs, Redis ``TIME``'s resolution).

``tat`` is a sum of inexact floats (``1 / rate``), so a request arriving exactly when it is
due could be refused by one rounding error: ``burst`` requests at one instant, or a clock
ticking at exactly the rate. Passing one early by at most the slack does not raise the
sustained rate: ``tat`` still advances by a full interval from where it was."""


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """Whether one request may pass now; if not, how long until one would (seconds, 0 when allowed)."""

    allowed: bool
    retry_after_s: float = 0.0


ALLOWED = QuotaDecision(True, 0.0)
"""The one decision of every allowed request (shared: decisions are immutable)."""


class TokenBucket:
    """One tenant's bucket of ``burst`` requests refilled at ``rate_per_s``, as GCRA.

    GCRA (the generic cell rate algorithm) keeps a single number per bucket, the
    theoretical arrival time ``tat`` of the next request at the sustained rate. With the
    emission interval ``T = 1 / rate_per_s`` and the burst tolerance ``tau = (burst - 1) * T``,
    a request at ``now`` passes when ``now >= max(tat, now) - tau`` (less ``BOUNDARY_SLACK_S``)
    and then advances ``tat`` to ``max(tat, now) + T``; otherwise it is refused, and
    ``max(tat, now) - tau - now`` is *exactly* the wait until one request would pass. It behaves as a token bucket
    (capacity ``burst``, refill ``rate_per_s``) but needs no token count and no refill loop:
    O(1) state that one Redis key can hold and one Lua script can update atomically
    (``RedisRateLimiter`` runs the same steps in microseconds of Redis time).

    Hand-written because it is a few lines, and no library offers an in-process GCRA
    for asyncio whose semantics (boundary, retry-after) match our Redis script exactly.
    Not thread-safe; the router calls it from its event loop only.
    """

    __slots__ = ("_clock", "_interval", "_tat", "_tolerance", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be positive and finite, got {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._interval = 1.0 / rate_per_s
        self._tolerance = (burst - 1) * self._interval
        self._tat = -math.inf  # a new bucket is full: max(tat, now) is now

    @classmethod
    def from_quota(cls, quota: QuotaConfig, clock: Clock = time.monotonic) -> TokenBucket:
        return cls(quota.rate_per_s, quota.burst, clock)

    def try_take(self, now: float | None = None) -> QuotaDecision:
        """Take one request's worth at ``now`` (default: the bucket's clock) if the bucket allows it."""
        if now is None:
            now = self._clock()
        tat = max(self._tat, now)
        allow_at = tat - self._tolerance
        if now < allow_at - BOUNDARY_SLACK_S:
            return QuotaDecision(False, allow_at - now)
        self._tat = tat + self._interval
        return ALLOWED


class RateLimiter(Protocol):
    """Decides per request whether a tenant is within its quota; never raises from ``check``."""

    async def check(self, tenant: str) -> QuotaDecision:
        """Count one request of ``tenant`` and say whether it may pass."""
        ...

    async def close(self) -> None: ...


class LocalRateLimiter:
    """A ``TokenBucket`` per tenant with a quota, in this process (one replica's view).

    A tenant without a quota, or one not in ``tenants``, is always allowed after a single
    dict lookup. Tenants come from the authenticator, which only resolves configured
    tenants, so "unknown" cannot happen in the router; treating it as unlimited (rather
    than raising) keeps a rate limiter from ever failing a request.
    """

    def __init__(self, tenants: Mapping[str, TenantConfig], clock: Clock = time.monotonic) -> None:
        self._buckets = {
            name: TokenBucket.from_quota(tenant.quota, clock)
            for name, tenant in tenants.items()
            if tenant.quota is not None
        }

    def decide(self, tenant: str) -> QuotaDecision:
        """``check`` without the coroutine, for callers already on the loop's hot path."""
        bucket = self._buckets.get(tenant)
        return ALLOWED if bucket is None else bucket.try_take()

    async def check(self, tenant: str) -> QuotaDecision:
        return self.decide(tenant)

    async def close(self) -> None:
        return None


# KEYS[1]: the tenant's bucket. ARGV[1]: emission interval T, ARGV[2]: burst tolerance tau, both in µs.
# The same steps as TokenBucket.try_take, with its 1 µs BOUNDARY_SLACK_S.
# Times are integer µs from Redis TIME (exact in a double until year 2255), so replicas with skewed
# clocks agree. Values are written with %.17g: Lua's tostring keeps only 14 digits, too few for
# fractional µs since the epoch. Replies are {1, "0"} or {0, "<retry after, µs>"}: a Lua number
# would be truncated to an integer on the way back. A refusal writes nothing. An admitted request
# sets the key to expire when the bucket is full again (new tat - now), after which an absent key
# reads the same as a full bucket. Redis >= 5 replicates script effects, so TIME before a write is
# allowed without redis.replicate_commands().
_GCRA_LUA = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then
  tat = now
end
local allow_at = tat - tolerance
if now < allow_at - 1 then
  return {0, string.format('%.17g', allow_at - now)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, '0'}
"""


@dataclass(frozen=True, slots=True)
class _RedisBucket:
    key: str
    interval_us: str
    tolerance_us: str


class RedisRateLimiter:
    """Quotas shared by router replicas: the ``TokenBucket`` GCRA as one atomic Lua script in Redis.

    One key per tenant, ``{key_prefix}:{tenant}``, holding its ``tat`` in µs of Redis
    ``TIME``; the script is sent once and then called by EVALSHA (``register_script``).
    Each check is bounded twice by ``timeout_ms``: socket timeouts in redis-py (no
    retries) when the client is ours, and an asyncio timeout around the call, so a stalled
    Redis costs a request at most the timeout. A Redis that is slow, down or erroring
    never fails a request and never lifts the limits: the check is decided by this
    replica's own ``LocalRateLimiter`` instead (with N replicas, a tenant may get up to N
    times its quota during an outage). Its buckets are used only during failures, so they
    start the outage full. Failures are counted in ``fallbacks`` and logged at most once
    per ``WARNING_INTERVAL_S``; a recovery after a warning is logged once.

    A check that timed out may still have been counted by Redis (it was sent), so a slow
    Redis can only make the shared limit stricter, not looser. A ``client`` passed in
    belongs to the caller: ``close`` closes only a client this limiter created.
    """

    def __init__(
        self,
        tenants: Mapping[str, TenantConfig],
        config: RateLimitConfig,
        client: aioredis.Redis | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._url = config.redis_url
        self._timeout_s = config.timeout_ms / 1000
        self._buckets: dict[str, _RedisBucket] = {}
        for name, tenant in tenants.items():
            if tenant.quota is None:
                continue
            interval_us = 1e6 / tenant.quota.rate_per_s
            tolerance_us = (tenant.quota.burst - 1) * interval_us
            self._buckets[name] = _RedisBucket(f"{config.key_prefix}:{name}", repr(interval_us), repr(tolerance_us))
        self._local = LocalRateLimiter(tenants, clock)
        self._clock = clock
        self._client = client
        self._owns_client = client is None
        self._script: AsyncScript | None = None
        self._last_warning_at: float | None = None
        self._warned = False  # a warning was logged and no check has succeeded since
        self.fallbacks = 0
        """Checks decided by the local buckets because Redis failed or was too slow."""

    def _gcra(self) -> AsyncScript:
        """The registered script; our client is created on first use, inside the running loop."""
        if self._script is None:
            if self._client is None:
                self._client = fail_fast_redis(self._url, self._timeout_s)
            self._script = self._client.register_script(_GCRA_LUA)
        return self._script

    async def check(self, tenant: str) -> QuotaDecision:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return ALLOWED
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._gcra()(keys=[bucket.key], args=[bucket.interval_us, bucket.tolerance_us])
            decision = _decode(reply)
        except Exception as err:  # any failure decides locally; CancelledError (BaseException) passes
            self._failed(err)
            return self._local.decide(tenant)
        if self._warned:
            self._warned = False
            logger.info("rate limit store %s recovered; quotas are shared again", self._url)
        return decision

    def _failed(self, err: Exception) -> None:
        self.fallbacks += 1
        now = self._clock()
        if self._last_warning_at is None or now - self._last_warning_at >= WARNING_INTERVAL_S:
            self._last_warning_at = now
            self._warned = True
            logger.warning(
                "rate limit store %s unavailable (%r); quotas enforced per replica (%d local decisions so far)",
                self._url,
                err,
                self.fallbacks,
            )

    async def close(self) -> None:
        client, self._client, self._script = self._client, None, None
        if client is not None and self._owns_client:
            await client.aclose()


def _decode(reply: object) -> QuotaDecision:
    """The script's ``[allowed, retry_after_us]`` reply; anything else raises ValueError."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise ValueError(f"unexpected GCRA script reply {reply!r}")
    allowed, retry_after_us = reply
    if allowed == 1:
        return ALLOWED
    if allowed != 0 or not isinstance(retry_after_us, bytes | str) or not float(retry_after_us) > 0:
        raise ValueError(f"unexpected GCRA script reply {reply!r}")
    return QuotaDecision(False, float(retry_after_us) / 1e6)


def build_rate_limiter(config: InferlineConfig) -> RateLimiter:
    """The rate limiter ``rate_limit.backend`` names, over ``config.tenants``' quotas."""
    if config.rate_limit.backend == "redis":
        return RedisRateLimiter(config.tenants, config.rate_limit)
    return LocalRateLimiter(config.tenants)


class CountingRateLimiter:
    """Wraps a ``RateLimiter`` and calls ``on_refused(tenant)`` for each request it refuses.

    Quota refusals are the tenant's signal (a per-tenant metric), apart from overload shedding.
    """

    def __init__(self, inner: RateLimiter, on_refused: Callable[[str], None]) -> None:
        self._inner = inner
        self._on_refused = on_refused

    async def check(self, tenant: str) -> QuotaDecision:
        decision = await self._inner.check(tenant)
        if not decision.allowed:
            self._on_refused(tenant)
        return decision

    async def close(self) -> None:
        await self._inner.close()
