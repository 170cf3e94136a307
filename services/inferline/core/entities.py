"""Validation of a request's entity keys against the route's declared join key and type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from inferline.core.config import EntitySpec, RouteConfig
from inferline.core.errors import InvalidInput, echo
from inferline.v1 import inference_pb2 as pb

EntityId = int | str

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def probe_id(entity: EntitySpec) -> EntityId:
    """An id of the entity's type for a warm-up read: whether or not the store holds it, the
    read loads the store's registry and opens its connections before real reads need them."""
    return 0 if entity.type == "int64" else ""


def parse_entity_ids(route: RouteConfig, entities: Sequence[pb.EntityKey]) -> list[EntityId]:
    """The entity ids of a request, in order, checked against the route.

    Raises:
        InvalidInput: no entities, more than ``max_entities``, a wrong join key name,
            a missing value, or a value of the wrong type.
    """
    if not entities:
        raise InvalidInput("entities", "at least one entity is required")
    if len(entities) > route.max_entities:
        raise InvalidInput("entities", f"{len(entities)} entities exceed this route's limit of {route.max_entities}")
    join_key = route.entity.join_key
    want = "int64_value" if route.entity.type == "int64" else "string_value"
    ids: list[EntityId] = []
    for i, key in enumerate(entities):
        if key.name != join_key:
            raise InvalidInput(f"entities[{i}].name", f"expected join key {join_key!r}, got {echo(key.name)}")
        which = key.WhichOneof("value")
        if which != want:
            got = "no value" if which is None else which
            raise InvalidInput(f"entities[{i}]", f"{join_key} must be set as {want}, got {got}")
        ids.append(key.int64_value if want == "int64_value" else key.string_value)
    return ids


def check_entity_ids(route: RouteConfig, ids: Sequence[EntityId]) -> None:
    """Raise InvalidInput unless ``ids`` are 1..max_entities keys of the route's declared type.

    The in-process twin of ``parse_entity_ids``: services reached without gRPC (local
    clients) refuse the same input, and one bad key cannot fail a read shared with others.
    """
    if not ids:
        raise InvalidInput("entities", "at least one entity is required")
    if len(ids) > route.max_entities:
        raise InvalidInput("entities", f"{len(ids)} entities exceed this route's limit of {route.max_entities}")
    int_keys = route.entity.type == "int64"
    if int_keys:
        ints = cast("Sequence[int]", ids)
        if all(type(e) is int for e in ids) and min(ints) >= _INT64_MIN and max(ints) <= _INT64_MAX:
            return
    elif all(type(e) is str for e in ids):
        return
    join_key = route.entity.join_key
    for i, entity in enumerate(ids):  # slow path: find the culprit, accept subclasses
        field, got = f"entities[{i}]", type(entity).__name__
        if not int_keys:
            if not isinstance(entity, str):
                raise InvalidInput(field, f"{join_key} must be a string, got {got}")
        elif not isinstance(entity, int) or isinstance(entity, bool):
            raise InvalidInput(field, f"{join_key} must be an int64, got {got}")
        elif not _INT64_MIN <= entity <= _INT64_MAX:
            raise InvalidInput(field, f"{join_key} {entity} is out of the int64 range")
