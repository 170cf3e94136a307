"""Build, start and drain a grpc.aio server with health checking and reflection.

Startup order: build the server, register the services, health and reflection, then
start. Shutdown order (SIGTERM): report NOT_SERVING, wait until load balancers stop
sending (no call for ``drain_quiet_s``, at most ``drain_s``), stop with ``grace_s`` for
in-flight calls, then the caller closes its clients. Stopping while a balancer still sends
would lose calls: gRPC cancels those the transport took but no handler had yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inferline.core.config import ServerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    """A servicer to host: the full service name and how to add it to a server."""

    full_name: str
    add: Callable[[grpc.aio.Server], None]


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = grpc.aio.ServerInterceptor


class CallActivity(_Interceptor):
    """Remembers when the last call arrived, health checks aside: the drain waits for quiet."""

    _UNCOUNTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.last_call_at = clock()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not handler_call_details.method.startswith(self._UNCOUNTED):
            self.last_call_at = self._clock()
        return await continuation(handler_call_details)


async def wait_until_quiet(
    last_call_at: Callable[[], float],
    quiet_s: float,
    max_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> float:
    """Wait until no call arrived for ``quiet_s``, or ``max_s`` passed; returns the seconds waited."""
    started = clock()
    while True:
        now = clock()
        if now - started >= max_s or now - last_call_at() >= quiet_s:
            return now - started
        await sleep(min(0.05, quiet_s / 5))


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (the package ships no type stubs)
    port: int
    service_names: tuple[str, ...]
    activity: CallActivity

    async def drain_and_stop(self, drain_s: float, grace_s: float, quiet_s: float) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain_s > 0:
            waited = await wait_until_quiet(lambda: self.activity.last_call_at, quiet_s, drain_s)
            logger.info("drained for %.1f s (no call for %.1f s, or the %.1f s limit)", waited, quiet_s, drain_s)
        await self.server.stop(grace_s)


async def start_server(
    services: Sequence[ServiceRegistration], config: ServerConfig, port: int | None = None
) -> RunningServer:
    """Start a server hosting ``services`` on ``config.host:port`` (port 0 picks a free one)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.so_reuseport", 0),
    ]
    activity = CallActivity()
    server = grpc.aio.server(
        options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs, interceptors=[activity]
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.full_name for s in services)
    for service in services:
        service.add(server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{config.host}:{config.port if port is None else port}")
    if bound == 0:
        raise OSError(f"cannot bind {config.host}:{config.port if port is None else port}")
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("gRPC server listening on %s:%d (%s)", config.host, bound, ", ".join(names))
    return RunningServer(server, health_servicer, bound, names, activity)
