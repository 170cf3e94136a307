"""Wait until a gRPC server reports SERVING on the standard health service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.core.config import TlsClientConfig
from inferline.core.tls import aio_channel, channel

POLL_INTERVAL_S = 0.2
POLL_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", int(POLL_INTERVAL_S * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(POLL_INTERVAL_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
"""The waiting channel reconnects about as often as it polls. With gRPC's default backoff (1 s,
growing 1.6× a failure up to 120 s) a channel opened before the server listens goes on
failing fast for the rest of its backoff once it does: a router worker that took 30 s to
start (its Triton warm-up timing out) was seen SERVING 14 s before the wait noticed."""


def wait_until_serving(
    address: str, timeout_s: float, is_alive: object = None, tls: TlsClientConfig | None = None
) -> None:
    """Poll ``grpc.health.v1.Health/Check`` until SERVING.

    ``is_alive`` is an optional zero-argument callable; when it returns False (the
    process died) waiting stops at once. ``tls``: the server serves TLS; connect with it.

    Raises:
        TimeoutError: not SERVING within ``timeout_s``, or the process died.
    """
    deadline = time.monotonic() + timeout_s
    with channel(address, tls, "tls", POLL_CHANNEL_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if callable(is_alive) and not is_alive():
                raise TimeoutError(f"process serving {address} exited before it was ready")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")


async def wait_until_serving_async(
    address: str, timeout_s: float, is_alive: Callable[[], bool] | None = None, tls: TlsClientConfig | None = None
) -> None:
    """``wait_until_serving`` for a process that runs grpc.aio itself (the embedded gateway, workers).

    A blocking gRPC channel polled from a thread of a grpc.aio process was seen to hang
    there while other clients were answered; grpc.aio's own channel does not.

    Raises:
        TimeoutError: not SERVING within ``timeout_s``, or the process died.
    """
    deadline = time.monotonic() + timeout_s
    async with aio_channel(address, tls, "tls", POLL_CHANNEL_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if is_alive is not None and not is_alive():
                raise TimeoutError(f"process serving {address} exited before it was ready")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")
