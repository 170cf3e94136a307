"""RouteHealth: a route is SERVING while one of its full-quality variants is ready and it passed its check."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from inferline.core.config import EntitySpec, FeatureSpec, RouteConfig, VariantConfig
from inferline.router.route_health import RouteHealth, route_service_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RecordingHealth:
    """Stands in for grpc_health's aio servicer: remembers the last status of each service."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.changed = asyncio.Condition()

    async def set(self, service: str, status: int) -> None:
        async with self.changed:
            self.status[service] = status
            self.changed.notify_all()

    async def reaches(self, service: str, status: int, timeout_s: float = 5.0) -> bool:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.status.get(service) == status), timeout_s)
        return True


def route(primary: str, *alternates: str, light: str | None = None) -> RouteConfig:
    def variant(model: str) -> VariantConfig:
        return VariantConfig(model=model, features=["x"])

    return RouteConfig(
        entity=EntitySpec(join_key="id"),
        features=[FeatureSpec(name="x", default=0.0)],
        primary=variant(primary),
        alternates=[variant(a) for a in alternates],
        light=variant(light) if light else None,
    )


ROUTES = {"ranking": route("gpu", "cpu", light="light"), "fraud": route("fraud"), "typo": route("ok")}


def test_a_route_serves_while_any_full_variant_is_ready() -> None:
    ready = {"cpu", "light", "ok"}
    health = RouteHealth(ROUTES, ready.__contains__, disabled={"typo": "input width"})
    assert health.serving() == {"ranking": True, "fraud": False, "typo": False}


def test_the_light_model_alone_does_not_make_a_route_serving() -> None:
    health = RouteHealth({"ranking": ROUTES["ranking"]}, {"light"}.__contains__)
    assert health.serving() == {"ranking": False}


async def test_statuses_follow_readiness_and_drain_to_not_serving() -> None:
    ready = {"cpu"}
    servicer = RecordingHealth()
    health = RouteHealth(ROUTES, ready.__contains__, interval_s=0.01)
    await health.start(servicer)
    assert servicer.status[route_service_name("ranking")] == SERVING
    assert servicer.status[route_service_name("fraud")] == NOT_SERVING

    ready.add("fraud")
    assert await servicer.reaches(route_service_name("fraud"), SERVING)

    await health.stop(servicer)
    assert set(servicer.status.values()) == {NOT_SERVING}
