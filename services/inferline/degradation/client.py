"""``DegradationClient``: the router's port to the degradation service, in-process or over gRPC."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np

from inferline.core.config import RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.entities import EntityId, check_entity_ids
from inferline.core.errors import DependencyUnavailable, InvalidInput, RouteNotFound, from_rpc_error
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation.cache import CachedScore, WriteBehind
from inferline.degradation.service import (
    DEFAULT_MAX_PENDING_WRITES,
    DegradationService,
    DegradedAnswer,
)
from inferline.features.vector import FeatureVector
from inferline.internal.v1 import degradation_pb2 as dpb
from inferline.internal.v1 import degradation_pb2_grpc as dpb_grpc
from inferline.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

RECORD_TIMEOUT_S = 1.0
"""gRPC deadline of one RecordScores call (off the critical path, so not the request's)."""

REASON_TO_PB = {r: pb.DegradationReason.Value(f"DEGRADATION_REASON_{r.name}") for r in Reason}
PB_TO_REASON = {v: r for r, v in REASON_TO_PB.items()}
SERVED_BY_TO_PB = {s: pb.ServedBy.Value(f"SERVED_BY_{s.name}") for s in ServedBy}
PB_TO_SERVED_BY = {v: s for s, v in SERVED_BY_TO_PB.items()}


class DegradationClient(Protocol):
    """Degraded answers and write-through of good ones; both implementations pass one contract suite."""

    async def degrade(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        features: FeatureVector | None,
        reason: Reason,
        *,
        deadline: Deadline,
    ) -> DegradedAnswer:
        """See ``DegradationService.degrade``; raises the same ``InferlineError`` subclasses."""
        ...

    def record(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float] | np.ndarray) -> None:
        """Fire and forget (needs a running loop); RouteNotFound / InvalidInput raise at once."""
        ...

    async def close(self) -> None:
        """Finish or cancel what ``record`` left in flight (not the service or the channel)."""
        ...


class LocalDegradationClient:
    """In-process client (embedded topology): calls the service directly, no copies."""

    def __init__(self, service: DegradationService) -> None:
        self._service = service

    async def degrade(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        features: FeatureVector | None,
        reason: Reason,
        *,
        deadline: Deadline,
    ) -> DegradedAnswer:
        return await self._service.degrade(tenant, route, ids, features, reason, deadline=deadline)

    def record(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float] | np.ndarray) -> None:
        self._service.record(tenant, route, ids, scores)

    async def close(self) -> None:
        """Nothing of its own: the service's owner closes the service (and its pending writes)."""


class GrpcDegradationClient:
    """Client of a remote ``Degradation`` service (suite topology).

    ``routes`` supplies join keys for the ``EntityKey`` names and lets ``record`` refuse an
    unknown route, bad keys or bad scores at once, as the in-process twin does. A route
    unknown here is still sent by ``degrade``, so the server answers NOT_FOUND. Transport
    failures raise ``DependencyUnavailable``: unlike the in-process service, a remote one
    can be unreachable. Each ``record`` is a background RecordScores call; at most
    ``max_pending`` are in flight, more are dropped and counted in ``records_dropped``.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        routes: Mapping[str, RouteConfig],
        *,
        max_pending: int = DEFAULT_MAX_PENDING_WRITES,
    ) -> None:
        self._stub = dpb_grpc.DegradationStub(channel)
        self._routes = dict(routes)
        self._join_keys = {name: route.entity.join_key for name, route in routes.items()}
        self._records = WriteBehind(_RecordScores(self._stub, self._join_keys), max_pending, RECORD_TIMEOUT_S)

    @property
    def records_dropped(self) -> int:
        return self._records.dropped

    @property
    def record_errors(self) -> int:
        return self._records.errors

    async def degrade(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        features: FeatureVector | None,
        reason: Reason,
        *,
        deadline: Deadline,
    ) -> DegradedAnswer:
        request = dpb.DegradeRequest(
            tenant=tenant,
            route=route,
            entities=_entity_keys(self._join_keys.get(route, ""), ids),
            reason=REASON_TO_PB[reason],
        )
        if features is not None:
            request.feature_names.extend(features.names)
            request.feature_values.extend(features.values.ravel().tolist())
        try:
            response = await self._stub.Degrade(request, timeout=max(deadline.remaining_s(), 0.001))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        served_by = PB_TO_SERVED_BY.get(response.served_by)
        if served_by is None or len(response.scores) != len(ids):
            raise DependencyUnavailable(f"malformed Degrade response ({len(response.scores)} scores, {served_by})")
        return DegradedAnswer(
            scores=np.array(response.scores, dtype=np.float32),
            served_by=served_by,
            model_name=response.model_name,
            cache_age_ms=response.cache_age_ms,
        )

    def record(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float] | np.ndarray) -> None:
        config = self._routes.get(route)
        if config is None:
            raise RouteNotFound(route)
        check_entity_ids(config, ids)
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(ids):
            raise InvalidInput("scores", f"{values.shape[0]} scores for {len(ids)} entities")
        if not np.isfinite(values).all():
            raise InvalidInput("scores", "scores must be finite")
        self._records.submit(tenant, route, list(ids), values.tolist())

    async def close(self) -> None:
        await self._records.close(RECORD_TIMEOUT_S)


class _RecordScores:
    """The remote service seen as a ``ScoreCache`` sink, so ``WriteBehind`` can bound the calls."""

    def __init__(self, stub: dpb_grpc.DegradationAsyncStub, join_keys: Mapping[str, str]) -> None:
        self._stub = stub
        self._join_keys = join_keys

    async def get_many(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[CachedScore | None]:
        return [None] * len(ids)  # write-only

    async def put_many(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        entities = _entity_keys(self._join_keys[route], ids)
        request = dpb.RecordScoresRequest(tenant=tenant, route=route, entities=entities, scores=scores)
        try:
            await self._stub.RecordScores(request, timeout=RECORD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def close(self) -> None:
        """The channel belongs to the caller."""


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
