"""Validation of a request's entity keys against the route's declared join key and type."""

from __future__ import annotations

from collections.abc import Sequence

from inferline.core.config import RouteConfig
from inferline.core.errors import InvalidInput
from inferline.v1 import inference_pb2 as pb

EntityId = int | str


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
            raise InvalidInput(f"entities[{i}].name", f"expected join key {join_key!r}, got {key.name!r}")
        which = key.WhichOneof("value")
        if which != want:
            got = "no value" if which is None else which
            raise InvalidInput(f"entities[{i}]", f"{join_key} must be set as {want}, got {got}")
        ids.append(key.int64_value if want == "int64_value" else key.string_value)
    return ids
