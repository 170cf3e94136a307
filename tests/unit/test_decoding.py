"""Undecodable request bodies: INVALID_ARGUMENT through a real grpc.aio server, and a rate-limited log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inferline.core.decoding import RateLimitedWarning, SafeDecoding

CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[SafeDecoding()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_garbage_bytes_are_invalid_argument_not_unknown(channel: grpc.aio.Channel) -> None:
    raw = channel.unary_unary(CHECK)  # no serializers: the bytes go out as they are
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff\xff garbage", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (info.value.details() or "")


async def test_a_good_request_after_a_bad_one_is_served(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await channel.unary_unary(CHECK)(b"\x0a\xff", timeout=5)  # a truncated length-delimited field
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_warning_is_logged_once_per_period_with_a_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warning = RateLimitedWarning(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="inferline.core.decoding"):
        assert warning.warn("bad %s", "x")
        assert not warning.warn("bad %s", "x")
        assert not warning.warn("bad %s", "x")
        now[0] = 10.0
        assert warning.warn("bad %s", "x")
    assert [r.getMessage() for r in caplog.records] == ["bad x", "bad x (2 more since the last report)"]
