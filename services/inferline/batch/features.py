"""A chunk's feature matrix: Feast's offline store as of each row's time, or the online store in bulk.

Point-in-time (``get_historical_features``) when the job has event times: each row gets
the values its entity had at that time (within the view's TTL), as a model trained on
history would have seen them. Otherwise the latest values, from the online store, many
entities per read. Request-time features come from the input's columns. A value that is
missing either way takes the feature's default and is flagged, as on the online path.

A job that meets most of the store's entities reads the route's views whole instead, into the
same cache (``view_scan``).

Online reads run in ``processes`` worker processes (``feature_workers.py``) when it is 2 or
more: Feast's read is mostly per-entity Python, and on the job's one read thread it held
the GIL for most of a run and capped the job's rate far below Triton's. With 0 or 1 they
run on one thread of the job's process (``FeastOnlineStore``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from inferline.batch.entity_rows import EntityRowCache, Ids
from inferline.batch.feature_workers import FeatureReadPool, as_matrix
from inferline.batch.rows import ParsedChunk
from inferline.batch.view_scan import ScanMode, ScanPolicy, scan_matrix
from inferline.core.config import FeatureStoreConfig, RouteConfig
from inferline.core.entities import EntityId, probe_id
from inferline.features.store import FeastOnlineStore

logger = logging.getLogger(__name__)

ONLINE_READ_ENTITIES = 1000
"""Entities per online read (the online path's own bound on one store read)."""
_ROW_ID = "__inferline_row"


class BatchFeatures:
    """Fetches a route's features for parsed chunks; ``offline`` picks the point-in-time path."""

    def __init__(
        self,
        route: RouteConfig,
        store: FeatureStoreConfig,
        *,
        offline: bool,
        processes: int = 0,
        scan: ScanMode = "auto",
        rows: int | None = None,
    ) -> None:
        """``store``: the Feast repository, and the hot cache's TTL and size. ``processes``:
        worker processes for online reads; 0 or 1: a thread of this process. ``scan``: when the
        route's views are read whole (``view_scan``); ``rows``: the rows the job will ask
        features of (None: unknown). Blocking (it starts the workers, or imports Feast): run it
        in a thread."""
        self._route = route
        self._offline = offline
        self._names = [f.name for f in route.features]
        self._defaults = np.array([f.default for f in route.features], dtype=np.float32)
        self._refs = list(dict.fromkeys(f.source for f in route.features if f.source is not None))
        self._store_features = [(i, f.source) for i, f in enumerate(route.features) if f.source is not None]
        self._request = [(i, f.name) for i, f in enumerate(route.features) if f.source is None]
        # Feast only when the route has store features: importing it takes seconds.
        self._historical: Any = None
        if offline and self._refs:
            import feast

            self._historical = feast.FeatureStore(repo_path=str(store.feast_repo))
        self._online: FeastOnlineStore | None = None
        self._pool: FeatureReadPool | None = None
        if not offline and self._refs and processes > 1:
            self._pool = FeatureReadPool(str(store.feast_repo), processes)
            try:
                self._pool.start(self._refs, route.entity.join_key, probe_id(route.entity))
            except BaseException:
                self._pool.close()
                raise
        elif not offline and self._refs:
            self._online = FeastOnlineStore(store.feast_repo, inline_small_reads=False)
        # The online path's hot-cache settings: an entity met again within the TTL (a file of
        # rows per trip, not per driver) is not read from the store again.
        self._string_ids = route.entity.type == "string"
        self._cache = EntityRowCache(
            store.hot_cache_ttl_s, store.hot_cache_max_entities, len(self._refs), int_ids=not self._string_ids
        )
        self._scan_policy = ScanPolicy(scan, store.hot_cache_ttl_s, store.hot_cache_max_entities)
        self._scan_lock = asyncio.Lock()
        self._rows_left = rows
        self._scan_entities: int | None = None
        self._scan_checked = False
        self._scans = 0
        self._scanned = 0
        self._read = 0

    @property
    def names(self) -> list[str]:
        return self._names

    @property
    def offline(self) -> bool:
        return self._offline

    @property
    def read_pids(self) -> list[int]:
        """The feature read processes (none when reads run in this process)."""
        return [] if self._pool is None else self._pool.pids

    def summary(self) -> dict[str, int]:
        """Entities read one by one (a thousand a read) and by whole-view scans, and the scans."""
        return {"entities_read": self._read, "view_scans": self._scans, "entities_scanned": self._scanned}

    async def matrix(self, chunk: ParsedChunk) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """``values`` float32 [rows, features] (route order) and ``defaulted`` bool of the same shape."""
        n = len(chunk.ids)
        values = np.full((n, len(self._names)), np.nan, dtype=np.float32)
        if n and self._refs:
            fetched = await (self._historical_columns(chunk) if self._offline else self._online_columns(chunk.ids))
            for i, ref in self._store_features:
                values[:, i] = fetched[ref]
        for i, name in self._request:
            given = chunk.request_features.get(name)
            if given is not None:
                values[:, i] = given
        defaulted = np.isnan(values)
        values = np.where(defaulted, self._defaults[np.newaxis, :], values).astype(np.float32)
        return values, defaulted

    async def _online_columns(self, ids: Ids) -> dict[str, npt.NDArray[np.float32]]:
        """Latest values: each distinct entity of the chunk looked up once, in the job's cache
        first, the misses read ``ONLINE_READ_ENTITIES`` per read: all at once across the
        worker processes, or one after another on the in-process thread."""
        if self._scan_policy.possible:
            await self._scan_if_due()
        if self._rows_left is not None:
            self._rows_left -= len(ids)
        # One vectorised pass for the distinct ids and each row's position among them.
        codes, distinct = pd.factorize(np.asarray(ids, dtype=object if self._string_ids else np.int64))
        table, hit = self._cache.lookup(distinct)
        missing_at = np.flatnonzero(~hit)
        if self._scan_policy.fresh():  # the store was read whole: what it did not hold, it does not hold
            missing_at = missing_at[:0]
        missing: list[EntityId] = distinct[missing_at].tolist()
        step = ONLINE_READ_ENTITIES
        parts = [missing[start : start + step] for start in range(0, len(missing), step)]
        if self._pool is not None:
            pool, join_key = self._pool, self._route.entity.join_key
            matrices = await asyncio.gather(*(pool.read(self._refs, join_key, part) for part in parts))
        else:
            matrices = [await self._read_here(part) for part in parts]
        if parts:
            fetched = np.concatenate(matrices)
            table[missing_at] = fetched
            self._cache.store(missing, fetched)
            self._read += len(missing)
        return {ref: table[codes, j] for j, ref in enumerate(self._refs)}

    async def _scan_if_due(self) -> None:
        """Read the route's views whole into the cache when ``ScanPolicy`` says so. Under a
        lock: the chunks being fetched meanwhile wait for the scan rather than read alone."""
        async with self._scan_lock:
            refs, join_key = self._refs, self._route.entity.join_key
            if not self._scan_checked:
                self._scan_checked = True
                if self._pool is not None:
                    self._scan_entities = await self._pool.scan_entities(refs, join_key)
                elif self._online is not None:
                    self._scan_entities = await self._online.on_read_thread(
                        self._online.scan_entities_blocking, refs, join_key
                    )
            if not self._scan_policy.due(self._rows_left, self._scan_entities):
                return
            started = time.monotonic()
            if self._pool is not None:
                parts = await self._pool.scan(refs, join_key)
            else:
                assert self._online is not None
                parts = [await self._online.on_read_thread(self._online.scan_blocking, refs, join_key, 0, 1)]
            ids, rows = scan_matrix(parts, len(refs))
            self._scan_entities = len(ids)  # what the next decision goes by: the store may have grown
            if not self._cache.replace(ids, rows):
                logger.info("the store now holds %d entities, more than the cache: read as needed", len(ids))
                return
            self._scan_policy.scanned(started)
            self._scans += 1
            self._scanned += len(ids)
            logger.info(
                "read %d entities of %s whole in %.2f s (%d rows still to score)",
                len(ids), ", ".join(refs), time.monotonic() - started, self._rows_left or 0,
            )  # fmt: skip

    async def _read_here(self, part: list[EntityId]) -> npt.NDArray[np.float32]:
        assert self._online is not None
        read = await self._online.read(self._refs, self._route.entity.join_key, part)
        return as_matrix(self._refs, read)

    async def _historical_columns(self, chunk: ParsedChunk) -> dict[str, npt.NDArray[np.float32]]:
        # Feast's file offline store answers one row per distinct (entity, time), so ask for
        # each distinct pair once and join the answer back onto the chunk's rows.
        assert chunk.timestamps is not None
        join_key = self._route.entity.join_key
        # Microseconds: Feast converts times to Python datetimes, which hold no nanoseconds.
        rows = pd.DataFrame({join_key: chunk.ids, "event_timestamp": chunk.timestamps.floor("us")})
        rows[_ROW_ID] = np.arange(len(rows))
        pairs = rows[[join_key, "event_timestamp"]].drop_duplicates(ignore_index=True)
        answer = await asyncio.to_thread(self._historical_frame, pairs)
        answer["event_timestamp"] = pd.to_datetime(answer["event_timestamp"], utc=True).dt.as_unit("ns")
        answer = answer.drop_duplicates([join_key, "event_timestamp"])
        merged = rows.merge(answer, on=[join_key, "event_timestamp"], how="left").sort_values(_ROW_ID)
        return {
            ref: merged[ref.replace(":", "__", 1)].to_numpy(dtype=np.float32, na_value=np.nan) for ref in self._refs
        }

    def _historical_frame(self, pairs: pd.DataFrame) -> pd.DataFrame:
        job = self._historical.get_historical_features(entity_df=pairs, features=self._refs, full_feature_names=True)
        frame: pd.DataFrame = job.to_df()
        return frame

    async def close(self) -> None:
        if self._online is not None:
            await self._online.close()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
