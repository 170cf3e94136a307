"""``OnlineStore``, the port to the online feature store, and its Feast implementation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from inferline.features.vector import EntityId

if TYPE_CHECKING:
    from inferline.features.feast_direct import ReadPlan
    from inferline.features.scan import ScanPart

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

INLINE_MAX_ENTITIES = 32
"""A direct read of a local SQLite online store of at most this many entities runs on the
calling (event-loop) thread: ~20 µs an entity through the view's table (``feast_direct``; ~40 µs
through ``online_read`` when this bound was set), so at most ~0.7 ms. Handing it to the read thread
costs more than that under load: the read takes and drops the GIL several times (the query,
each row), and each time it waits for the busy loop thread to let go of it (up to the 5 ms
switch interval). Measured through ``inferline up`` at 0.5× / 1× of a 390 req/s knee, two
interleaved rounds: 19 and 0 of ~2,000, 132 and 37 of ~3,900 answers degraded for a feature
read over its 20 ms budget on the thread, none on the loop (docs/performance.md)."""
INLINE_BUSY_TIMEOUT_MS = 2
"""How long an inline read waits for a SQLite lock (a ``feast materialize`` committing) before
it fails, and the request degrades to defaults like any failed read: the event loop must not
wait out SQLite's default 5 s."""


class OnlineStore(Protocol):
    """Reads the latest values of features for a set of entities."""

    async def read(self, refs: list[str], join_key: str, ids: list[EntityId]) -> dict[str, list[float | None]]:
        """Latest value of every feature ref (``view:feature``) of every entity.

        Returns:
            One list per ref, each of the same length as ``ids`` and aligned with it; None
            where the entity or its value is missing.

        Raises:
            Exception: any failure of the store; the caller degrades to defaults.
        """
        ...


class FeastOnlineStore:
    """``OnlineStore`` over ``feast.FeatureStore`` (SQLite embedded, Redis in production).

    Feast's synchronous read has no timeout of its own (feast-dev/feast#1015) and blocks, so it
    runs on one dedicated worker thread: the event loop never blocks, and a caller whose budget
    expires can stop waiting and leave the call to finish in the background. One thread, not a
    pool, because reads are already coalesced upstream and SQLite serialises them anyway; a
    stalled store then ties up one thread, not every thread of a shared pool.

    When the configured online store reads natively async (Feast advertises it as
    ``async_supported.online.read``, e.g. Redis), its async read is used instead and no
    thread is involved. A small direct read of a local SQLite store runs on the calling thread
    (``INLINE_MAX_ENTITIES``): it costs less than the hop, and a writer's lock fails it in
    ``INLINE_BUSY_TIMEOUT_MS`` instead of stalling the loop.

    Refs of plain feature views are read through the online store's ``online_read`` directly
    (``feast_direct``: a fraction of ``get_online_features``' cost), on Feast's SQLite store
    from the view's table itself; others through ``get_online_features``.
    """

    def __init__(self, repo_path: str | pathlib.Path, *, inline_small_reads: bool = True) -> None:
        """``inline_small_reads``: False keeps every read off the calling thread, and SQLite's own
        lock wait: for a batch job's bulk reads, which may wait out a writer, and whose loop is
        not an online one."""
        import feast  # deferred: importing Feast takes seconds, most modules need only the protocol

        from inferline.features import feast_direct

        self._direct = feast_direct

        self._store = feast.FeatureStore(repo_path=str(repo_path))
        # Feast exposes the capability only on its provider; its own feature server reads it the
        # same way (feast/feature_server.py), there is no public accessor in 0.67.
        self._provider = self._store._get_provider()
        self._async_read: bool = bool(self._provider.async_supported.online.read)
        self._plans: dict[tuple[tuple[str, ...], str], tuple[float, ReadPlan | None]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if not self._async_read:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-read")
        self._inline = (
            inline_small_reads
            and not self._async_read
            and _bound_local_sqlite_waits(self._provider, self._store.config)
        )

    @property
    def async_read(self) -> bool:
        """True when reads use Feast's native async path rather than the worker thread."""
        return self._async_read

    def reads_directly(self, refs: list[str], join_key: str) -> bool:
        """True when reads of ``refs`` go through the online store's ``online_read`` (plain
        views keyed by ``join_key``), False when through ``get_online_features``."""
        return self._plan(refs, join_key) is not None

    def reads_inline(self, refs: list[str], join_key: str, entities: int) -> bool:
        """True when a read of ``entities`` entities of ``refs`` runs on the calling thread
        (a small direct read of a local SQLite store), False when on the read thread or async."""
        return self._inline and entities <= INLINE_MAX_ENTITIES and self._plan(refs, join_key) is not None

    async def read(self, refs: list[str], join_key: str, ids: list[EntityId]) -> dict[str, list[float | None]]:
        """See ``OnlineStore.read``."""
        if self.reads_inline(refs, join_key, len(ids)):
            return self.read_blocking(refs, join_key, ids)
        if self._executor is None:
            plan = self._plan(refs, join_key)
            if plan is not None:
                return await plan.read_async(self._provider, self._store.config, refs, ids)
            response = await self._store.get_online_features_async(
                features=refs, entity_rows={join_key: ids}, full_feature_names=True
            )
            return _columns(refs, response.to_dict())
        return await self.on_read_thread(self.read_blocking, refs, join_key, ids)

    def read_blocking(self, refs: list[str], join_key: str, ids: list[EntityId]) -> dict[str, list[float | None]]:
        """``read`` on the calling thread, blocking it: for the worker thread, and for a process
        that does nothing else (the batch job's feature read processes)."""
        plan = self._plan(refs, join_key)
        if plan is not None:
            return plan.read(self._provider, self._store.config, refs, ids)
        # The columnar entity_rows form skips building one dict per entity; full feature names
        # keep two views that share a feature name apart.
        response = self._store.get_online_features(features=refs, entity_rows={join_key: ids}, full_feature_names=True)
        return _columns(refs, response.to_dict())

    def scan_entities_blocking(self, refs: list[str], join_key: str) -> int | None:
        """How many entities a whole read of ``refs`` (``scan_blocking``) reads; None when they
        cannot be read whole (views read through Feast, or another store than its SQLite one)."""
        plan = self._plan(refs, join_key)
        return plan.entities() if plan is not None and plan.scannable else None

    def scan_blocking(self, refs: list[str], join_key: str, part: int, parts: int) -> ScanPart:
        """Slice ``part`` of ``parts`` of every stored value of ``refs`` (``ReadPlan.scan``).

        Raises:
            ValueError: ``refs`` cannot be read whole (``scan_entities_blocking`` is None).
        """
        plan = self._plan(refs, join_key)
        if plan is None or not plan.scannable:
            raise ValueError(f"the views of {', '.join(refs)} cannot be read whole")
        return plan.scan(refs, part, parts)

    async def on_read_thread(self, blocking: Callable[..., _T], *args: Any) -> _T:
        """``blocking(*args)`` on the read thread (where the store's connection is used), or on
        a thread of its own when reads are async."""
        if self._executor is None:
            return await asyncio.to_thread(blocking, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, blocking, *args)

    def _plan(self, refs: list[str], join_key: str) -> ReadPlan | None:
        """The direct-read plan of (refs, join key) (None: Feast's full read), resolved again
        after ``PLAN_TTL_S``."""
        key = (tuple(refs), join_key)
        now = time.monotonic()
        resolved = self._plans.get(key)
        if resolved is None or now - resolved[0] > self._direct.PLAN_TTL_S:
            resolved = self._plans[key] = (now, self._direct.plan_read(self._store, refs, join_key))
        return resolved[1]

    async def close(self) -> None:
        """Release the worker thread and Feast's long-lived clients.

        A read still running on the worker is not waited for: it may be stalled, which is why
        it was abandoned in the first place.
        """
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        await self._store.close()
        # Feast 0.67's Redis online store keeps the async client of its async reads but has no
        # close of its own (OnlineStore.close is a no-op there): close it, or its connections
        # outlive the store (unclosed-socket warnings at interpreter exit or in a test process).
        if self._async_read:
            client = getattr(self._provider.online_store, "_client_async", None)
            if client is not None and hasattr(client, "aclose"):
                await client.aclose()


def _columns(refs: Sequence[str], table: Mapping[str, Sequence[Any]]) -> dict[str, list[float | None]]:
    """Feast's ``to_dict()`` keyed by ``view__feature`` → one float column per ``view:feature`` ref."""
    out: dict[str, list[float | None]] = {}
    for ref in refs:
        column = table.get(ref.replace(":", "__", 1))
        if column is None:
            raise KeyError(f"Feast returned no column for {ref!r}")
        out[ref] = [None if v is None else float(v) for v in column]
    return out


def _bound_local_sqlite_waits(provider: Any, config: Any) -> bool:
    """Whether the online store is Feast's local SQLite store; if so, its connection's lock wait
    is cut to ``INLINE_BUSY_TIMEOUT_MS`` so that a read may run on the event loop.

    Feast opens the connection itself (``SqliteOnlineStore._get_conn``, with Python's 5 s
    default wait) and has no setting for it; the pragma is per connection, so the store's file
    and its writers are untouched.
    """
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    store = getattr(provider, "online_store", None)
    if not isinstance(store, SqliteOnlineStore):
        return False
    store._get_conn(config).execute(f"PRAGMA busy_timeout = {INLINE_BUSY_TIMEOUT_MS}")
    return True
