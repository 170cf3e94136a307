"""Build, start and drain a grpc.aio server with health checking and reflection.

Startup order: build the server, register the services, health and reflection, then
start. Shutdown order (SIGTERM): report NOT_SERVING, wait ``drain_s`` so load balancers
notice, stop with ``grace_s`` for in-flight calls, then the caller closes its clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (the package ships no type stubs)
    port: int
    service_names: tuple[str, ...]

    async def drain_and_stop(self, drain_s: float, grace_s: float) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain_s > 0:
            await asyncio.sleep(drain_s)
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
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
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
    return RunningServer(server, health_servicer, bound, names)
