"""gRPC adapter of ``DegradationService``: convert the request, delegate, convert the answer back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from inferline.core.config import RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.entities import parse_entity_ids
from inferline.core.errors import InvalidInput, RouteNotFound, rpc_method
from inferline.core.served_by import Reason
from inferline.degradation.client import PB_TO_REASON, SERVED_BY_TO_PB
from inferline.degradation.service import DegradationService
from inferline.features.vector import FeatureVector
from inferline.internal.v1 import degradation_pb2 as dpb
from inferline.internal.v1 import degradation_pb2_grpc as dpb_grpc

DEFAULT_DEADLINE_S = 1.0
"""Budget of a call that carries no deadline."""

REPLY_RESERVE_S = 0.001
"""Kept back from the caller's deadline so the answer still reaches it in time."""


class DegradationServicer(dpb_grpc.DegradationServicer):
    """Thin: all logic lives in ``DegradationService``; errors map to statuses in ``rpc_method``."""

    def __init__(self, service: DegradationService, routes: Mapping[str, RouteConfig]) -> None:
        self._service = service
        self._routes = routes

    @rpc_method
    async def Degrade(
        self, request: dpb.DegradeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dpb.DegradeResponse:
        route = self._route(request.route)
        ids = parse_entity_ids(route, request.entities)
        reason = PB_TO_REASON.get(request.reason)
        if reason is None:
            raise InvalidInput("reason", f"a degradation reason is required, got {request.reason}")
        features = _features(route, request, len(ids), reason)
        deadline = Deadline.from_context(context, default_s=DEFAULT_DEADLINE_S).split(REPLY_RESERVE_S)
        answer = await self._service.degrade(request.tenant, request.route, ids, features, reason, deadline=deadline)
        return dpb.DegradeResponse(
            scores=answer.scores.tolist(),
            served_by=SERVED_BY_TO_PB[answer.served_by],
            model_name=answer.model_name,
            cache_age_ms=answer.cache_age_ms,
        )

    @rpc_method
    async def RecordScores(
        self, request: dpb.RecordScoresRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dpb.RecordScoresResponse:
        route = self._route(request.route)
        ids = parse_entity_ids(route, request.entities)
        self._service.record(request.tenant, request.route, ids, np.array(request.scores, dtype=np.float64))
        return dpb.RecordScoresResponse()

    def _route(self, name: str) -> RouteConfig:
        route = self._routes.get(name)
        if route is None:
            raise RouteNotFound(name)
        return route


def _features(route: RouteConfig, request: dpb.DegradeRequest, rows: int, reason: Reason) -> FeatureVector | None:
    """The request's feature matrix, or None when it carries none.

    Raises:
        InvalidInput: a name the route does not declare, a repeated name, or a number of
            values other than rows × names.
    """
    names = tuple(request.feature_names)
    if not names and not request.feature_values:
        return None
    declared = {f.name for f in route.features}
    unknown = [name for name in names if name not in declared]
    if unknown or len(set(names)) != len(names):
        raise InvalidInput("feature_names", f"must be distinct features of route {request.route!r}, got {list(names)}")
    if len(request.feature_values) != rows * len(names):
        raise InvalidInput(
            "feature_values", f"{len(request.feature_values)} values for {rows} entities × {len(names)} features"
        )
    values = np.array(request.feature_values, dtype=np.float32).reshape(rows, len(names))
    # Defaulted flags do not cross the wire; the router already flagged them in its answer.
    defaulted = np.zeros(values.shape, dtype=np.bool_)
    return FeatureVector(names, values, defaulted, degraded=reason is Reason.FEATURES_DEGRADED)
