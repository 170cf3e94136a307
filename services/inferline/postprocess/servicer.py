"""Thin gRPC adapter of ``PostprocessService``."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from inferline.core.errors import rpc_method
from inferline.internal.v1 import postprocess_pb2 as pb
from inferline.internal.v1 import postprocess_pb2_grpc as pb_grpc
from inferline.postprocess.service import PostprocessService


class PostprocessServicer(pb_grpc.PostprocessServicer):
    def __init__(self, service: PostprocessService) -> None:
        self._service = service

    @rpc_method
    async def Process(
        self, request: pb.ProcessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProcessResponse:
        ranked = self._service.process(
            request.route, np.asarray(request.scores, dtype=np.float32), request.num_entities, request.top_k
        )
        return pb.ProcessResponse(
            ranked=[
                pb.RankedScore(entity_index=r.entity_index, score=r.score, decision=r.decision, rank=r.rank)
                for r in ranked
            ]
        )
