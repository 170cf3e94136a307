"""RedisScoreCache against a real redis-server: round trip, TTL, tenant isolation, stalls and outages.

Fault tests pause (SIGSTOP) or stop the session's server and always leave it running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest

from inferline.degradation import RedisScoreCache
from tests.integration.redis_fixtures import RedisServer

ROUTE = "driver_ranking"
TIMEOUT_S = 0.05
"""Generous next to the 5 ms default: these machines are shared and loaded."""
HANG_S = 1.0
"""A call against a stalled or stopped Redis must give up at its own 50 ms timeout; one that
waited for anything else (a TCP timeout, a stalled socket) takes seconds. 20x the timeout
tells the two apart on any machine that is up, however busy."""
SHORT_TTL_S = 1.0
"""The "short" route's TTL: long enough that an entry written is still there when read right
after on a busy machine (at 0.2 s it might not be)."""
_prefixes = itertools.count()
T = TypeVar("T")


@pytest.fixture
async def cache(redis_left_running: RedisServer) -> AsyncIterator[RedisScoreCache]:
    """A cache with a key prefix of its own, so tests never see each other's keys."""
    score_cache = RedisScoreCache(
        redis_left_running.url, f"test{next(_prefixes)}", {ROUTE: 60.0, "short": SHORT_TTL_S}, TIMEOUT_S
    )
    yield score_cache
    await score_cache.close()


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    """The result of ``call`` and how long it took (loop time, seconds)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await call
    return result, loop.time() - started


async def test_round_trip(cache: RedisScoreCache) -> None:
    await cache.put_many("t1", ROUTE, [1, 2, "x:y"], [0.25, 0.5, 0.125])
    found = await cache.get_many("t1", ROUTE, [1, 2, 3, "x:y"])
    assert [None if c is None else c.score for c in found] == [0.25, 0.5, None, 0.125]
    ages = [c.age_s for c in found if c is not None]
    assert all(0 <= age < 5 for age in ages)
    assert cache.read_errors == cache.write_errors == 0


async def test_entries_expire_after_the_route_ttl(cache: RedisScoreCache) -> None:
    written_at = time.monotonic()
    await cache.put_many("t1", "short", [1], [0.5])
    assert (await cache.get_many("t1", "short", [1]))[0] is not None
    # Polled until gone (Redis expires it; a busy machine only delays the look), and never
    # before the TTL (Redis keeps expiry times in whole ms: 10 ms of rounding allowed).
    while await cache.get_many("t1", "short", [1]) != [None]:
        assert time.monotonic() - written_at < SHORT_TTL_S + HANG_S, "the entry outlived its TTL"
        await asyncio.sleep(0.02)
    assert time.monotonic() - written_at >= SHORT_TTL_S - 0.01


async def test_tenants_never_see_each_others_answers(cache: RedisScoreCache) -> None:
    await cache.put_many("t1", ROUTE, [1], [0.9])
    assert await cache.get_many("t2", ROUTE, [1]) == [None]
    # ":" in names is escaped: tenant "a:b" + route "c" is not tenant "a" + route "b:c".
    await cache.put_many("a:b", "c", [1], [0.1])
    assert await cache.get_many("a", "b:c", [1]) == [None]
    assert [c.score for c in await cache.get_many("a:b", "c", [1]) if c is not None] == [0.1]


async def test_stalled_redis_is_all_miss_within_timeout_and_recovers(
    cache: RedisScoreCache, redis_left_running: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.put_many("t1", ROUTE, [1, 2], [0.3, 0.4])
    caplog.set_level(logging.INFO, logger="inferline.degradation.cache")
    redis_left_running.pause()
    try:
        for _ in range(3):
            found, read_s = await timed(cache.get_many("t1", ROUTE, [1, 2]))
            assert found == [None, None]
            assert read_s < HANG_S
            _, write_s = await timed(cache.put_many("t1", ROUTE, [3], [0.5]))
            assert write_s < HANG_S
    finally:
        redis_left_running.resume()
    assert cache.read_errors == 3
    assert cache.write_errors == 3
    found = await cache.get_many("t1", ROUTE, [1, 2])
    assert [c.score for c in found if c is not None] == [0.3, 0.4]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    recoveries = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert (len(warnings), len(recoveries)) == (1, 1)  # once per outage, not per call


async def test_stopped_redis_is_all_miss_and_recovers_after_restart(
    cache: RedisScoreCache, redis_left_running: RedisServer
) -> None:
    await cache.put_many("t1", ROUTE, [1], [0.3])
    redis_left_running.stop()
    found, read_s = await timed(cache.get_many("t1", ROUTE, [1, 2]))
    assert found == [None, None]
    assert read_s < HANG_S
    _, write_s = await timed(cache.put_many("t1", ROUTE, [1], [0.5]))
    assert write_s < HANG_S
    redis_left_running.start()
    await cache.put_many("t1", ROUTE, [1], [0.7])  # the restarted server kept nothing (no persistence)
    assert [c.score for c in await cache.get_many("t1", ROUTE, [1]) if c is not None] == [0.7]
