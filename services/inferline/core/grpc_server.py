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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from inferline.core import tls
from inferline.core.config import ServerConfig
from inferline.core.decoding import SafeDecoding

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


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve server reflection, v1 and v1alpha, listing ``service_names`` and the reflection services.

    grpcio-reflection ships only v1alpha; v1 (what ``buf curl --reflect-protocol grpc-v1``
    and newer grpcurl ask for first) has the same messages on the wire under another
    package, so the same servicer answers both.
    """
    names = (*service_names, REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    v1_handlers = grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})
    server.add_generic_rpc_handlers((v1_handlers,))


async def start_server(
    services: Sequence[ServiceRegistration],
    config: ServerConfig,
    port: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> RunningServer:
    """Start a server hosting ``services`` on ``config.host:port`` (port 0 picks a free one).

    ``interceptors`` run after the server's own (call activity, safe decoding), e.g. the
    internal services' service-token check.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.so_reuseport", 0),
        # grpc-core holds calls that grpc.aio has not asked for yet (it asks for one per method at a
        # time) and, past 1000 of them (3000 hard), cancels new arrivals at random: CANCELLED, no
        # details, before any handler runs (2,000 one-call connections lost 7-128 calls). grpc.aio
        # takes them as fast as it can and refuses those over max_concurrent_rpcs with
        # RESOURCE_EXHAUSTED, so core must not drop a burst first: let it hold 16x that limit.
        ("grpc.server.max_pending_requests", max(3000, 16 * config.max_concurrent_rpcs)),
        ("grpc.server.max_pending_requests_hard_limit", max(3000, 16 * config.max_concurrent_rpcs)),
    ]
    activity = CallActivity()
    server = grpc.aio.server(
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        interceptors=[activity, SafeDecoding(), *interceptors],
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.full_name for s in services)
    for service in services:
        service.add(server)
    _add_reflection((*names, health.SERVICE_NAME), server)
    # Over TLS when server.tls is set (mutual TLS with its client_ca_file); plain text otherwise.
    bound = tls.add_port(server, f"{config.host}:{config.port if port is None else port}", config.tls)
    if bound == 0:
        raise OSError(f"cannot bind {config.host}:{config.port if port is None else port}")
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("gRPC server listening on %s:%d (%s)", config.host, bound, ", ".join(names))
    return RunningServer(server, health_servicer, bound, names, activity)
