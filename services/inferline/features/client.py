"""``FeatureClient``: the router's port to the features service, in-process or over gRPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np

from inferline.core.config import RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.errors import InvalidInput, from_rpc_error
from inferline.features.service import FeaturesService
from inferline.features.vector import EntityId, FeatureVector
from inferline.internal.v1 import features_pb2 as fpb
from inferline.internal.v1 import features_pb2_grpc as fpb_grpc
from inferline.v1 import inference_pb2 as pb


class FeatureClient(Protocol):
    """Fetches a route's feature matrix; both implementations pass one contract suite."""

    async def get(
        self,
        route: str,
        ids: list[EntityId],
        request_features: Mapping[str, float],
        *,
        deadline: Deadline,
        names: Sequence[str] | None = None,
    ) -> FeatureVector:
        """See ``FeaturesService.get``; raises the same ``InferlineError`` subclasses."""
        ...


class LocalFeatureClient:
    """In-process client (embedded topology): awaits the service directly, no copies."""

    def __init__(self, service: FeaturesService) -> None:
        self._service = service

    async def get(
        self,
        route: str,
        ids: list[EntityId],
        request_features: Mapping[str, float],
        *,
        deadline: Deadline,
        names: Sequence[str] | None = None,
    ) -> FeatureVector:
        return await self._service.get(route, ids, request_features, deadline=deadline, names=names)


class GrpcFeatureClient:
    """Client of a remote ``Features`` service (suite topology).

    ``routes`` supplies each route's join key for the ``EntityKey`` names; the server still
    validates everything, and a route missing here is sent anyway so the server answers
    NOT_FOUND. A call that cannot finish within the deadline raises
    ``DependencyUnavailable`` (the caller degrades), unlike the in-process client, which
    can still return degraded defaults.
    """

    def __init__(self, channel: grpc.aio.Channel, routes: Mapping[str, RouteConfig]) -> None:
        self._stub = fpb_grpc.FeaturesStub(channel)
        self._join_keys = {name: route.entity.join_key for name, route in routes.items()}

    async def get(
        self,
        route: str,
        ids: list[EntityId],
        request_features: Mapping[str, float],
        *,
        deadline: Deadline,
        names: Sequence[str] | None = None,
    ) -> FeatureVector:
        request = fpb.GetFeaturesRequest(
            route=route,
            entities=_entity_keys(self._join_keys.get(route, ""), ids),
            request_features=request_features,
            features=names or (),
        )
        try:
            response = await self._stub.GetFeatures(request, timeout=deadline.remaining_s())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return _to_vector(response)


def _entity_keys(join_key: str, ids: Sequence[EntityId]) -> list[pb.EntityKey]:
    keys = []
    for i, entity in enumerate(ids):
        try:
            if isinstance(entity, str):
                keys.append(pb.EntityKey(name=join_key, string_value=entity))
            else:
                keys.append(pb.EntityKey(name=join_key, int64_value=entity))
        except (TypeError, ValueError) as err:  # not an int, or outside int64
            raise InvalidInput(f"entities[{i}]", f"{join_key} cannot be sent as a key: {err}") from err
    return keys


def _to_vector(response: fpb.GetFeaturesResponse) -> FeatureVector:
    shape = (response.rows, len(response.feature_names))
    values = np.array(response.values, dtype=np.float32).reshape(shape)
    defaulted = np.array(response.defaulted, dtype=np.bool_).reshape(shape)
    return FeatureVector(tuple(response.feature_names), values, defaulted, response.degraded)
