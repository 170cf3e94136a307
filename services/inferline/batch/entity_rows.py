"""``EntityRowCache``: the batch job's cache of fetched feature rows, looked up a chunk at a time.

The online path's ``HotCache`` (cachetools' ``TTLCache``) looks entities up and stores them
one at a time through Python methods, which suits a request of a few entities. A batch job
asks for thousands per chunk: there that per-entity Python cost about a fifth of the job
process's CPU (py-spy, 200,000 rows; the job process, not Triton or Feast, was what bounded
its rate). Here a chunk's ids go through a plain dict with ``map`` (C speed, no Python
frame per entity) to slots of one NumPy matrix, and expiry is one vectorised comparison.

Same settings as the online cache: rows expire ``ttl_s`` after they were stored, at most
``max_entities`` are kept (past that the oldest half is dropped: a job streams through its
input, so the oldest rows are the least likely to be asked for again), and a TTL or size of
0 disables caching.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from inferline.core.deadline import Clock
from inferline.features.vector import EntityId

_ABSENT = -1


class EntityRowCache:
    """Feature rows (``width`` float32 values each) by entity id, with a TTL and a size bound."""

    def __init__(self, ttl_s: float, max_entities: int, width: int, timer: Clock = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max = max_entities if ttl_s > 0 else 0
        self._timer = timer
        self._slots: dict[EntityId, int] = {}
        self._entities: list[EntityId] = []
        """The entity of each slot (``_slots`` inverted)."""
        self._rows = np.empty((0, width), dtype=np.float32)
        self._stored_at = np.empty(0, dtype=np.float64)

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, ids: Sequence[EntityId]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The cached row of each id (rows [len(ids), width]; a miss's row is NaN) and the hit mask."""
        n = len(ids)
        rows = np.full((n, self._rows.shape[1]), np.nan, dtype=np.float32)
        if not self._slots or not n:
            return rows, np.zeros(n, dtype=bool)
        slots = np.fromiter(map(self._slots.get, ids, itertools.repeat(_ABSENT)), dtype=np.int64, count=n)
        hit = slots != _ABSENT
        hit[hit] = self._stored_at[slots[hit]] > self._timer() - self._ttl_s
        rows[hit] = self._rows[slots[hit]]
        return rows, hit

    def replace(self, ids: Sequence[EntityId], rows: npt.NDArray[np.float32]) -> bool:
        """Hold exactly ``ids``' ``rows`` (distinct ids), each starting a new TTL: a read of the
        whole store supersedes every row read before it. False, and the cache unchanged, when
        they are more than it may hold (storing them would drop some at once)."""
        if not self.enabled or len(ids) > self._max:
            return False
        self._slots, self._entities = {}, []
        self._rows = self._rows[:0]
        self._stored_at = self._stored_at[:0]
        self.store(ids, rows)
        return True

    def store(self, ids: Sequence[EntityId], rows: npt.NDArray[np.float32]) -> None:
        """Keep freshly read ``rows`` (aligned with ``ids``, which are distinct); each starts a new TTL."""
        n = len(ids)
        if not self.enabled or not n:
            return
        now = self._timer()
        slots = np.fromiter(map(self._slots.get, ids, itertools.repeat(_ABSENT)), dtype=np.int64, count=n)
        known = slots != _ABSENT
        self._rows[slots[known]] = rows[known]
        self._stored_at[slots[known]] = now
        new = np.flatnonzero(~known)[: self._max]
        if not len(new):
            return
        if len(self._slots) + len(new) > self._max:
            self._drop_oldest(keep=max(0, min(self._max // 2, self._max - len(new))))
        first = len(self._slots)
        added = [ids[i] for i in new.tolist()]
        self._slots.update(zip(added, range(first, first + len(new)), strict=True))
        self._entities.extend(added)
        self._rows = np.concatenate([self._rows[:first], rows[new]])
        self._stored_at = np.concatenate([self._stored_at[:first], np.full(len(new), now)])

    def _drop_oldest(self, keep: int) -> None:
        """Keep the ``keep`` most recently stored rows, renumbered from slot 0."""
        order = np.argsort(self._stored_at, kind="stable")[len(self._stored_at) - keep :]
        self._entities = [self._entities[slot] for slot in order.tolist()]
        self._slots = dict(zip(self._entities, range(keep), strict=True))
        self._rows = self._rows[order]
        self._stored_at = self._stored_at[order]
