"""Reading the route's feature views whole: when a batch job does it, and the scan's rows as a matrix.

A job reads its entities' features a thousand at a time (``ONLINE_READ_ENTITIES``) and keeps
them in its ``EntityRowCache`` for the hot cache's TTL. A job that meets most of the store's
entities asks, that way, for nearly every row of the store, one indexed lookup at a time and
through the read processes' pickled requests and answers. Reading each view's table straight
through (``ReadPlan.scan``, in slices the read processes take side by side) costs about half
as much per entity: the demo store's 100,000 drivers in ~0.65 s of CPU against ~1.3 s read per
entity (December 2026, one 1M-row job, py-spy). The scanned rows fill the job's cache, with
the same TTL as rows read one by one, so what a job scores is never older than it would have
been without the scan.

``ScanPolicy`` decides: a scan is worth it when the rows still to score are at least
``SCAN_ROWS_PER_ENTITY`` times the entities a scan reads (drawn uniformly, twice as many rows
as entities meet 86 % of them), the store is one a scan can read (every view in Feast's SQLite
store, read through ``feast_direct``), and its entities fit the cache. It is made again once
the previous scan's rows have expired. Until then an entity the scan did not find takes its
features' defaults without a read (``fresh``), as a cached miss would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from inferline.core.deadline import Clock
from inferline.features.vector import EntityId

if TYPE_CHECKING:
    from inferline.features.scan import ScanPart

SCAN_ROWS_PER_ENTITY = 2
"""A scan is made when the rows still to score are at least this many per entity it would read."""

ScanMode = Literal["auto", "always", "never"]
"""``auto``: ``ScanPolicy``'s rule; ``always``: whenever the store can be scanned and fits the
cache, whatever the rows; ``never``: entities are read a thousand at a time."""


class ScanPolicy:
    """Whether a job reads its feature views whole now (one policy, no I/O: testable alone)."""

    def __init__(
        self,
        mode: ScanMode,
        ttl_s: float,
        max_entities: int,
        *,
        rows_per_entity: float = SCAN_ROWS_PER_ENTITY,
        timer: Clock = time.monotonic,
    ) -> None:
        """``ttl_s`` and ``max_entities``: the job's row cache's (the hot cache's settings); the
        scanned rows live there, so no cache (a TTL or size of 0) means no scan."""
        self._mode = mode
        self._ttl_s = ttl_s
        self._max_entities = max_entities
        self._rows_per_entity = rows_per_entity
        self._timer = timer
        self._last: float | None = None

    @property
    def possible(self) -> bool:
        """False when no scan will ever be made (``never``, or no cache): the store need not be asked."""
        return self._mode != "never" and self._ttl_s > 0 and self._max_entities > 0

    def due(self, rows_left: int | None, entities: int | None) -> bool:
        """Scan now? ``rows_left``: rows still to score (None: unknown, a CSV not yet counted);
        ``entities``: how many a scan would read (None: the store cannot be scanned)."""
        if not self.possible or not entities or entities > self._max_entities:
            return False
        if self.fresh():
            return False  # the last scan's rows are still in the cache
        if self._mode == "always":
            return True
        return rows_left is not None and rows_left >= self._rows_per_entity * entities

    def fresh(self) -> bool:
        """Within the TTL of the last scan: an entity it did not find is not in the store, as
        far as this job may know (its rows are as old as a cached read's may be), so it is not
        read again. Nor cached: a store's worth of unknown ids would evict the scan's rows."""
        return self._last is not None and self._timer() - self._last < self._ttl_s

    def scanned(self, started: float) -> None:
        """A scan that began at ``started`` (this policy's timer) filled the cache."""
        self._last = started


def scan_matrix(parts: Sequence[ScanPart], width: int) -> tuple[list[EntityId], npt.NDArray[np.float32]]:
    """The distinct entities of a scan's parts and their rows, float32 [entities, width], NaN
    where a feature has no stored value. One entity's values may come from several parts."""
    if not parts:
        return [], np.empty((0, width), dtype=np.float32)
    ids = np.concatenate([part.ids for part in parts])
    columns = np.concatenate([part.columns for part in parts])
    values = np.concatenate([part.values for part in parts])
    codes, distinct = pd.factorize(ids)
    matrix = np.full((len(distinct), width), np.nan, dtype=np.float32)
    matrix[codes, columns] = values
    entities: list[EntityId] = distinct.tolist()
    return entities, matrix
