"""``EntityRowCache``: the batch job's cache of fetched feature rows, looked up a chunk at a time.

The online path's ``HotCache`` (cachetools' ``TTLCache``) looks entities up and stores them
one at a time through Python methods, which suits a request of a few entities. A batch job
asks for thousands per chunk: there that per-entity Python cost about a fifth of the job
process's CPU (py-spy, 200,000 rows; the job process, not Triton or Feast, was what bounded
its rate). Here a chunk's ids are found as slots of one NumPy matrix all at once — int64
ids by binary search over a sorted array, others through a plain dict with ``map`` — and
expiry is one vectorised comparison.

Same settings as the online cache: rows expire ``ttl_s`` after they were stored, at most
``max_entities`` are kept (past that the oldest half is dropped: a job streams through its
input, so the oldest rows are the least likely to be asked for again), and a TTL or size of
0 disables caching.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from inferline.core.deadline import Clock
from inferline.features.vector import EntityId

_ABSENT = -1
Ids = Sequence[EntityId] | npt.NDArray[Any]
"""A chunk's entity ids: a list, or an array (int64, or object for strings)."""


def _as_list(ids: Ids) -> Sequence[EntityId]:
    """``ids`` as Python objects, as a dict is keyed (an array's items would be NumPy scalars)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else ids


class _DictSlots:
    """Slots by id in a dict, for ids of any kind (strings): one Python lookup per id, through
    ``map`` (no Python frame per id)."""

    def __init__(self) -> None:
        self._slots: dict[EntityId, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def find(self, ids: Ids) -> npt.NDArray[np.int64]:
        keys = _as_list(ids)
        return np.fromiter(map(self._slots.get, keys, itertools.repeat(_ABSENT)), dtype=np.int64, count=len(keys))

    def add(self, ids: Ids, slots: npt.NDArray[np.int64]) -> None:
        self._slots.update(zip(_as_list(ids), slots.tolist(), strict=True))

    def reset(self, ids: Ids) -> None:
        """Hold exactly ``ids``, at slots 0, 1, …"""
        keys = _as_list(ids)
        self._slots = dict(zip(keys, range(len(keys)), strict=True))


class _IntSlots:
    """Slots of int64 ids, found a chunk at a time with no Python object per id.

    Ids that lie close together (a span of at most ``DENSE_SPAN_PER_ID`` per id held, as a
    store's surrogate keys do) are found by indexing one array of slots by ``id - lowest``.
    Others by binary search (``searchsorted``) over the sorted ids, the chunk's ids sorted
    first. A dict lookup per id cost 3–4 ms of the event loop per chunk of 8,192 distinct
    drivers, and a search of them unsorted 1.5 ms (cache misses), against 0.5 ms sorted and
    0.03 ms by index: time in which no request of the job went to Triton. New ids are merged
    in with ``np.insert``: one copy of the arrays, no sort of all of them."""

    DENSE_SPAN_PER_ID = 4
    MAX_DENSE_SPAN = 1 << 22
    """At most 32 MiB of index (int64 slots)."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.int64)
        self._slots = np.empty(0, dtype=np.int64)
        self._dense: npt.NDArray[np.int64] | None = None
        self._dense_fresh = False

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, ids: Ids) -> npt.NDArray[np.int64]:
        wanted = np.asarray(ids, dtype=np.int64)
        if not len(self._keys):
            return np.full(len(wanted), _ABSENT, dtype=np.int64)
        dense = self._dense_index()
        if dense is not None:
            low, high = self._keys[0], self._keys[-1]
            inside = (wanted >= low) & (wanted <= high)
            # Outside the range ``wanted - low`` may wrap around; those places are masked out.
            return np.where(inside, dense[np.where(inside, wanted - low, 0)], _ABSENT)
        order = np.argsort(wanted, kind="stable")
        in_order = wanted[order]
        at = np.minimum(np.searchsorted(self._keys, in_order), len(self._keys) - 1)
        found = np.empty(len(wanted), dtype=np.int64)
        found[order] = np.where(self._keys[at] == in_order, self._slots[at], _ABSENT)
        return found

    def add(self, ids: Ids, slots: npt.NDArray[np.int64]) -> None:
        """``ids``: distinct, none held yet."""
        new = np.asarray(ids, dtype=np.int64)
        order = np.argsort(new, kind="stable")
        new_sorted = new[order]
        at = np.searchsorted(self._keys, new_sorted)
        self._keys = np.insert(self._keys, at, new_sorted)
        self._slots = np.insert(self._slots, at, slots[order])
        self._dense_fresh = False

    def reset(self, ids: Ids) -> None:
        """Hold exactly ``ids`` (distinct), at slots 0, 1, …"""
        keys = np.asarray(ids, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys, self._slots = keys[order], order.astype(np.int64)
        self._dense_fresh = False

    def _dense_index(self) -> npt.NDArray[np.int64] | None:
        """Slot by ``id - lowest id`` (``_ABSENT`` in the gaps) when the ids are close enough
        together, else None. Rebuilt after a change, on the next find."""
        if not self._dense_fresh:
            self._dense_fresh = True
            self._dense = None
            span = int(self._keys[-1]) - int(self._keys[0]) + 1
            if span <= min(self.DENSE_SPAN_PER_ID * len(self._keys), self.MAX_DENSE_SPAN):
                self._dense = np.full(span, _ABSENT, dtype=np.int64)
                self._dense[self._keys - self._keys[0]] = self._slots
        return self._dense


class EntityRowCache:
    """Feature rows (``width`` float32 values each) by entity id, with a TTL and a size bound."""

    def __init__(
        self, ttl_s: float, max_entities: int, width: int, timer: Clock = time.monotonic, *, int_ids: bool = False
    ) -> None:
        """``int_ids``: every id is an int64 (the route's entity type), so they are found by
        binary search over a sorted array (``_IntSlots``) instead of a dict."""
        self._ttl_s = ttl_s
        self._max = max_entities if ttl_s > 0 else 0
        self._timer = timer
        self._slots: _IntSlots | _DictSlots = _IntSlots() if int_ids else _DictSlots()
        self._entities: npt.NDArray[Any] = np.empty(0, dtype=np.int64 if int_ids else object)
        """The entity of each slot (``_slots`` inverted)."""
        self._rows = np.empty((0, width), dtype=np.float32)
        self._stored_at = np.empty(0, dtype=np.float64)

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, ids: Ids) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The cached row of each id (rows [len(ids), width]; a miss's row is NaN) and the hit mask."""
        n = len(ids)
        rows = np.full((n, self._rows.shape[1]), np.nan, dtype=np.float32)
        if not len(self._slots) or not n:
            return rows, np.zeros(n, dtype=bool)
        slots = self._slots.find(ids)
        hit = slots != _ABSENT
        hit[hit] = self._stored_at[slots[hit]] > self._timer() - self._ttl_s
        rows[hit] = self._rows[slots[hit]]
        return rows, hit

    def replace(self, ids: Ids, rows: npt.NDArray[np.float32]) -> bool:
        """Hold exactly ``ids``' ``rows`` (distinct ids), each starting a new TTL: a read of the
        whole store supersedes every row read before it. False, and the cache unchanged, when
        they are more than it may hold (storing them would drop some at once)."""
        if not self.enabled or len(ids) > self._max:
            return False
        self._slots.reset(self._entities[:0])
        self._entities = self._entities[:0]
        self._rows = self._rows[:0]
        self._stored_at = self._stored_at[:0]
        self.store(ids, rows)
        return True

    def store(self, ids: Ids, rows: npt.NDArray[np.float32]) -> None:
        """Keep freshly read ``rows`` (aligned with ``ids``, which are distinct); each starts a new TTL."""
        n = len(ids)
        if not self.enabled or not n:
            return
        now = self._timer()
        slots = self._slots.find(ids)
        known = slots != _ABSENT
        self._rows[slots[known]] = rows[known]
        self._stored_at[slots[known]] = now
        new = np.flatnonzero(~known)[: self._max]
        if not len(new):
            return
        if len(self._slots) + len(new) > self._max:
            self._drop_oldest(keep=max(0, min(self._max // 2, self._max - len(new))))
        first = len(self._slots)
        added = np.asarray(ids, dtype=self._entities.dtype)[new]
        self._slots.add(added, np.arange(first, first + len(new), dtype=np.int64))
        self._entities = np.concatenate([self._entities[:first], added])
        self._rows = np.concatenate([self._rows[:first], rows[new]])
        self._stored_at = np.concatenate([self._stored_at[:first], np.full(len(new), now)])

    def _drop_oldest(self, keep: int) -> None:
        """Keep the ``keep`` most recently stored rows, renumbered from slot 0."""
        order = np.argsort(self._stored_at, kind="stable")[len(self._stored_at) - keep :]
        self._entities = self._entities[order]
        self._slots.reset(self._entities)
        self._rows = self._rows[order]
        self._stored_at = self._stored_at[order]
