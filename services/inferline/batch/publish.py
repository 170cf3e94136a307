"""``--publish-cache``: a job's fresh scores into the score cache the online degradation path reads.

Each entry carries the time its score was computed (not the time it was written), so the
online path ages it correctly and never serves it past the route's ``max_staleness_s``;
its TTL ends when it would turn stale (or at ``cache_ttl_s``, if sooner), so Redis drops
it by itself. A score already too old to be served is not written at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from inferline.batch.errors import BatchJobFailed
from inferline.core.config import DegradationConfig, ScoreCacheConfig
from inferline.core.deadline import Clock
from inferline.core.entities import EntityId
from inferline.degradation.cache import RedisScoreCache

logger = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 5.0
"""One pipeline of a chunk's scores: far more than the online path's few-ms cache budget."""
WRITE_ATTEMPTS = 3


class CachePublisher:
    """Writes a route's scores for one tenant to the Redis score cache."""

    def __init__(
        self,
        cache_config: ScoreCacheConfig,
        degradation: DegradationConfig,
        tenant: str,
        route: str,
        *,
        wall_clock: Clock = time.time,
    ) -> None:
        self._cache = RedisScoreCache(
            cache_config.redis_url, cache_config.key_prefix, {route: degradation.cache_ttl_s}, WRITE_TIMEOUT_S
        )
        self._degradation = degradation
        self._tenant = tenant
        self._route = route
        self._clock = wall_clock
        self.published = 0
        self.stale = 0

    async def publish(self, ids: Sequence[EntityId], scores: Sequence[float], computed_at: float) -> None:
        """Write ``scores`` computed at ``computed_at`` (epoch seconds).

        Raises:
            BatchJobFailed: Redis refused the write ``WRITE_ATTEMPTS`` times in a row.
        """
        age_s = max(0.0, self._clock() - computed_at)
        ttl_s = min(self._degradation.cache_ttl_s, self._degradation.max_staleness_s - age_s)
        if ttl_s <= 0:
            self.stale += len(ids)
            return
        for _ in range(WRITE_ATTEMPTS):
            if await self._cache.put_computed(
                self._tenant, self._route, ids, scores, computed_at=computed_at, ttl_s=ttl_s
            ):
                self.published += len(ids)
                return
        raise BatchJobFailed(f"score cache: {WRITE_ATTEMPTS} writes in a row failed; resume when Redis is back")

    async def close(self) -> None:
        await self._cache.close()
