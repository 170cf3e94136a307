"""``ScoreCache``: recent good scores per (tenant, route, entity), in memory or in Redis.

A cache is a degradation aid, never a dependency: reads that fail or are slower than
the cache's timeout count as misses, writes are best effort, and neither raises.
Entries are namespaced by tenant, so one tenant never sees another tenant's answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from inferline.core.deadline import Clock
from inferline.core.entities import EntityId
from inferline.core.redis_client import fail_fast_redis

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 3600.0
"""TTL of a route missing from ``ttl_s_by_route`` (the config default of ``cache_ttl_s``)."""

OUTAGE_AFTER_FAILURES = 3
"""Consecutive failed calls that make an outage (logged); a lone slow call is only counted."""


@dataclass(frozen=True, slots=True)
class CachedScore:
    """A cached score and how old it is (seconds since it was written)."""

    score: float
    age_s: float


class ScoreCache(Protocol):
    """Recent good scores; implementations never raise from ``get_many`` or ``put_many``."""

    async def get_many(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[CachedScore | None]:
        """One entry per id, in order: the cached score, or None (absent, expired or unreadable)."""
        ...

    async def put_many(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        """Store ``scores[i]`` for ``ids[i]`` with the route's TTL (best effort)."""
        ...

    async def close(self) -> None: ...


class WriteBehind:
    """Writes to a ``ScoreCache`` from one background task, off the caller's path.

    ``submit`` only appends to a bounded queue (no task per write: at thousands of
    requests a second, a task each was a measurable share of the router's CPU). One
    drainer task takes everything queued, merges it per (tenant, route) into a single
    ``put_many`` (one Redis pipeline instead of one per request) and repeats.

    Invariants: at most ``max_pending`` writes queued (``submit`` drops and counts the
    rest, and everything after ``close``); each ``put_many`` is bounded by ``timeout_s``,
    so a hung cache cannot stall the drainer for long; failures are counted in ``errors``.
    """

    def __init__(self, cache: ScoreCache, max_pending: int, timeout_s: float) -> None:
        self._cache = cache
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self._queue: collections.deque[tuple[str, str, list[EntityId], list[float]]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        self.errors = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, tenant: str, route: str, ids: list[EntityId], scores: list[float]) -> None:
        """Queue a write (needs a running loop); never blocks, never raises for the cache."""
        if self._closed or len(self._queue) >= self._max_pending:
            self.dropped += 1
            return
        self._queue.append((tenant, route, ids, scores))
        if self._drainer is None:
            # Made inside the running loop, not in __init__ (asyncio primitives bind to it).
            self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="score-writes")
        assert self._wakeup is not None and self._idle is not None
        self._idle.clear()
        self._wakeup.set()

    async def _drain(self) -> None:
        assert self._wakeup is not None and self._idle is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._write_batch(self._take_all())
            self._idle.set()

    def _take_all(self) -> dict[tuple[str, str], tuple[list[EntityId], list[float]]]:
        merged: dict[tuple[str, str], tuple[list[EntityId], list[float]]] = {}
        while self._queue:
            tenant, route, ids, scores = self._queue.popleft()
            batch = merged.setdefault((tenant, route), ([], []))
            batch[0].extend(ids)
            batch[1].extend(scores)
        return merged

    async def _write_batch(self, merged: dict[tuple[str, str], tuple[list[EntityId], list[float]]]) -> None:
        for (tenant, route), (ids, scores) in merged.items():
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._cache.put_many(tenant, route, ids, scores)
            except Exception:
                self.errors += 1
                logger.debug("score cache write failed", exc_info=True)

    async def close(self, grace_s: float) -> None:
        """Refuse new writes, let queued ones go out for ``grace_s`` at most, then stop."""
        self._closed = True
        if self._drainer is None:
            return
        assert self._idle is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        self.dropped += len(self._queue)
        self._queue.clear()
        self._drainer.cancel()
        await asyncio.gather(self._drainer, return_exceptions=True)


_Key = tuple[str, str, EntityId]
_Entry = tuple[float, float, float]  # score, written_at, expires_at (cache clock)


class InMemoryScoreCache:
    """Process-local cache (embedded topology): bounded, per-route TTL, never suspends.

    Policy: an entry lives ``ttl_s_by_route[route]`` after its last write. When
    ``max_entries`` is exceeded the least recently *written* entry goes first (reads do
    not refresh it), as ``ScoreCacheConfig.max_entries`` documents; expired entries are
    dropped when read or when they reach the front. Not cachetools: its ``TLRUCache``
    (per-key TTL) is LRU by read and measured 2.7 µs per get / 3.6 µs per put here,
    against ~0.1 µs for this OrderedDict, and ``put_many`` runs on every good answer.
    """

    def __init__(self, max_entries: int, ttl_s_by_route: Mapping[str, float], clock: Clock = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._ttl_s = dict(ttl_s_by_route)
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[CachedScore | None]:
        now = self._clock()
        entries = self._entries
        found: list[CachedScore | None] = []
        for entity in ids:
            key = (tenant, route, entity)
            entry = entries.get(key)
            if entry is not None and entry[2] > now:
                found.append(CachedScore(entry[0], now - entry[1]))  # one clock: age ≥ 0
                continue
            if entry is not None:
                del entries[key]  # expired
            found.append(None)
        return found

    async def put_many(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        now = self._clock()
        expires_at = now + self._ttl_s.get(route, DEFAULT_TTL_S)
        entries = self._entries
        for entity, score in zip(ids, scores, strict=True):
            key = (tenant, route, entity)
            entries[key] = (float(score), now, expires_at)
            entries.move_to_end(key)  # a rewrite makes it the most recently written
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


def _escape(name: str) -> str:
    """A key segment with ``:`` escaped, so tenant ``a:b`` + route ``c`` ≠ tenant ``a`` + route ``b:c``."""
    return name.replace("%", "%25").replace(":", "%3A") if (":" in name or "%" in name) else name


class RedisScoreCache:
    """Cache shared by replicas (suite topology) in Redis, via ``redis.asyncio``.

    Keys are ``{prefix}:{tenant}:{route}:{entity}`` (tenant and route with ``:`` escaped);
    a value is ``b"<score>,<written_at>"``. Reads are one ``MGET``, writes one pipeline of
    ``SET … PX`` (PX: TTLs may be fractional seconds). Both are bounded twice by
    ``timeout_s``: socket timeouts in redis-py (no retries, so one timeout is the whole
    cost) and an asyncio timeout around the call, so a stalled (SIGSTOPped) Redis costs
    a caller at most ``timeout_s``. A failure is a miss / a dropped write, counted in
    ``read_errors`` / ``write_errors``. An outage (``OUTAGE_AFTER_FAILURES`` failures in
    a row) is logged when it starts and when it ends, not per call: with a 5 ms timeout
    a lone slow call on a loaded host is routine, not news. A write that timed out may
    still land later (it was sent), even over a newer one; the value carries its write
    time, so such an entry only reads as older than it could be.
    """

    def __init__(
        self,
        url: str,
        key_prefix: str,
        ttl_s_by_route: Mapping[str, float],
        timeout_s: float,
        *,
        wall_clock: Clock = time.time,
    ) -> None:
        self._url = url
        self._prefix = key_prefix
        self._ttl_s = dict(ttl_s_by_route)
        self._timeout_s = timeout_s
        # Wall-clock epoch seconds, not monotonic: the write time is read back by other
        # replicas (other processes and hosts), and only wall-clock time is shared.
        self._wall_clock = wall_clock
        self._client: aioredis.Redis | None = None
        self._key_heads: dict[tuple[str, str], str] = {}
        self._failures_in_row = 0
        self.read_errors = 0
        self.write_errors = 0

    def _redis(self) -> aioredis.Redis:
        """The client, created on first use inside the running loop; it stays bound to that loop."""
        if self._client is None:
            self._client = fail_fast_redis(self._url, self._timeout_s)
        return self._client

    def _keys(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[str]:
        head = self._key_heads.get((tenant, route))
        if head is None:
            head = f"{self._prefix}:{_escape(tenant)}:{_escape(route)}:"
            if len(self._key_heads) < 1024:  # few (tenant, route) pairs exist; bound it anyway
                self._key_heads[(tenant, route)] = head
        return [f"{head}{entity}" for entity in ids]

    async def get_many(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[CachedScore | None]:
        if not ids:
            return []
        keys = self._keys(tenant, route, ids)
        try:
            async with asyncio.timeout(self._timeout_s):
                values = await self._redis().mget(keys)
        except Exception as err:  # any failure is a miss; CancelledError (BaseException) passes
            self.read_errors += 1
            self._outage(err)
            return [None] * len(ids)
        self._recovered()
        now = self._wall_clock()
        return [_decode(value, now) for value in values]

    async def put_many(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        if ids:
            ttl_s = self._ttl_s.get(route, DEFAULT_TTL_S)
            await self._write(tenant, route, ids, scores, written_at=self._wall_clock(), ttl_s=ttl_s)

    async def put_computed(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        scores: Sequence[float],
        *,
        computed_at: float,
        ttl_s: float,
    ) -> bool:
        """Store scores computed elsewhere (a batch job) with their computation time, not now.

        ``computed_at``: wall-clock epoch seconds the scores were computed at, so readers age
        them from then (and never serve them past their route's ``max_staleness_s``);
        ``ttl_s``: how long the entries live. Unlike ``put_many`` the caller learns whether
        the write landed (True), to count or retry it; it still never raises.
        """
        if not ids:
            return True
        return await self._write(tenant, route, ids, scores, written_at=computed_at, ttl_s=ttl_s)

    async def _write(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        scores: Sequence[float],
        *,
        written_at: float,
        ttl_s: float,
    ) -> bool:
        """One pipelined SET per entity (``score,written_at``, expiring after ``ttl_s``); False on failure."""
        written = f"{written_at:.3f}"
        ttl_ms = max(1, int(ttl_s * 1000))
        try:
            async with asyncio.timeout(self._timeout_s):
                pipe = self._redis().pipeline(transaction=False)
                for key, score in zip(self._keys(tenant, route, ids), scores, strict=True):
                    pipe.set(key, f"{float(score)!r},{written}", px=ttl_ms)
                await pipe.execute()
        except Exception as err:
            self.write_errors += 1
            self._outage(err)
            return False
        self._recovered()
        return True

    def _outage(self, err: Exception) -> None:
        self._failures_in_row += 1
        if self._failures_in_row == OUTAGE_AFTER_FAILURES:
            logger.warning("score cache %s unavailable (%r); reads are misses until it recovers", self._url, err)

    def _recovered(self) -> None:
        if self._failures_in_row >= OUTAGE_AFTER_FAILURES:
            logger.info("score cache %s recovered", self._url)
        self._failures_in_row = 0

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _decode(value: bytes | str | None, now: float) -> CachedScore | None:
    """``b"<score>,<written_at>"`` → CachedScore; anything unreadable is a miss."""
    if value is None:
        return None
    try:
        score, written_at = (value.encode() if isinstance(value, str) else value).split(b",", 1)
        return CachedScore(float(score), max(0.0, now - float(written_at)))  # replicas' clocks may skew
    except ValueError:
        return None
