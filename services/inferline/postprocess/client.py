"""``PostprocessClient`` port with its in-process and gRPC implementations."""

from __future__ import annotations

from typing import Protocol

import grpc
import numpy as np

from inferline.core.deadline import Deadline
from inferline.core.errors import from_rpc_error
from inferline.internal.v1 import postprocess_pb2 as pb
from inferline.internal.v1 import postprocess_pb2_grpc as pb_grpc
from inferline.postprocess.service import PostprocessService, RankedScore


class PostprocessClient(Protocol):
    async def process(
        self, route: str, scores: np.ndarray, num_entities: int, top_k: int, *, deadline: Deadline
    ) -> list[RankedScore]: ...


class LocalPostprocessClient:
    """Calls the service in-process (embedded default): no serialisation, no copy."""

    def __init__(self, service: PostprocessService) -> None:
        self._service = service

    async def process(
        self, route: str, scores: np.ndarray, num_entities: int, top_k: int, *, deadline: Deadline
    ) -> list[RankedScore]:
        return self._service.process(route, scores, num_entities, top_k)


class GrpcPostprocessClient:
    """Calls a remote ``Postprocess`` service; remote errors come back as domain errors."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.PostprocessStub(channel)

    async def process(
        self, route: str, scores: np.ndarray, num_entities: int, top_k: int, *, deadline: Deadline
    ) -> list[RankedScore]:
        request = pb.ProcessRequest(
            route=route, num_entities=num_entities, scores=np.asarray(scores).reshape(-1).tolist(), top_k=top_k
        )
        try:
            response = await self._stub.Process(request, timeout=max(deadline.remaining_s(), 0.001))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return [RankedScore(r.entity_index, r.score, r.decision, r.rank) for r in response.ranked]
