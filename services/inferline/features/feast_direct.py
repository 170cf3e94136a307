"""Feature reads straight through Feast's online store plugin (``online_read``), for plain views.

``FeatureStore.get_online_features`` does, per call, far more than reading: it resolves the
refs against the registry, converts every entity value to a proto through Feast's generic
type map, deduplicates entities, and assembles a response of protos that ``to_dict``
converts back to Python. Measured on the demo store (SQLite, 3 features of one view), that
was 0.31 ms of a 0.35 ms one-entity read and 44 of 78 ms per 1,000 entities; the online
store's own ``online_read`` (key serialisation, the query, decoding the values) is the rest.
The router's hot-cache misses and the batch job's bulk reads are all such reads.

So for refs that name plain feature views keyed by the route's join key, the read is
planned once (views, feature names, the entity's value type, looked up in the registry)
and each read calls the provider's ``online_read`` / ``online_read_async`` (the interface
every Feast online store implements: SQLite, Redis, the rest) with the entity keys built
directly. Anything else (an on-demand view, a view keyed by several entities or another
key) has no plan and goes through ``get_online_features``, as does everything when the
registry cannot be read. A plan is resolved again after ``PLAN_TTL_S``, so a view
redefined with ``feast apply`` is picked up as Feast's own registry cache would.

On Feast's SQLite online store (the embedded default) a planned read goes one step further
and queries the view's table itself (``SqliteView``): the same rows ``online_read`` selects,
without what it adds per row that a feature vector does not use — each row's timestamp
converted to a datetime by ``sqlite3``'s declared-type converter, a sort by key, a regrouping
into one dict of protos per entity. Measured on the demo store (100,000 drivers, 3 features,
1,000 random entities a read, medians, alternated): 20 ms through ``online_read`` and the
decoding here, 8.7 ms straight (``docs/performance.md``). It is a read only of the table layout Feast's SQLite store
writes (``entity_key``, ``feature_name``, ``value``: a serialised ``ValueProto``; keys
serialised by Feast's own ``serialize_entity_key``); a table without those columns, or none
yet, is read through ``online_read``, whose errors then name the problem.

A plan whose views all lie in SQLite tables can also be read whole (``ReadPlan.scan``): every
stored value of its features, in slices of the tables' rows that processes can read side by
side. A batch job that meets most of the store's entities reads them so, once, instead of a
query per thousand entities (``inferline.batch.view_scan``).

On Feast's Redis online store (redis-py client) a planned read pipelines the ``HMGET``s
itself (``RedisView``): only the features' hash fields, once per distinct key, with the keys
and fields built as Feast builds them (checked against Feast's own builders when planned);
1,000 entities of the demo store 17.8 ms through ``online_read``, 10.0 ms so
(``docs/performance.md``). Another layout, the GLIDE client or another store goes through
``online_read``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType

from inferline.features import value_blobs
from inferline.features.scan import ScanPart
from inferline.features.vector import EntityId

PLAN_TTL_S = 60.0
"""How long a read plan is used before the registry is asked again."""
SQLITE_KEYS_PER_QUERY = 10_000
"""Keys per query of a SQLite table read: well under SQLite's bound on a statement's
parameters (32,766 since 3.32), which ``online_read``'s one query per read can pass."""
_SQLITE_COLUMNS = {"entity_key", "feature_name", "value"}

# The proto field of each entity value type the route's entity may have (config: int64 or
# string); other types go through Feast's converter.
_KEY_VALUES: dict[ValueType, Callable[[Any], ValueProto]] = {
    ValueType.INT64: lambda v: ValueProto(int64_val=v),
    ValueType.INT32: lambda v: ValueProto(int32_val=v),
    ValueType.STRING: lambda v: ValueProto(string_val=v),
}

Columns = dict[str, list[float | None]]


@dataclass(frozen=True)
class SqliteView:
    """Where a view's rows lie in Feast's SQLite online store, read with the store's connection."""

    connection: sqlite3.Connection
    """The online store's own (``SqliteOnlineStore._get_conn``): its lock wait, its thread."""
    table: str
    """The table's name, quoted."""
    key_version: int
    """``entity_key_serialization_version`` of the repository: how its keys were written."""
    int64_key_prefix: bytes | None = None
    """For an int64 entity: the bytes Feast's serialisation puts before the value's 8 bytes
    (little-endian), checked against Feast's own output when planned (``_int64_key_prefix``);
    None: keys are serialised by Feast."""

    def serialize(self, plan: ReadPlan, ids: Sequence[EntityId]) -> list[bytes]:
        """The table's keys of ``ids``. Building an ``EntityKeyProto`` and serialising it through
        Feast costs ~4.4 µs a key, a third of a planned read; joining the checked prefix and the
        integer's bytes ~0.3 µs."""
        if self.int64_key_prefix is not None:
            prefix = self.int64_key_prefix
            return [prefix + int(v).to_bytes(8, "little", signed=True) for v in ids]
        from feast.infra.key_encoding_utils import serialize_entity_key

        return [serialize_entity_key(k, entity_key_serialization_version=self.key_version) for k in plan.keys(ids)]


@dataclass(frozen=True)
class RedisView:
    """Where a view's features lie in Feast's Redis online store, read with the store's clients.

    Feast keeps one hash per entity key (the serialised key, then the project's name) with a
    field per ``view:feature`` (its murmur3 hash) and one for the row's timestamp; its
    ``online_read`` pipelines an ``HMGET`` of every field per key, then builds per entity a
    dict of protos and a timestamp a feature vector does not use. Here the pipeline asks only
    the features' fields, once per distinct key, and the values are decoded as ``fill_columns``
    decodes them.
    """

    store: Any
    """The ``RedisOnlineStore``: its clients (``_get_client``, ``_get_client_async``)."""
    store_config: Any
    """The repository's ``RedisOnlineStoreConfig``."""
    key_version: int
    """``entity_key_serialization_version`` of the repository: how its keys were written."""
    suffix: bytes
    """What Feast puts after the serialised key: the project's name."""
    fields: tuple[bytes, ...]
    """The features' hash fields, aligned with ``_ViewRead.features``."""
    int64_key_prefix: bytes | None = None
    """As ``SqliteView.int64_key_prefix``."""

    def keys(self, plan: ReadPlan, ids: Sequence[EntityId]) -> tuple[list[bytes], list[bytes]]:
        """The hash keys of ``ids`` (checked against Feast's own when planned), and the
        distinct ones among them, which are all a read asks for."""
        keyed = self._keys(plan, ids)
        return keyed, list(dict.fromkeys(keyed))

    def _keys(self, plan: ReadPlan, ids: Sequence[EntityId]) -> list[bytes]:
        if self.int64_key_prefix is not None:
            prefix, suffix = self.int64_key_prefix, self.suffix
            return [prefix + int(v).to_bytes(8, "little", signed=True) + suffix for v in ids]
        from feast.infra.key_encoding_utils import serialize_entity_key

        version, suffix = self.key_version, self.suffix
        return [serialize_entity_key(k, entity_key_serialization_version=version) + suffix for k in plan.keys(ids)]

    def hmget(self, keys: Sequence[bytes]) -> list[list[bytes | None]]:
        """The features' values of each key, one pipeline (blocking: the batch read processes)."""
        with self.store._get_client(self.store_config).pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, self.fields)
            return list(pipe.execute())

    async def hmget_async(self, keys: Sequence[bytes]) -> list[list[bytes | None]]:
        """``hmget`` on the store's async client (the router's reads)."""
        client = await self.store._get_client_async(self.store_config)
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, self.fields)
            return list(await pipe.execute())


@dataclass(frozen=True)
class _ViewRead:
    view: Any
    """The ``feast.FeatureView``."""
    features: list[str]
    refs: list[str]
    """The ``view:feature`` refs, aligned with ``features``."""
    sqlite: SqliteView | None = None
    """Set when the view is read from Feast's SQLite table directly."""
    redis: RedisView | None = None
    """Set when the view is read from Feast's Redis hashes directly."""


@dataclass(frozen=True)
class ReadPlan:
    """How to read one (refs, join key): per view, its features; and how to build the keys."""

    join_key: str
    key_type: ValueType
    views: list[_ViewRead]

    def read(self, provider: Any, config: Any, refs: Sequence[str], ids: Sequence[EntityId]) -> Columns:
        """One column per ref (aligned with ``ids``, None where missing), through ``provider.online_read``."""
        keys: list[EntityKeyProto] | None = None
        out = empty_columns(refs, len(ids))
        for view in self.views:
            if view.sqlite is not None:
                read_sqlite(view, view.sqlite.serialize(self, ids), out)
                continue
            if view.redis is not None:
                keyed, distinct = view.redis.keys(self, ids)
                fill_redis(view, keyed, distinct, view.redis.hmget(distinct), out)
                continue
            if keys is None:
                keys = self.keys(ids)
            # A copy of the names: Feast's Redis store appends its timestamp key to the list.
            rows = provider.online_read(
                config=config, table=view.view, entity_keys=keys, requested_features=list(view.features)
            )
            fill_columns(out, view, rows)
        return out

    async def read_async(self, provider: Any, config: Any, refs: Sequence[str], ids: Sequence[EntityId]) -> Columns:
        """``read`` through ``provider.online_read_async`` (stores that read natively async)."""
        keys: list[EntityKeyProto] | None = None
        out = empty_columns(refs, len(ids))
        for view in self.views:
            if view.redis is not None:
                keyed, distinct = view.redis.keys(self, ids)
                fill_redis(view, keyed, distinct, await view.redis.hmget_async(distinct), out)
                continue
            if keys is None:
                keys = self.keys(ids)
            rows = await provider.online_read_async(
                config=config, table=view.view, entity_keys=keys, requested_features=list(view.features)
            )
            fill_columns(out, view, rows)
        return out

    @property
    def scannable(self) -> bool:
        """True when every view lies in a SQLite table read here, so ``scan`` can read it whole."""
        return bool(self.views) and all(view.sqlite is not None for view in self.views)

    def entities(self) -> int:
        """How many entities the largest view holds rows of (``scannable`` plans only): a scan
        reads that many, and at least the union of the views' entities fits a table that size
        per view."""
        counts = []
        for view in self.views:
            where = view.sqlite
            assert where is not None, "scannable plans only"
            (count,) = where.connection.execute(f"SELECT COUNT(DISTINCT entity_key) FROM {where.table}").fetchone()
            counts.append(int(count))
        return max(counts, default=0)

    def scan(self, refs: Sequence[str], part: int, parts: int) -> ScanPart:
        """Every stored value of ``refs`` in slice ``part`` of ``parts`` of each view's rows (by
        rowid; ``scannable`` plans only). The slices together hold each value once; one entity's
        values may lie in several slices. A key that is not the join key's (another layout) is
        skipped, so is a null value.

        Column-wise (the keys, the features, the values each in one pass) rather than a loop
        over the rows: the scan runs once per job over the whole store."""
        if not 0 <= part < parts:
            raise ValueError(f"part {part} is not one of {parts}")
        column_of = {ref: i for i, ref in enumerate(refs)}
        found: list[ScanPart] = []
        for view in self.views:
            where = view.sqlite
            assert where is not None, "scannable plans only"
            column = {f: column_of[ref] for f, ref in zip(view.features, view.refs, strict=True) if ref in column_of}
            low, high = where.connection.execute(f"SELECT MIN(rowid), MAX(rowid) FROM {where.table}").fetchone()
            if low is None:
                continue  # an empty table
            span = high - low + 1
            first, end = low + span * part // parts, low + span * (part + 1) // parts
            rows = where.connection.execute(
                f"SELECT entity_key, feature_name, value FROM {where.table} WHERE rowid >= ? AND rowid < ?",
                (first, end),
            ).fetchall()
            if not rows:
                continue
            n = len(rows)
            columns = np.fromiter(map(column.get, (r[1] for r in rows), itertools.repeat(-1)), np.int32, n)
            values = value_blobs.numbers_or_nan([r[2] for r in rows])
            ids, known = self._entity_ids(where, [r[0] for r in rows])
            keep = known & (columns >= 0) & ~np.isnan(values)
            found.append(ScanPart(ids[keep], columns[keep], values[keep]))
        if not found:
            return ScanPart(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32))
        return ScanPart(
            *(np.concatenate(arrays) for arrays in zip(*((p.ids, p.columns, p.values) for p in found), strict=True))
        )

    def _entity_ids(self, where: SqliteView, keys: Sequence[bytes]) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
        """The entity id of each stored key (int64 ids as an int64 array, others as objects) and
        which keys are of this join key at all."""
        prefix = where.int64_key_prefix
        if prefix is not None:
            size = len(prefix) + 8
            if all(len(key) == size for key in keys):
                raw = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), size)
                known = (raw[:, : len(prefix)] == np.frombuffer(prefix, np.uint8)).all(axis=1)
                return raw[:, len(prefix) :].copy().view("<i8").reshape(-1), known
        decoded = [self._entity_id(where, key) for key in keys]
        known = np.array([entity is not None for entity in decoded], dtype=bool)
        if prefix is not None:
            return np.array([0 if entity is None else entity for entity in decoded], np.int64), known
        return np.array(decoded, dtype=object), known

    def _entity_id(self, where: SqliteView, key: bytes) -> EntityId | None:
        """One stored key's entity id; None when it is not a key of this join key."""
        prefix = where.int64_key_prefix
        if prefix is not None:
            if len(key) != len(prefix) + 8 or not key.startswith(prefix):
                return None
            return int.from_bytes(key[-8:], "little", signed=True)
        from feast.infra.key_encoding_utils import deserialize_entity_key

        try:
            proto = deserialize_entity_key(key, entity_key_serialization_version=where.key_version)
        except Exception:  # another layout: not a key of this view's entity
            return None
        if list(proto.join_keys) != [self.join_key] or len(proto.entity_values) != 1:
            return None
        kind = proto.entity_values[0].WhichOneof("val")
        value = None if kind is None else getattr(proto.entity_values[0], kind)
        return value if isinstance(value, (int, str)) else None

    def keys(self, ids: Sequence[EntityId]) -> list[EntityKeyProto]:
        join_keys = [self.join_key]
        make = _KEY_VALUES.get(self.key_type)
        if make is not None:
            return [EntityKeyProto(join_keys=join_keys, entity_values=[make(v)]) for v in ids]
        from feast.type_map import python_values_to_proto_values

        values = python_values_to_proto_values(list(ids), self.key_type)
        return [EntityKeyProto(join_keys=join_keys, entity_values=[v]) for v in values]


def plan_read(store: Any, refs: Sequence[str], join_key: str) -> ReadPlan | None:
    """The plan of a read of ``refs`` keyed by ``join_key``, or None when it needs Feast's full read."""
    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view_name, sep, feature = ref.partition(":")
        if not sep or not feature:
            return None
        by_view.setdefault(view_name, []).append(feature)
    views = []
    key_type: ValueType | None = None
    for view_name, features in by_view.items():
        try:
            view = store.get_feature_view(view_name)  # raises for an on-demand view
        except Exception:
            return None
        if len(view.entities) != 1 or [c.name for c in view.entity_columns] != [join_key]:
            return None
        entity = store.get_entity(view.entities[0])
        if key_type is not None and entity.value_type != key_type:
            return None
        key_type = entity.value_type
        known = {f.name for f in view.features}
        if not set(features) <= known:
            return None  # let Feast name the unknown feature in its error
        sqlite = _sqlite_view(store, view, join_key, entity.value_type)
        redis = None if sqlite is not None else _redis_view(store, view, features, join_key, entity.value_type)
        views.append(_ViewRead(view, features, [f"{view_name}:{f}" for f in features], sqlite, redis))
    if key_type is None:
        return None
    return ReadPlan(join_key, key_type, views)


def _sqlite_view(store: Any, view: Any, join_key: str, key_type: ValueType) -> SqliteView | None:
    """Where ``view`` lies when the online store is Feast's SQLite store and its table has the
    layout read here; None otherwise (the read then goes through ``online_read``)."""
    from feast.infra.online_stores import sqlite as feast_sqlite

    online_store = getattr(store._get_provider(), "online_store", None)
    if not isinstance(online_store, feast_sqlite.SqliteOnlineStore):
        return None
    config = store.config
    versioning = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
    table = feast_sqlite._quote_id(feast_sqlite._table_id(config.project, view, versioning))
    connection = online_store._get_conn(config)
    try:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
    except sqlite3.Error:
        return None
    if not columns >= _SQLITE_COLUMNS:  # no table yet, or another layout
        return None
    version = config.entity_key_serialization_version
    prefix = _int64_key_prefix(join_key, version) if key_type == ValueType.INT64 else None
    return SqliteView(connection, table, version, prefix)


def _redis_view(store: Any, view: Any, features: Sequence[str], join_key: str, key_type: ValueType) -> RedisView | None:
    """Where ``view`` lies when the online store is Feast's Redis store on redis-py and its keys
    and fields are built as here (checked against Feast's own builders for probe ids); None
    otherwise (the read then goes through ``online_read``)."""
    from feast.infra.online_stores import redis as feast_redis
    from feast.infra.online_stores.helpers import _mmh3

    online_store = getattr(store._get_provider(), "online_store", None)
    config = store.config
    store_config = config.online_store
    if not isinstance(online_store, feast_redis.RedisOnlineStore) or not isinstance(
        store_config, feast_redis.RedisOnlineStoreConfig
    ):
        return None
    if getattr(store_config, "client", "redis") != "redis":  # GLIDE batches off the GIL already
        return None
    version = config.entity_key_serialization_version
    prefix = _int64_key_prefix(join_key, version) if key_type == ValueType.INT64 else None
    suffix = config.project.encode("utf-8")
    fv_name = feast_redis._versioned_fv_name(view, config)
    fields = tuple(_mmh3(f"{fv_name}:{f}") for f in features)
    if list(fields) != online_store._generate_hset_keys_for_features(view, list(features), fv_name)[1][:-1]:
        return None
    redis_view = RedisView(online_store, store_config, version, suffix, fields, prefix)
    if key_type not in _KEY_VALUES:
        return redis_view  # keys built by Feast's own converter and serialisation: nothing to check
    probes = [0, 1, 1001] if key_type != ValueType.STRING else ["", "a", "driver-1001"]
    plan = ReadPlan(join_key, key_type, [])
    feast_keys = online_store._generate_redis_keys_for_entities(config, plan.keys(probes))
    return redis_view if redis_view.keys(plan, probes)[0] == feast_keys else None


def _int64_key_prefix(join_key: str, version: int) -> bytes | None:
    """What Feast's ``serialize_entity_key`` puts before an int64 value's 8 little-endian bytes
    (the key's name and type), if its output is that for every probe; None otherwise (another
    layout, an older version), and keys are then serialised by Feast itself."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    def feast_key(v: int) -> bytes:
        proto = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=v)])
        return bytes(serialize_entity_key(proto, entity_key_serialization_version=version))

    prefix = feast_key(0)[:-8]
    probes = (0, 1, -1, 1001, 2**40 + 7, -(2**63), 2**63 - 1)
    if all(feast_key(v) == prefix + v.to_bytes(8, "little", signed=True) for v in probes):
        return prefix
    return None


def read_sqlite(view: _ViewRead, serialized: Sequence[bytes], out: Columns) -> None:
    """One view's features for the keys ``serialized`` straight from Feast's SQLite table, into
    ``out``'s columns: one query per ``SQLITE_KEYS_PER_QUERY`` keys, the values decoded by
    ``value_blobs.number`` as ``fill_columns`` decodes them."""
    where = view.sqlite
    assert where is not None
    first: dict[bytes, int] = {}
    for i, key in enumerate(serialized):
        first.setdefault(key, i)
    columns = {feature: out[ref] for feature, ref in zip(view.features, view.refs, strict=True)}
    # All of a view's features: one index range per key, cheaper than a probe per (key, feature).
    every = len(columns) == len(view.view.features)
    names = "" if every else f" AND feature_name IN ({','.join('?' * len(view.features))})"
    distinct = list(first)
    for start in range(0, len(distinct), SQLITE_KEYS_PER_QUERY):
        part = distinct[start : start + SQLITE_KEYS_PER_QUERY]
        rows = where.connection.execute(
            f"SELECT entity_key, feature_name, value FROM {where.table} "
            f"WHERE entity_key IN ({','.join('?' * len(part))}){names}",
            part if every else [*part, *view.features],
        ).fetchall()
        for key, feature, blob in rows:
            column = columns.get(feature)
            if column is None or blob is None:  # a feature the view no longer has; no value
                continue
            number = value_blobs.number(ValueProto.FromString(blob))
            if number is not None:
                column[first[key]] = number
    if len(first) < len(serialized):  # repeated ids: each gets its first occurrence's values
        for i, key in enumerate(serialized):
            if (j := first[key]) != i:
                for column in columns.values():
                    column[i] = column[j]


def fill_redis(
    view: _ViewRead,
    keys: Sequence[bytes],
    distinct: Sequence[bytes],
    replies: Sequence[Sequence[bytes | None]],
    out: Columns,
) -> None:
    """One view's ``HMGET`` replies (one per ``distinct`` key, values aligned with the view's
    features) into ``out``'s columns for ``keys`` (aligned with the ids), decoded by ``value_blobs.number``."""
    numbers: dict[bytes, list[float | None]] = {
        key: [None if blob is None else value_blobs.number(ValueProto.FromString(blob)) for blob in reply]
        for key, reply in zip(distinct, replies, strict=True)
    }
    columns = [out[ref] for ref in view.refs]
    for i, key in enumerate(keys):
        for column, number in zip(columns, numbers[key], strict=True):
            if number is not None:
                column[i] = number


def fill_columns(out: Columns, view: _ViewRead, rows: Sequence[tuple[Any, dict[str, ValueProto] | None]]) -> None:
    """Decode one view's ``online_read`` answer (aligned with the ids) into ``out``'s columns."""
    for feature, ref in zip(view.features, view.refs, strict=True):
        column = out[ref]
        for i, (_, values) in enumerate(rows):
            if values is None:
                continue
            value = values.get(feature)
            if value is None:
                continue
            number = value_blobs.number(value)
            if number is not None:
                column[i] = number


def empty_columns(refs: Sequence[str], n: int) -> Columns:
    return {ref: [None] * n for ref in refs}
