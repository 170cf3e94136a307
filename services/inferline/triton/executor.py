"""``ModelExecutor`` port and ``TritonExecutor``, which runs a model on Triton over KServe v2 gRPC.

Two rules shape this module (RECIPES.md, "Triton semantics" and "Known defect"):

* Triton's per-request ``timeout`` parameter (µs) covers queue time only, and a gRPC
  deadline does not become that timeout. So the executor sends the model budget as
  ``timeout`` (Triton's queue policy rejects work whose caller has given up) and the
  traffic class as ``priority``.
* Cancelling an in-flight call can crash Triton 2.51 under load. So a call is never
  cancelled: when the budget runs out the executor stops *waiting* (the call is
  shielded) and the late result is dropped; the call's own gRPC deadline sits past
  Triton's timeout plus execution time, so the client never sends a cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.core.deadline import Deadline
from inferline.core.errors import DependencyUnavailable, ModelOutputInvalid

logger = logging.getLogger(__name__)

# How long past its budget a call may still run before gRPC gives up on it. Generous on
# purpose: it only bounds leaked calls; the caller stopped waiting long before.
CALL_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class InferResult:
    scores: np.ndarray
    model_name: str
    model_version: str


class ModelBudgetExceeded(DependencyUnavailable):
    """The model did not answer within its budget; the call was left to finish unobserved."""

    reason = "MODEL_DEADLINE"


class ModelExecutor(Protocol):
    async def infer(
        self, model: str, inputs: np.ndarray, *, deadline: Deadline, priority: int, input_name: str, output_name: str
    ) -> InferResult: ...


class TritonExecutor:
    """Runs models on one Triton server through its KServe v2 gRPC API (tritonclient's stubs)."""

    def __init__(self, url: str) -> None:
        self._channel = grpc.aio.insecure_channel(
            url, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._abandoned: set[asyncio.Future[service_pb2.ModelInferResponse]] = set()

    async def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        deadline: Deadline,
        priority: int,
        input_name: str = "features",
        output_name: str = "score",
    ) -> InferResult:
        """Run ``model`` on ``inputs`` [N, F] float32 and return its [N, 1] scores.

        Raises:
            ModelBudgetExceeded: no answer within ``deadline`` (the call is not cancelled).
            DependencyUnavailable: Triton refused or failed the request (queue full,
                timeout expired in queue, model not ready, server down).
            ModelOutputInvalid: the response lacks the output tensor or has the wrong size.
        """
        budget_s = deadline.remaining_s()
        if budget_s <= 0:
            raise ModelBudgetExceeded("no time left for the model")
        request = self._request(model, inputs, priority, budget_s, input_name)
        call = asyncio.ensure_future(self._stub.ModelInfer(request, timeout=budget_s + CALL_GRACE_S))
        try:
            response = await asyncio.wait_for(asyncio.shield(call), budget_s)
        except TimeoutError:
            self._abandon(call)
            raise ModelBudgetExceeded(f"model {model} did not answer within {budget_s * 1000:.1f} ms") from None
        except grpc.aio.AioRpcError as exc:
            raise DependencyUnavailable(f"model {model} failed: {exc.code().name}: {exc.details()}") from exc
        return self._result(response, inputs.shape[0], output_name)

    @staticmethod
    def _request(
        model: str, inputs: np.ndarray, priority: int, budget_s: float, input_name: str
    ) -> service_pb2.ModelInferRequest:
        tensor = service_pb2.ModelInferRequest.InferInputTensor(
            name=input_name, datatype="FP32", shape=list(inputs.shape)
        )
        request = service_pb2.ModelInferRequest(
            model_name=model, inputs=[tensor], raw_input_contents=[np.ascontiguousarray(inputs, np.float32).tobytes()]
        )
        request.parameters["priority"].uint64_param = priority
        request.parameters["timeout"].int64_param = max(1, int(budget_s * 1e6))
        return request

    @staticmethod
    def _result(response: service_pb2.ModelInferResponse, rows: int, output_name: str) -> InferResult:
        for i, output in enumerate(response.outputs):
            if output.name == output_name and i < len(response.raw_output_contents):
                scores = np.frombuffer(response.raw_output_contents[i], dtype=np.float32)
                if scores.shape[0] != rows:
                    raise ModelOutputInvalid(
                        f"model {response.model_name} returned {scores.shape[0]} scores for {rows}"
                    )
                return InferResult(scores, response.model_name, response.model_version)
        raise ModelOutputInvalid(f"model {response.model_name} returned no {output_name!r} output")

    def _abandon(self, call: asyncio.Future[service_pb2.ModelInferResponse]) -> None:
        """Keep a late call referenced until it ends, and observe its outcome so none goes unretrieved."""
        self._abandoned.add(call)
        call.add_done_callback(self._forget)

    def _forget(self, call: asyncio.Future[service_pb2.ModelInferResponse]) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()

    @property
    def abandoned_calls(self) -> int:
        """Calls still running on Triton whose callers have stopped waiting."""
        return len(self._abandoned)

    async def warm_up(self, models: dict[str, tuple[int, str, str]], timeout_s: float = 30.0) -> None:
        """Connect and run each model once, so the first real request pays no connection set-up.

        ``models`` maps a model name to (feature count, input name, output name). Failures
        are logged, not raised: a model that is down now is the degradation path's business.
        """
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except TimeoutError:
            logger.warning("Triton not reachable for warm-up within %.0f s", timeout_s)
            return
        for model, (width, input_name, output_name) in models.items():
            try:
                zeros = np.zeros((1, width), np.float32)
                await self.infer(
                    model,
                    zeros,
                    deadline=Deadline.after(timeout_s),
                    priority=3,
                    input_name=input_name,
                    output_name=output_name,
                )
            except (DependencyUnavailable, ModelOutputInvalid) as err:
                logger.warning("warm-up of model %s failed: %s", model, err)

    async def is_model_ready(self, model: str) -> bool:
        try:
            response = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.ready)

    async def close(self) -> None:
        await self._channel.close(grace=None)
