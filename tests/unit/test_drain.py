"""The drain's quiet detection: ``CallActivity`` and ``wait_until_quiet``, on a stand-in clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from inferline.core.grpc_server import CallActivity, wait_until_quiet


class Clock:
    """Time that moves only when the code under test sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Details:
    method: str


async def _handler(details: Any) -> str:
    return f"handler for {details.method}"


def test_calls_are_counted_but_health_checks_and_reflection_are_not() -> None:
    clock = Clock()
    activity = CallActivity(clock)
    clock.now = 105.0
    assert asyncio.run(activity.intercept_service(_handler, Details("/inferline.v1.Inference/Predict"))) == (
        "handler for /inferline.v1.Inference/Predict"
    )
    assert activity.last_call_at == 105.0
    clock.now = 110.0
    asyncio.run(activity.intercept_service(_handler, Details("/grpc.health.v1.Health/Check")))
    asyncio.run(activity.intercept_service(_handler, Details("/grpc.reflection.v1alpha.ServerReflection/Info")))
    assert activity.last_call_at == 105.0  # a balancer's health checks go on after it stopped sending


def test_the_drain_ends_once_no_call_came_for_the_quiet_time() -> None:
    clock = Clock()
    calls_until = 103.0  # a balancer keeps sending for 3 s after NOT_SERVING

    def last_call_at() -> float:
        return min(clock.now, calls_until)

    waited = asyncio.run(wait_until_quiet(last_call_at, quiet_s=1.0, max_s=10.0, clock=clock, sleep=clock.sleep))
    assert 4.0 <= waited < 4.1


def test_the_drain_never_outlasts_its_limit() -> None:
    clock = Clock()
    waited = asyncio.run(wait_until_quiet(lambda: clock.now, quiet_s=1.0, max_s=2.5, clock=clock, sleep=clock.sleep))
    assert 2.5 <= waited < 2.6  # calls never stopped


def test_an_idle_server_stops_at_once() -> None:
    clock = Clock()
    waited = asyncio.run(wait_until_quiet(lambda: 50.0, quiet_s=1.0, max_s=10.0, clock=clock, sleep=clock.sleep))
    assert waited == 0.0
