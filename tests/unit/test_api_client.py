"""The slim Python client (clients/python): deadline and API key on every call, and the
server's rich errors decoded into typed exceptions.

The server side is a real grpc.aio server on a free port whose Predict is wrapped by the
server's own ``rpc_method``, so each error reaches the client encoded exactly as the
router encodes it (the full router is exercised in tests/integration/test_client_python.py).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

import inferline_client
from inferline.core.errors import InvalidInput, QuotaExceeded, RouteNotFound, Shed, rpc_method
from inferline.core.ports import free_ports
from inferline.v1 import errors_pb2, inference_pb2, inference_pb2_grpc
from inferline_client import (
    AsyncInferenceClient,
    AuthenticationError,
    InferenceClient,
    InferlineError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)

KEY = "client-test-key"


class _Servicer(inference_pb2_grpc.InferenceServicer):
    """Answers with what it saw (key, deadline), or raises the error ``behaviour`` names."""

    def __init__(self) -> None:
        self.behaviour: Callable[[], None] = lambda: None

    @rpc_method
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.PredictResponse:
        self.behaviour()
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        remaining_s = context.time_remaining()
        return inference_pb2.PredictResponse(
            request_id=request.request_id,
            route=request.route,
            model_name=str(auth),
            # The deadline the client set, as the server sees it (never None here).
            cache_age_ms=-1.0 if remaining_s is None else remaining_s * 1000,
            predictions=[inference_pb2.Prediction(entity=e, rank=i + 1) for i, e in enumerate(request.entities)],
        )


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, _Servicer]]:
    servicer = _Servicer()
    grpc_server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    await grpc_server.stop(None)


async def test_async_predict_sends_key_and_deadline(server: tuple[str, _Servicer]) -> None:
    address, _ = server
    async with AsyncInferenceClient(address, api_key=KEY, timeout_s=5.0) as client:
        reply = await client.predict("r", [("driver_id", 1001), ("user", "u-1")], request_id="abc")
        short = await client.predict("r", [("driver_id", 1)], timeout_s=0.5)
    assert reply.model_name == f"Bearer {KEY}"
    assert reply.request_id == "abc"
    assert [p.entity.int64_value for p in reply.predictions][:1] == [1001]
    assert reply.predictions[1].entity.string_value == "u-1"
    # gRPC rounds the timeout it sends up, by at most a few ms.
    assert 1000 < reply.cache_age_ms <= 5010
    assert 0 < short.cache_age_ms <= 510


async def test_sync_client_decodes_the_same_errors(server: tuple[str, _Servicer]) -> None:
    address, servicer = server

    def shed() -> None:
        raise Shed("over capacity", retry_after_s=0.25)

    servicer.behaviour = shed

    def call() -> OverloadedError:
        with InferenceClient(address, api_key=KEY, timeout_s=5.0) as client, pytest.raises(OverloadedError) as caught:
            client.predict("r", [("driver_id", 1)])
        return caught.value

    err = await asyncio.to_thread(call)  # a blocking client must not block the server's loop
    assert err.reason == errors_pb2.ERROR_REASON_SHED
    assert err.retry_after_s == pytest.approx(0.25)
    assert isinstance(err.__cause__, grpc.RpcError)


@pytest.mark.parametrize(
    ("error", "cls", "reason", "check"),
    [
        (Shed("over capacity", 0.25), OverloadedError, "SHED", lambda e: e.retry_after_s == pytest.approx(0.25)),
        (QuotaExceeded("quota", 2.0), OverloadedError, "QUOTA_EXCEEDED", lambda e: e.retry_after_s == 2.0),
        (
            InvalidInput("entities", "at least one"),
            InvalidArgumentError,
            "INVALID_INPUT",
            lambda e: e.field == "entities",
        ),
        (RouteNotFound("nope"), NotFoundError, "ROUTE_NOT_FOUND", lambda e: e.metadata == {"route": "nope"}),
    ],
)
async def test_server_errors_become_typed_errors(
    server: tuple[str, _Servicer], error: Exception, cls: type[InferlineError], reason: str, check: Any
) -> None:
    address, servicer = server

    def fail() -> None:
        raise error

    servicer.behaviour = fail
    async with AsyncInferenceClient(address, timeout_s=5.0) as client:
        with pytest.raises(cls) as caught:
            await client.predict("r", [("driver_id", 1)])
    assert caught.value.reason_name == reason
    assert caught.value.reason == errors_pb2.ErrorReason.Value("ERROR_REASON_" + reason)
    assert check(caught.value)


async def test_unexpected_server_failure_is_internal_without_a_reason(server: tuple[str, _Servicer]) -> None:
    address, servicer = server

    def crash() -> None:
        raise RuntimeError("boom")

    servicer.behaviour = crash
    async with AsyncInferenceClient(address, timeout_s=5.0) as client:
        with pytest.raises(InferlineError) as caught:
            await client.predict("r", [("driver_id", 1)])
    assert type(caught.value) is InferlineError
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.reason == errors_pb2.ERROR_REASON_UNSPECIFIED
    assert "boom" not in str(caught.value)


async def test_no_server_is_unavailable() -> None:
    (port,) = free_ports(1)
    async with AsyncInferenceClient(f"127.0.0.1:{port}", timeout_s=2.0) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.predict("r", [("driver_id", 1)])
    assert caught.value.reason == errors_pb2.ERROR_REASON_UNSPECIFIED


def test_unknown_reason_keeps_its_name() -> None:
    err = AuthenticationError("x", code=grpc.StatusCode.UNAUTHENTICATED, reason_name="FROM_A_NEWER_SERVER")
    assert err.reason == errors_pb2.ERROR_REASON_UNSPECIFIED
    assert err.reason_name == "FROM_A_NEWER_SERVER"


@pytest.mark.parametrize("value", [1.5, None, True])
def test_entity_values_must_be_int_or_str(value: object) -> None:
    with pytest.raises(TypeError, match="must be an int or a str"):
        inferline_client.entity_key(("driver_id", value))  # type: ignore[arg-type]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        InferenceClient("127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="target must be"):
        InferenceClient("")


def test_public_surface_is_exactly_all() -> None:
    public = {
        name
        for name, value in vars(inferline_client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(inferline_client.__all__)
