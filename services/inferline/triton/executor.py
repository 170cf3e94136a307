"""``ModelExecutor`` port and ``TritonExecutor``, which runs a model on Triton over KServe v2 gRPC.

Two rules shape this module (docs/triton.md, "Triton semantics" and "Never cancel a call in flight"):

* Triton's per-request ``timeout`` parameter (µs) covers queue time only, and a gRPC
  deadline does not become that timeout. So the executor sends the model budget as
  ``timeout`` (Triton's queue policy rejects work whose caller has given up) and the
  traffic class as ``priority``.
* Cancelling an in-flight call can crash Triton 2.51 under load. So a call is never
  cancelled: when the budget runs out the executor stops *waiting* and the late
  result is dropped; the call's own gRPC deadline sits past
  Triton's timeout plus execution time, so the client never sends a cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.core.config import TlsClientConfig
from inferline.core.deadline import Deadline
from inferline.core.errors import (
    DependencyUnavailable,
    InvalidInput,
    ModelNotFound,
    ModelOutputInvalid,
    redact_addresses,
)
from inferline.core.served_by import Reason
from inferline.core.tls import aio_channel
from inferline.router.inflight import InFlightLimit
from inferline.triton.infer_stream import InferStream, StreamedRequestFailed

logger = logging.getLogger(__name__)

# How long past its budget a call may still run before gRPC gives up on it. Generous on
# purpose: it only bounds leaked calls; the caller stopped waiting long before.
CALL_GRACE_S = 5.0

# Timeout of the small control calls (readiness, metadata, config): a healthy Triton
# answers them in a millisecond; a slower answer means it is unreachable or stalled.
CONTROL_TIMEOUT_S = 1.5
# The statistics of every model in one answer: a little more work for Triton than a control call.
STATISTICS_TIMEOUT_S = 2.0

# gRPC core's reconnect backoff starts at 1 s and grows x1.6 up to 120 s
# (doc/connection-backoff.md), so a channel that saw Triton down for a few seconds could
# stay disconnected for a long while after a restart. Here a failed connection attempt is
# retried after 0.1 s, growing to 0.5 s at most: after a restart the channel is back
# within ~0.6 s (jitter is ±20%). Loopback attempts cost next to nothing.
# `min_reconnect_backoff_ms` is not a delay: gRPC core uses it as the minimum *connect
# timeout* of an attempt (subchannel.cc: deadline = max(next attempt, now + min)). It is
# kept at 1 s (default 20 s) so an attempt against a busy, just-restarted server is not
# aborted after 100 ms and retried in a loop; it bounds only attempts that hang.
# No keepalive pings: a dead local server resets the connection at once, and Triton's
# defaults (--grpc-http2-min-recv-ping-interval-without-data=300000,
# --grpc-http2-max-ping-strikes=2) answer frequent client pings with GOAWAY.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 1000),
]


class _Completion(Protocol):
    """What ``_send`` waits on: a unary call, or a streamed request's answer."""

    def add_done_callback(self, callback: Any, /) -> None: ...

    def __await__(self) -> Generator[Any, None, Any]: ...


@dataclass(frozen=True, slots=True)
class InferResult:
    scores: np.ndarray
    model_name: str
    model_version: str


class ModelCallFailed(DependencyUnavailable):
    """A model call that gave no usable answer; ``degradation_reason`` says how it failed."""

    degradation_reason = Reason.MODEL_ERROR
    is_timeout = False


class ModelBudgetExceeded(ModelCallFailed):
    """No answer within the budget (the call was left to finish unobserved), or Triton's
    queue timeout expired first: either way the deadline was the problem."""

    reason = "MODEL_DEADLINE"
    degradation_reason = Reason.DEADLINE
    is_timeout = True


class ModelOverloaded(ModelCallFailed):
    """Too many calls in flight to the model, or Triton's queue for it is full."""

    reason = "MODEL_OVERLOADED"
    degradation_reason = Reason.OVERLOAD


class ModelUnavailable(ModelCallFailed):
    """Triton is unreachable, or the model is not loaded or not ready."""

    reason = "MODEL_UNAVAILABLE"
    degradation_reason = Reason.MODEL_UNAVAILABLE


class ModelNotLoaded(ModelUnavailable):
    """Triton answered that the model (version) is not loaded or not ready, e.g. a pinned
    version it has just unloaded (``inferline models load`` with a new ``version_policy``):
    the router takes that variant out of route selection at once and chooses again."""


class ModelExecutor(Protocol):
    async def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        deadline: Deadline,
        priority: int,
        input_name: str,
        output_name: str,
        version: str = "",
    ) -> InferResult: ...


WarmUpShape = tuple[str, int, str, str, str]
"""One way a route calls a model: (model, feature count, input name, output name, version; "" for none)."""


def _classify(model: str, exc: grpc.aio.AioRpcError) -> ModelCallFailed:
    """Map Triton's status onto why the call failed (its messages are stable across 2.x)."""
    return _classify_message(model, exc.code(), exc.details() or "")


def _classify_message(model: str, code: grpc.StatusCode | None, details: str) -> ModelCallFailed:
    """``_classify`` from a status code and Triton's message; ``code`` None: the error of one
    request of a stream, which has a message only ("Request for unknown model: 'm' is not
    found", "Request timeout expired", …)."""
    # Say what happened, not where: a connection failure names the model server's address.
    said = redact_addresses(details)
    message = f"model {model} failed: {said}" if code is None else f"model {model} failed: {code.name}: {said}"
    if "timeout expired" in details.lower():
        return ModelBudgetExceeded(message)
    if "exceeds maximum queue size" in details.lower():
        return ModelOverloaded(message)
    lowered = details.lower()
    # Triton answers NOT_FOUND for a model or version it does not have, and UNAVAILABLE "... is
    # not at ready state" for one that is loading or unloading: both say it is not loaded.
    unknown = code is None and "unknown model" in lowered
    if code is grpc.StatusCode.NOT_FOUND or unknown or "not ready" in lowered or "not at ready state" in lowered:
        return ModelNotLoaded(message)
    if code is grpc.StatusCode.UNAVAILABLE:
        return ModelUnavailable(message)
    return ModelCallFailed(message)


def _missing_version(model: str, version: str, exc: grpc.aio.AioRpcError) -> ModelNotFound | None:
    """A NOT_FOUND for an explicitly requested version is the caller's error, not an outage."""
    if version and exc.code() == grpc.StatusCode.NOT_FOUND:
        return ModelNotFound(model, f"model {model!r} has no version {version!r}")
    return None


class TritonExecutor:
    """Runs models on one Triton server through its KServe v2 gRPC API (tritonclient's stubs).

    Calls in flight to each model are bounded (``max_in_flight``), counting calls whose
    callers stopped waiting until Triton answers them: the queue on Triton can never grow
    past the bound, whatever the offered load (docs/triton.md, "Never cancel a call in flight").
    """

    def __init__(
        self,
        url: str,
        max_in_flight: Mapping[str, int] | None = None,
        default_max_in_flight: int = 64,
        shares_bound_with: Mapping[str, str] | None = None,
        tls: TlsClientConfig | None = None,
        stream_calls: bool = False,
    ) -> None:
        """``shares_bound_with`` maps a model to the model whose in-flight bound it shares: a
        traffic class's copy runs on the same instances as its base model, so calls to the
        copies and the base count against one bound, or Triton's queue could grow past it.
        ``tls`` (``triton.tls``): the channel runs over TLS; None: plain text. ``stream_calls``:
        ``infer`` sends its requests over a ModelStreamInfer stream per model (``InferStream``:
        ~40 % less client CPU per request, for a batch job's many alike requests); ``forward``
        and the control calls stay unary."""
        self._channel = aio_channel(url, tls, "triton.tls", CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._limits: dict[str, InFlightLimit] = {m: InFlightLimit(n) for m, n in (max_in_flight or {}).items()}
        self._default_limit = default_max_in_flight
        self._shared = dict(shares_bound_with or {})
        self._abandoned = 0
        self._stream_calls = stream_calls
        self._streams: dict[str, InferStream] = {}
        """One stream per model: Triton answers a stream in request order, so another model's
        requests (a variant being measured beside the job's) must not wait behind these."""

    def _limit(self, model: str) -> InFlightLimit:
        limit = self._limits.get(model)
        if limit is None:
            base = self._shared.get(model)
            limit = self._limit(base) if base is not None else InFlightLimit(self._default_limit)
            self._limits[model] = limit
        return limit

    async def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        deadline: Deadline,
        priority: int,
        input_name: str = "features",
        output_name: str = "score",
        version: str = "",
    ) -> InferResult:
        """Run ``model`` on ``inputs`` [N, F] float32 and return its N scores.

        ``version``: the model version to run (a variant's pinned ``version``); "" lets
        Triton choose (the highest-numbered ready version its ``version_policy`` loaded).

        Raises:
            ModelBudgetExceeded: no answer within ``deadline`` (the call is not cancelled),
                or Triton's queue timeout expired.
            ModelOverloaded: the in-flight bound is reached, or Triton's queue is full.
            ModelUnavailable: Triton unreachable, model missing or not ready.
            ModelCallFailed: any other failure of the call.
            ModelOutputInvalid: the response lacks the output tensor or has the wrong size.
        """
        budget_s = deadline.remaining_s()
        if budget_s <= 0:
            raise ModelBudgetExceeded(f"no time left for model {model}")
        request = self._request(model, inputs, priority, budget_s, input_name)
        if version:
            request.model_version = version
        try:
            response = await self._send(model, request, budget_s, streamed=self._stream_calls)
        except grpc.aio.AioRpcError as exc:
            raise _classify(model, exc) from exc
        except StreamedRequestFailed as exc:
            raise _classify_message(model, None, str(exc)) from exc
        return self._result(response, inputs.shape[0], output_name)

    async def forward(
        self, request: service_pb2.ModelInferRequest, *, deadline: Deadline, priority: int
    ) -> service_pb2.ModelInferResponse:
        """Run a caller's own KServe v2 request on Triton (the router's KServe front door).

        A copy of ``request`` is sent with Triton ``priority`` and the remaining budget as
        its queue ``timeout`` (µs; a shorter ``timeout`` of the caller's own is kept), under
        the same per-model in-flight bound and never-cancel wait as ``infer``. The caller's
        ``request`` is not modified.

        Raises:
            ModelBudgetExceeded: no answer within ``deadline`` (the call is not cancelled),
                or Triton's queue timeout expired.
            ModelOverloaded: the in-flight bound is reached, or Triton's queue is full.
            InvalidInput: Triton refused the request as malformed (shapes, datatypes,
                input names, batch size): the caller's error, with Triton's message.
            ModelNotFound: the requested model version does not exist.
            ModelUnavailable: Triton unreachable, model missing or not ready.
            ModelCallFailed: any other failure of the call.
        """
        model = request.model_name
        budget_s = deadline.remaining_s()
        if budget_s <= 0:
            raise ModelBudgetExceeded(f"no time left for model {model}")
        forwarded = service_pb2.ModelInferRequest()
        forwarded.CopyFrom(request)
        timeout_us = max(1, int(budget_s * 1e6))
        own = forwarded.parameters.get("timeout")
        if own is not None and own.WhichOneof("parameter_choice") == "int64_param" and own.int64_param > 0:
            timeout_us = min(timeout_us, own.int64_param)
        forwarded.parameters["priority"].uint64_param = priority
        forwarded.parameters["timeout"].int64_param = timeout_us
        try:
            response: service_pb2.ModelInferResponse = await self._send(model, forwarded, budget_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput("inputs", redact_addresses(exc.details() or "rejected by the model server")) from exc
            raise _missing_version(model, request.model_version, exc) or _classify(model, exc) from exc
        return response

    async def _send(
        self, model: str, request: service_pb2.ModelInferRequest, budget_s: float, *, streamed: bool = False
    ) -> service_pb2.ModelInferResponse:
        """Send ``request`` under the model's in-flight bound; wait at most ``budget_s``, never cancel.

        ``streamed``: over the model's stream (``InferStream``) rather than a unary call of its own.

        Raises:
            ModelOverloaded: the in-flight bound is reached.
            ModelBudgetExceeded: no answer within ``budget_s``; the call runs on, unobserved.
            grpc.aio.AioRpcError: Triton's error (or the stream broke), for the caller to classify.
            StreamedRequestFailed: Triton refused a streamed request.
        """
        limit = self._limit(model)
        if not limit.try_acquire():
            raise ModelOverloaded(f"{limit.limit} calls already in flight to model {model}")
        try:
            if streamed:
                call: _Completion = self._stream_of(model).submit(request)
            else:
                call = self._stub.ModelInfer(request, timeout=budget_s + CALL_GRACE_S)
        except BaseException:  # nothing was sent (a stream refuses once the executor is closing)
            limit.release()
            raise
        # The permit is released when Triton answers, not when we stop waiting.
        call.add_done_callback(lambda _call: limit.release())
        if not await self._wait(call, budget_s):
            self._abandon(call)
            raise ModelBudgetExceeded(f"model {model} did not answer within {budget_s * 1000:.1f} ms")
        response: service_pb2.ModelInferResponse = await call
        return response

    def _stream_of(self, model: str) -> InferStream:
        stream = self._streams.get(model)
        if stream is None:
            stream = self._streams[model] = InferStream(self._stub)
        return stream

    @staticmethod
    async def _wait(call: _Completion, budget_s: float) -> bool:
        """Wait for ``call`` to end, at most ``budget_s``; never cancels it.

        Hand-written instead of ``wait_for(shield(call))``: that wraps the call in two more
        tasks per request, measurable on the hot path. If the waiting task itself is
        cancelled (the caller went away) only the waiter is cancelled, not the call.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()

        def finish(result: bool) -> None:
            if not waiter.done():
                waiter.set_result(result)

        call.add_done_callback(lambda _call: finish(True))
        timer = loop.call_later(budget_s, finish, False)
        try:
            return await waiter
        finally:
            timer.cancel()

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

    def _abandon(self, call: _Completion) -> None:
        """Count a late call until it ends; its outcome is read so nothing goes unretrieved."""
        self._abandoned += 1

        def forget(done: Any) -> None:
            self._abandoned -= 1
            if isinstance(done, asyncio.Future) and not done.cancelled():
                done.exception()  # a streamed answer: mark its error retrieved

        call.add_done_callback(forget)

    @property
    def abandoned_calls(self) -> int:
        """Calls still running on Triton whose callers have stopped waiting."""
        return self._abandoned

    def in_flight(self, model: str) -> int:
        return self._limit(model).in_flight

    async def warm_up(self, shapes: Iterable[WarmUpShape], timeout_s: float = 30.0) -> None:
        """Connect and run each shape once, so the first real request pays no connection set-up.

        ``shapes``: (model, feature count, input name, output name, version), one per
        distinct way a route calls a model, so every route's shape is warmed, not one per
        model; a pinned version is warmed as that version. A model (version) Triton has not
        loaded is skipped (readiness reports it); other failures are logged, not raised: a
        model that is down now is the degradation path's business. The router also runs
        it for a pinned version that Triton has just loaded, before route selection may
        pick it (``ModelReadiness``'s ``on_ready``).
        """
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except TimeoutError:
            logger.warning("Triton not reachable for warm-up within %.0f s", timeout_s)
            return
        ready: dict[tuple[str, str], bool] = {}
        for model, width, input_name, output_name, version in dict.fromkeys(shapes):
            if (model, version) not in ready:
                ready[model, version] = await self.is_model_ready(model, version)
            if not ready[model, version]:
                continue
            try:
                zeros = np.zeros((1, width), np.float32)
                await self.infer(
                    model,
                    zeros,
                    deadline=Deadline.after(timeout_s),
                    priority=3,
                    input_name=input_name,
                    output_name=output_name,
                    version=version,
                )
            except (DependencyUnavailable, ModelOutputInvalid) as err:
                logger.warning("warm-up of model %s%s failed: %s", model, f" version {version}" if version else "", err)

    async def server_ready(self) -> bool:
        """Whether Triton says it is ready. Raises ``ModelUnavailable`` when it does not answer."""
        response = await self._control("server", self._stub.ServerReady, service_pb2.ServerReadyRequest())
        return bool(response.ready)

    async def model_ready(self, name: str, version: str = "") -> bool:
        """Whether Triton says the model (version) is ready. Raises ``ModelUnavailable`` when it does not answer."""
        request = service_pb2.ModelReadyRequest(name=name, version=version)
        response = await self._control(name, self._stub.ModelReady, request, version)
        return bool(response.ready)

    async def model_metadata(self, name: str, version: str = "") -> service_pb2.ModelMetadataResponse:
        """Triton's metadata of the model (inputs, outputs, versions).

        Raises:
            ModelNotFound: no such version. ModelUnavailable: Triton unreachable or the model not loaded.
        """
        request = service_pb2.ModelMetadataRequest(name=name, version=version)
        return await self._control(name, self._stub.ModelMetadata, request, version)

    async def model_config(self, name: str, version: str = "") -> service_pb2.ModelConfigResponse:
        """Triton's configuration of the model; raises as ``model_metadata``."""
        request = service_pb2.ModelConfigRequest(name=name, version=version)
        return await self._control(name, self._stub.ModelConfig, request, version)

    async def repository_index(self) -> dict[str, tuple[str, str]]:
        """Every model of Triton's repository, loaded or not → (state, reason), e.g. ("READY", "").

        Raises:
            ModelUnavailable: Triton failed or did not answer.
        """
        try:
            response = await self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise ModelUnavailable(
                f"model repository index unavailable: {exc.code().name}: {redact_addresses(exc.details() or '')}"
            ) from exc
        index: dict[str, tuple[str, str]] = {}
        for model in response.models:
            if index.get(model.name, ("",))[0] != "READY":  # one entry per version: a ready one wins
                index[model.name] = (model.state, model.reason)
        return index

    async def model_statistics(self) -> service_pb2.ModelStatisticsResponse:
        """Triton's statistics of every model (counts, queue and compute durations, batch sizes).

        Raises:
            ModelUnavailable: Triton failed or did not answer within ``STATISTICS_TIMEOUT_S``.
        """
        try:
            response: service_pb2.ModelStatisticsResponse = await self._stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(), timeout=STATISTICS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise ModelUnavailable(
                f"model server statistics unavailable: {exc.code().name}: {redact_addresses(exc.details() or '')}"
            ) from exc
        return response

    async def _control(self, model: str, method: Any, request: Any, version: str = "") -> Any:
        """One small control call with a short timeout (not an inference: nothing to protect)."""
        try:
            return await method(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            err = _missing_version(model, version, exc) or ModelUnavailable(
                f"model server did not answer for {model}: {exc.code().name}: {redact_addresses(exc.details() or '')}"
            )
            raise err from exc

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        try:
            request = service_pb2.ModelReadyRequest(name=model, version=version)
            response = await self._stub.ModelReady(request, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.ready)

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self._streams.values()))
        await self._channel.close(grace=None)
