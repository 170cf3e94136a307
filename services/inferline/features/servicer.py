"""gRPC adapter of ``FeaturesService``: convert the request, delegate, convert the answer back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from inferline.core.config import RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.entities import parse_entity_ids
from inferline.core.errors import RouteNotFound, rpc_method
from inferline.features.service import FeaturesService
from inferline.internal.v1 import features_pb2 as fpb
from inferline.internal.v1 import features_pb2_grpc as fpb_grpc

DEFAULT_DEADLINE_S = 1.0
"""Budget of a call that carries no deadline."""

REPLY_RESERVE_S = 0.002
"""Kept back from the caller's deadline so a degraded answer still reaches it in time."""


class FeaturesServicer(fpb_grpc.FeaturesServicer):
    """Thin: all logic lives in ``FeaturesService``; errors map to statuses in ``rpc_method``."""

    def __init__(self, service: FeaturesService, routes: Mapping[str, RouteConfig]) -> None:
        self._service = service
        self._routes = routes

    @rpc_method
    async def GetFeatures(
        self, request: fpb.GetFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fpb.GetFeaturesResponse:
        route = self._routes.get(request.route)
        if route is None:
            raise RouteNotFound(request.route)
        ids = parse_entity_ids(route, request.entities)
        deadline = Deadline.from_context(context, default_s=DEFAULT_DEADLINE_S).split(REPLY_RESERVE_S)
        vector = await self._service.get(
            request.route, ids, request.request_features, deadline=deadline, names=list(request.features) or None
        )
        return fpb.GetFeaturesResponse(
            feature_names=vector.names,
            rows=vector.rows,
            values=vector.values.ravel().tolist(),
            defaulted=vector.defaulted.ravel().tolist(),
            degraded=vector.degraded,
        )
