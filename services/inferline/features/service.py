"""``FeaturesService``: a route's feature matrix from the hot cache, the online store and the request.

Per request: validate, look every entity up in the hot cache, and only for the misses
wait (until the deadline at most) on a coalesced store read. Whatever did not arrive in
time is replaced by the feature's default, flagged, and the answer is marked degraded;
the read itself is never cancelled and fills the cache when it completes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from inferline.core.config import FeatureStoreConfig, RouteConfig
from inferline.core.deadline import Clock, Deadline
from inferline.core.entities import check_entity_ids, probe_id
from inferline.core.errors import InvalidInput, RouteNotFound, echo
from inferline.features.hot_cache import HotCache, Row
from inferline.features.store import OnlineStore
from inferline.features.vector import EntityId, FeatureVector

logger = logging.getLogger(__name__)

MAX_BATCH_ENTITIES = 1000
"""Most entities in one store read, so that one read's latency stays bounded under load."""

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_COLUMN_SETS = 64

Columns = slice | npt.NDArray[np.intp]
"""Column selection: a slice when the columns are adjacent, else an index array."""

RowFuture = asyncio.Future[Row | None]
"""Resolves to an entity's row, or None when the store read failed (never to an exception)."""


class ViewSetCounts(NamedTuple):
    """What one view set's hot cache and store reads have counted since start."""

    views: str
    """The feature views read, comma-separated."""
    lookups: int
    """Entities looked up in the hot cache."""
    misses: int
    """Lookups that missed (the entity then waited on a store read)."""
    store_reads: int
    """Reads of the online store (each for up to ``MAX_BATCH_ENTITIES`` entities)."""
    store_entities: int
    """Entities those reads asked for."""


class _Fetcher:
    """Single-flight, coalescing reader of one view set (join key + refs) with its hot cache.

    Invariant: at most one ``store.read`` of the view set is in flight. Misses arriving while
    it runs are queued in ``_pending`` and all go into the next read, so N concurrent
    requests cost one or two reads, not N. An entity queued or in flight has one future that
    every request needing it waits on. Futures resolve to None on failure rather than to an
    exception: requests that already left on their deadline would never retrieve it.

    Counts, for the metrics (``inferline.features.metrics``): entity lookups in the hot cache
    and how many missed, store reads and the entities they asked for.
    """

    def __init__(
        self, store: OnlineStore, join_key: str, refs: tuple[str, ...], cache: HotCache, probe: EntityId
    ) -> None:
        self.cache = cache
        self.views = ",".join(sorted({ref.partition(":")[0] for ref in refs}))
        """The feature views read (the metrics' ``view`` label)."""
        self.lookups = 0
        self.misses = 0
        self.store_reads = 0
        self.store_entities = 0
        self._probe = probe
        self._store = store
        self._join_key = join_key
        self._refs = list(refs)
        self._missing: Row = np.full(len(refs), np.nan, dtype=np.float32)
        self._pending: dict[EntityId, RowFuture] = {}
        self._in_flight: dict[EntityId, RowFuture] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # log the transitions of an outage, not every failed read

    async def fill(self, ids: Sequence[EntityId], rows: list[Row | None], deadline: Deadline) -> bool:
        """Replace the None entries of ``rows`` by fetched rows; True if any had to stay missing."""
        loop = asyncio.get_running_loop()
        waits: dict[int, RowFuture] = {}
        for i, entity in enumerate(ids):
            if rows[i] is not None:
                continue
            future = self._in_flight.get(entity) or self._pending.get(entity)
            if future is None:
                future = self._pending[entity] = loop.create_future()
            waits[i] = future
        if self._pending and self._task is None:
            self._task = loop.create_task(self._pump(), name=f"feature-read:{self._join_key}")
        open_futures = {f for f in waits.values() if not f.done()}
        remaining_s = deadline.remaining_s()
        if open_futures and remaining_s > 0:
            # asyncio.wait never cancels what it waits on: the read outlives this request.
            await asyncio.wait(open_futures, timeout=remaining_s)
        degraded = False
        for i, future in waits.items():
            row = future.result() if future.done() and not future.cancelled() else None
            if row is None:
                degraded = True
                row = self._missing
            rows[i] = row
        return degraded

    async def _pump(self) -> None:
        """Run store reads back to back until no entity is queued (the single flight)."""
        try:
            while self._pending:
                batch = dict(list(self._pending.items())[:MAX_BATCH_ENTITIES])
                for entity in batch:
                    del self._pending[entity]
                self._in_flight = batch
                fetched = await self._read(list(batch))
                self._in_flight = {}
                for i, future in enumerate(batch.values()):
                    if not future.done():
                        future.set_result(None if fetched is None else fetched[i])
        finally:
            self._task = None
            # Only reached with futures open when cancelled by close(): release their waiters.
            for future in [*self._in_flight.values(), *self._pending.values()]:
                if not future.done():
                    future.set_result(None)
            self._in_flight, self._pending = {}, {}

    async def _read(self, ids: list[EntityId]) -> list[Row] | None:
        """One store read → one row per id, cached; None (logged) when the store failed."""
        self.store_reads += 1
        self.store_entities += len(ids)
        try:
            table = await self._store.read(self._refs, self._join_key, ids)
            matrix = np.empty((len(ids), len(self._refs)), dtype=np.float32)
            for j, ref in enumerate(self._refs):
                column = table[ref]
                if len(column) != len(ids):
                    raise ValueError(f"store returned {len(column)} values of {ref!r} for {len(ids)} entities")
                matrix[:, j] = np.asarray(column, dtype=np.float32)  # None → NaN: missing
        except Exception:
            if not self._failing:
                logger.warning("online store reads of %s failing; serving defaults", self._refs, exc_info=True)
            self._failing = True
            return None
        if self._failing:
            logger.info("online store reads of %s recovered", self._refs)
            self._failing = False
        rows = list(matrix)  # row views of one block: no per-row copy
        self.cache.put_many(ids, rows)
        return rows

    async def warm_up(self) -> None:
        await self._read([self._probe])

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _RoutePlan:
    """Everything ``get`` needs about a route, derived once from its config.

    Columns follow the route's ``features`` order. Fetched rows (in ref order, reordered by
    ``ref_take`` if refs and columns differ) land in ``stored_cols``; request-time columns
    start as ``template`` (defaults) and ``template_flags`` (flagged until given).
    """

    def __init__(self, route: RouteConfig, refs: tuple[str, ...], fetcher: _Fetcher | None) -> None:
        self.fetcher = fetcher
        self.route = route
        self.names = tuple(f.name for f in route.features)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.request_cols = {f.name: i for i, f in enumerate(route.features) if f.source is None}
        stored = [(i, f.source) for i, f in enumerate(route.features) if f.source is not None]
        take = [refs.index(source) for _, source in stored]
        self.ref_take: list[int] | None = None if take == list(range(len(refs))) else take
        cols = [i for i, _ in stored]
        # A slice when the stored columns are adjacent (the usual layout): cheaper than fancy indexing.
        self.stored_cols: Columns = _as_slice(cols) or np.array(cols, dtype=np.intp)
        self.template: Row = np.array([f.default for f in route.features], dtype=np.float32)
        self.template_flags: npt.NDArray[np.bool_] = np.array([f.source is None for f in route.features])
        self.stored_defaults: Row = self.template[self.stored_cols]
        self._columns: dict[tuple[str, ...], Columns | None] = {}

    def request_row(self, given: Mapping[str, float]) -> tuple[Row, npt.NDArray[np.bool_]]:
        """Defaults and flags of one row with the request-time values of ``given`` applied."""
        if not given:
            return self.template, self.template_flags
        values, flags = self.template.copy(), self.template_flags.copy()
        for name, value in given.items():
            column = self.request_cols.get(name)
            if column is None:
                why = "is fetched from the feature store" if name in self.index else "is not a feature of this route"
                allowed = list(self.request_cols)
                raise InvalidInput("request_features", f"{echo(name)} {why}; request-time features: {allowed}")
            if not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise InvalidInput("request_features", f"{echo(name)} must be a finite float32, got {value!r}")
            values[column] = value
            flags[column] = False
        return values, flags

    def columns(self, names: Sequence[str] | None) -> Columns | None:
        """Where ``names`` are: a slice when adjacent, else indices; None for all, in route order."""
        if not names:
            return None
        key = tuple(names)
        if key in self._columns:
            return self._columns[key]
        try:
            index = [self.index[name] for name in key]
        except KeyError as err:
            raise InvalidInput("features", f"{err.args[0]!r} is not a feature of this route") from None
        columns: Columns | None = _as_slice(index) or np.array(index, dtype=np.intp)
        if index == list(range(len(self.names))):
            columns = None
        if len(self._columns) < _MAX_COLUMN_SETS:  # callers send few distinct sets; bound it anyway
            self._columns[key] = columns
        return columns


def _as_slice(index: list[int]) -> slice | None:
    """``index`` as an equivalent slice (views, not copies) when it is a run of adjacent columns."""
    if index and index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return None


class FeaturesService:
    """Feature matrices of routes' entities: hot cache, coalesced store reads, defaults.

    Transport-agnostic: the gRPC servicer and ``LocalFeatureClient`` both call ``get``.
    Routes reading the same view set with the same join key share one cache and one
    single-flight reader. An all-hit request never suspends and never touches the store.
    """

    def __init__(
        self,
        routes: Mapping[str, RouteConfig],
        store: OnlineStore,
        config: FeatureStoreConfig,
        clock: Clock = time.monotonic,
    ) -> None:
        fetchers: dict[tuple[str, str, tuple[str, ...]], _Fetcher] = {}
        self._plans: dict[str, _RoutePlan] = {}
        for name, route in routes.items():
            refs = tuple(dict.fromkeys(f.source for f in route.features if f.source is not None))  # dedup
            fetcher = None
            if refs:
                key = (route.entity.join_key, route.entity.type, refs)
                if key not in fetchers:
                    cache = HotCache(config.hot_cache_ttl_s, config.hot_cache_max_entities, timer=clock)
                    fetchers[key] = _Fetcher(store, route.entity.join_key, refs, cache, probe_id(route.entity))
                fetcher = fetchers[key]
            self._plans[name] = _RoutePlan(route, refs, fetcher)
        self._fetchers = list(fetchers.values())

    async def get(
        self,
        route: str,
        ids: list[EntityId],
        request_features: Mapping[str, float],
        *,
        deadline: Deadline,
        names: Sequence[str] | None = None,
    ) -> FeatureVector:
        """The ``[len(ids), F]`` feature matrix of ``ids`` for ``route``.

        Args:
            route: Route name; it declares the features, their sources and defaults.
            ids: Entity keys, of the route's declared key type.
            request_features: Values of request-time features, applied to every entity.
            deadline: Misses still unanswered when it expires get defaults (degraded).
            names: Columns to return, in order; None or empty means all, in route order.

        Returns:
            Read-only values and flags; ``degraded`` when the store failed or was too slow.

        Raises:
            RouteNotFound: unknown route.
            InvalidInput: bad entity keys, unknown or store-backed request feature, a
                non-finite request value, or an unknown name in ``names``.
        """
        plan = self._plans.get(route)
        if plan is None:
            raise RouteNotFound(route)
        check_entity_ids(plan.route, ids)
        template, template_flags = plan.request_row(request_features)
        columns = plan.columns(names)
        values = np.empty((len(ids), len(plan.names)), dtype=np.float32)
        values[:] = template
        defaulted = np.empty(values.shape, dtype=np.bool_)
        defaulted[:] = template_flags
        degraded = False
        fetcher = plan.fetcher
        if fetcher is not None:
            rows, misses = fetcher.cache.get_many(ids)
            fetcher.lookups += len(ids)
            fetcher.misses += misses
            if misses:
                degraded = await fetcher.fill(ids, rows, deadline)
            stored = np.array(rows)  # a fresh [N, refs] block, safe to modify in place
            if plan.ref_take is not None:
                stored = stored[:, plan.ref_take]
            missing = np.isnan(stored)
            np.copyto(stored, plan.stored_defaults, where=missing)
            values[:, plan.stored_cols] = stored
            defaulted[:, plan.stored_cols] = missing
        out_names = plan.names
        if columns is not None:
            values, defaulted, out_names = values[:, columns], defaulted[:, columns], tuple(names or ())
        values.flags.writeable = False
        defaulted.flags.writeable = False
        return FeatureVector(out_names, values, defaulted, degraded)

    def counts(self) -> list[ViewSetCounts]:
        """Each view set's counters since start (read by ``inferline.features.metrics`` at a scrape)."""
        return [ViewSetCounts(f.views, f.lookups, f.misses, f.store_reads, f.store_entities) for f in self._fetchers]

    async def warm_up(self) -> None:
        """Read one probe entity per view set before serving; never raises (failures are logged).

        Feast's first read in a process spends ~0.2 s on lazy set-up, which the first
        requests would otherwise pay as degraded answers.
        """
        await asyncio.gather(*(fetcher.warm_up() for fetcher in self._fetchers))

    async def close(self) -> None:
        """Stop background store reads (their waiters get defaults); the store is not closed."""
        for fetcher in self._fetchers:
            await fetcher.close()
