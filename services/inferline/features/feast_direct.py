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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType

from inferline.features.vector import EntityId

PLAN_TTL_S = 60.0
"""How long a read plan is used before the registry is asked again."""

# The proto field of each entity value type the route's entity may have (config: int64 or
# string); other types go through Feast's converter.
_KEY_VALUES: dict[ValueType, Callable[[Any], ValueProto]] = {
    ValueType.INT64: lambda v: ValueProto(int64_val=v),
    ValueType.INT32: lambda v: ValueProto(int32_val=v),
    ValueType.STRING: lambda v: ValueProto(string_val=v),
}

Columns = dict[str, list[float | None]]


@dataclass(frozen=True)
class _ViewRead:
    view: Any
    """The ``feast.FeatureView``."""
    features: list[str]
    refs: list[str]
    """The ``view:feature`` refs, aligned with ``features``."""


@dataclass(frozen=True)
class ReadPlan:
    """How to read one (refs, join key): per view, its features; and how to build the keys."""

    join_key: str
    key_type: ValueType
    views: list[_ViewRead]

    def read(self, provider: Any, config: Any, refs: Sequence[str], ids: Sequence[EntityId]) -> Columns:
        """One column per ref (aligned with ``ids``, None where missing), through ``provider.online_read``."""
        keys, out = self.keys(ids), empty_columns(refs, len(ids))
        for view in self.views:
            # A copy of the names: Feast's Redis store appends its timestamp key to the list.
            rows = provider.online_read(
                config=config, table=view.view, entity_keys=keys, requested_features=list(view.features)
            )
            fill_columns(out, view, rows)
        return out

    async def read_async(self, provider: Any, config: Any, refs: Sequence[str], ids: Sequence[EntityId]) -> Columns:
        """``read`` through ``provider.online_read_async`` (stores that read natively async)."""
        keys, out = self.keys(ids), empty_columns(refs, len(ids))
        for view in self.views:
            rows = await provider.online_read_async(
                config=config, table=view.view, entity_keys=keys, requested_features=list(view.features)
            )
            fill_columns(out, view, rows)
        return out

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
        views.append(_ViewRead(view, features, [f"{view_name}:{f}" for f in features]))
    if key_type is None:
        return None
    return ReadPlan(join_key, key_type, views)


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
            kind = value.WhichOneof("val")
            if kind is not None and kind != "null_val":  # unset or null: missing
                column[i] = float(getattr(value, kind))  # raises for a non-numeric value, as Feast's read did


def empty_columns(refs: Sequence[str], n: int) -> Columns:
    return {ref: [None] * n for ref in refs}
