"""``wait_until_serving_async``: a server that comes up late is seen soon after it does."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inferline.core.health_wait import wait_until_serving_async
from inferline.core.ports import free_port

DOWN_S = 10.0
"""How long nothing listens while the wait polls: gRPC's default reconnect backoff (1 s, × 1.6
per failure, ± 20 %) has by then grown to ~4–7 s between attempts, so with it the wait would
see the server ≥ ~4 s late; the wait's own channel retries about every second at most."""
SEEN_WITHIN_S = 3.0


async def test_a_server_that_listens_late_is_seen_within_a_poll_or_two() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    waiting = asyncio.ensure_future(wait_until_serving_async(address, timeout_s=60))
    await asyncio.sleep(DOWN_S)  # the scenario itself: a worker whose start-up takes this long
    assert not waiting.done()
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    listening = time.monotonic()
    try:
        await asyncio.wait_for(waiting, 30)
        late_s = time.monotonic() - listening
    finally:
        await server.stop(None)
    assert late_s < SEEN_WITHIN_S, f"SERVING seen {late_s:.1f} s after the server listened"
