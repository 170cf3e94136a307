"""``HotCache``: recently fetched feature rows of hot entities, reused for a short TTL."""

from __future__ import annotations

import time
from collections.abc import Sequence

import cachetools
import numpy as np
import numpy.typing as npt

from inferline.core.deadline import Clock
from inferline.features.vector import EntityId

Row = npt.NDArray[np.float32]
"""One entity's stored-feature values, in the view set's ref order; NaN where missing."""


class HotCache:
    """A bounded TTL cache of feature rows of one view set, keyed by entity id.

    One instance per view set (join key + feature refs) rather than one shared cache keyed
    by ``(view set, id)``: hashing and comparing a tuple key costs about as much again as
    the lookup itself, and lookups are the whole cost of an all-hit request. The bound
    therefore applies per view set. Rows known to be missing (all NaN) are cached too, so
    unknown entities do not reach the store on every request.

    Eviction is cachetools' ``TTLCache``: expired entries first, then least recently used.
    A TTL or size of 0 disables caching: ``get_many`` misses, ``put_many`` drops.
    """

    def __init__(self, ttl_s: float, max_entities: int, timer: Clock = time.monotonic) -> None:
        self._cache: cachetools.TTLCache[EntityId, Row] | None = None
        if ttl_s > 0 and max_entities > 0:
            self._cache = cachetools.TTLCache(maxsize=max_entities, ttl=ttl_s, timer=timer)

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return 0 if self._cache is None else len(self._cache)

    def get_many(self, ids: Sequence[EntityId]) -> tuple[list[Row | None], int]:
        """The cached row of each id (None on a miss), and the number of misses."""
        cache = self._cache
        if cache is None:
            return [None] * len(ids), len(ids)
        rows: list[Row | None] = []
        misses = 0
        # Freezing the timer reads the clock once per request instead of once per entity.
        with cache.timer:
            for entity in ids:
                try:
                    rows.append(cache[entity])
                except KeyError:
                    rows.append(None)
                    misses += 1
        return rows, misses

    def put_many(self, ids: Sequence[EntityId], rows: Sequence[Row]) -> None:
        """Store freshly fetched rows; each starts a new TTL."""
        cache = self._cache
        if cache is None:
            return
        with cache.timer:
            for entity, row in zip(ids, rows, strict=True):
                cache[entity] = row
