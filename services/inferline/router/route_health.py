"""Per-route readiness on ``grpc.health.v1``: service ``inferline.route.<route>``.

A load balancer or an operator asks one route's health the standard way (``grpc_health_probe
-service inferline.route.driver_ranking``), while the server's own ("") health stays
SERVING: the other routes still serve, and this one still answers from its degradation
path. A route is SERVING while at least one of its full-quality variants (primary or an
alternate) may be called — Triton up and the model loaded — and it passed the start-up
check; NOT_SERVING otherwise (its model failed to load, Triton is down, or the check found
a mismatch and ``validation.on_mismatch`` is ``not_serving``). The light model does not
count: a route whose only ready model is the light one is not serving its model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from grpc_health.v1 import health_pb2

from inferline.core.config import RouteConfig

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "inferline.route."
"""Health service name of a route: this prefix and the route's name."""


def route_service_name(route: str) -> str:
    """``inferline.route.<route>``: the route's service name on ``grpc.health.v1``."""
    return f"{SERVICE_PREFIX}{route}"


class RouteHealth:
    """Keeps each route's health status in step with which of its variants may be called.

    Polls ``variant_ready(ref)`` (a variant's ``ref``: model, or model:version; a set
    lookup, refreshed in the background by ``ModelReadiness``) every ``interval_s`` and
    sets a route's status on the health servicer when it changes, logging the change
    once. ``disabled`` routes (route → why) stay NOT_SERVING.
    """

    def __init__(
        self,
        routes: Mapping[str, RouteConfig],
        variant_ready: Callable[[str], bool],
        disabled: Mapping[str, str] | None = None,
        interval_s: float = 0.5,
    ) -> None:
        self._models = {name: tuple(v.ref for v in route.full_variants) for name, route in routes.items()}
        self._ready = variant_ready
        self._disabled = dict(disabled or {})
        self._interval_s = interval_s
        self._status: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    def serving(self) -> dict[str, bool]:
        """Each route → whether it is serving now."""
        return {
            name: name not in self._disabled and any(self._ready(m) for m in models)
            for name, models in self._models.items()
        }

    async def start(self, health: Any) -> None:
        """Set every route's status on ``health`` (a ``grpc_health`` aio servicer) now, then follow changes."""
        await self._update(health)
        self._task = asyncio.create_task(self._follow(health), name="route-health")

    async def stop(self, health: Any) -> None:
        """Stop following and report every route NOT_SERVING (the process is draining)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        for name in self._models:
            await health.set(route_service_name(name), health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _follow(self, health: Any) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._update(health)
            except Exception:  # a faulty probe must not end the follow loop
                logger.exception("route health update failed")

    async def _update(self, health: Any) -> None:
        for name, serving in self.serving().items():
            if self._status.get(name) == serving:
                continue
            first = name not in self._status
            self._status[name] = serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set(route_service_name(name), status)
            if not serving:
                why = self._disabled.get(name, "no full-quality variant is loaded on Triton")
                logger.warning("route %s NOT_SERVING (%s): it answers from its degradation path", name, why)
            elif not first:
                logger.info("route %s SERVING again", name)
