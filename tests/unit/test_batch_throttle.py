"""Yielding to online traffic: the AIMD policy on the online queue wait, and the adjustable gate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from inferline.batch.errors import BatchInputError
from inferline.batch.spec import BatchJobSpec
from inferline.batch.throttle import (
    QUEUE_WAIT_METRIC,
    AdjustableGate,
    OnlineYield,
    RouterMetricsWait,
    RouterQueueWait,
    YieldPolicy,
)
from inferline.core.ports import free_port
from tests.waiting import WITHIN_S

TARGET_S = 0.002


@pytest.mark.parametrize(
    ("waits", "limits"),
    [
        ([0.001, None, 0.002], [8, 8, 8]),  # at or below the target, or no online request: full speed
        ([0.010], [4]),  # above: halve
        ([0.010, 0.010, 0.010, 0.010], [4, 2, 1, 0]),  # an online burst that lasts: pause
        ([0.010, 0.010, 0.010, 0.010, None, 0.001], [4, 2, 1, 0, 1, 2]),  # then probe back, one at a time
    ],
)
def test_yield_policy_backs_off_multiplicatively_and_recovers_additively(
    waits: list[float | None], limits: list[int]
) -> None:
    policy = YieldPolicy(max_limit=8, target_s=TARGET_S)
    assert [policy.update(w) for w in waits] == limits


def test_yield_policy_refuses_a_backoff_that_never_backs_off() -> None:
    with pytest.raises(ValueError, match="backoff"):
        YieldPolicy(max_limit=8, target_s=TARGET_S, backoff=1.0)


async def test_gate_at_zero_admits_nobody_until_raised() -> None:
    gate = AdjustableGate(0)
    entered = asyncio.Event()

    async def enter() -> None:
        async with gate:
            entered.set()

    task = asyncio.create_task(enter())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not entered.is_set()
    await gate.set_limit(1)
    await asyncio.wait_for(entered.wait(), 5)
    await task
    assert gate.held == 0


async def test_a_lower_limit_takes_effect_as_permits_come_back() -> None:
    gate = AdjustableGate(3)
    release, two_inside = asyncio.Event(), asyncio.Event()
    inside: list[int] = []

    async def hold() -> None:
        async with gate:
            inside.append(gate.held)
            if len(inside) == 2:
                two_inside.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.wait_for(two_inside.wait(), 5)
    await gate.set_limit(1)
    late = asyncio.create_task(hold())
    for _ in range(10):
        await asyncio.sleep(0)
    assert inside == [1, 2]  # a third permit was free under the old limit, not under the new one
    release.set()
    await asyncio.gather(*holders, late)
    assert inside == [1, 2, 1]


async def test_permits_go_to_waiters_first_come_first_served() -> None:
    gate = AdjustableGate(1)
    order: list[int] = []

    async def take(i: int) -> None:
        async with gate:
            order.append(i)
            await asyncio.sleep(0)

    await asyncio.gather(*(take(i) for i in range(20)))
    assert order == list(range(20))
    assert gate.held == 0


async def test_a_cancelled_waiter_takes_no_permit_and_one_granted_as_it_is_cancelled_passes_it_on() -> None:
    gate = AdjustableGate(1)
    release = asyncio.Event()
    entered: list[str] = []

    async def hold(name: str) -> None:
        async with gate:
            entered.append(name)
            await release.wait()

    async def hold_then_cancel_the_next() -> None:
        async with gate:
            entered.append("holder")
            await release.wait()
        # The permit was just handed to "granted-then-cancelled", which has not run yet.
        waiting[1].cancel()

    holder = asyncio.create_task(hold_then_cancel_the_next())
    for _ in range(5):
        await asyncio.sleep(0)
    waiting = [asyncio.create_task(hold(name)) for name in ("cancelled", "granted-then-cancelled", "last")]
    for _ in range(5):
        await asyncio.sleep(0)
    waiting[0].cancel()  # still queued: it leaves the queue
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert gate.held == 1
    release.set()
    await holder
    await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)  # "last" got the permit
    assert [task.cancelled() for task in waiting] == [True, True, False]
    assert entered == ["holder", "last"]
    assert gate.held == 0
    async with gate:  # nothing leaked: the one permit is free
        assert gate.held == 1


async def test_the_routers_wait_is_its_peak_since_the_last_sample() -> None:
    wait = RouterQueueWait()
    assert await wait.sample() is None  # nothing told yet
    for told in (0.001, 0.009, 0.002):
        wait.push(told)
    assert await wait.sample() == 0.009  # a spike between two samples still counts
    # Sampled again before the router's next word: its latest, not "no online traffic".
    assert await wait.sample() == 0.002
    wait.push(0.0)
    assert await wait.sample() == 0.0
    assert await wait.sample() == 0.0


class Told:
    """A wait signal whose samples the test sets (stands in for Triton's statistics)."""

    def __init__(self) -> None:
        self.next: float | None = None

    async def sample(self) -> float | None:
        return self.next


async def test_the_job_backs_off_when_either_signal_passes_its_own_target() -> None:
    triton, router = Told(), RouterQueueWait()
    gate = AdjustableGate(8)
    policy = YieldPolicy(max_limit=8, target_s=TARGET_S)
    controller = OnlineYield(triton, policy, gate, interval_s=0.001, more=[(router, 0.010)])
    await controller.start()
    running = asyncio.create_task(controller.run())
    try:
        triton.next = 0.001  # Triton's queue under its target (2 ms)...
        router.push(0.005)  # ...and the router's under its own (10 ms): full speed
        await asyncio.sleep(0.02)
        assert gate.limit == 8
        give_up = time.monotonic() + WITHIN_S
        while gate.limit > 0:  # the router's wait over its target, Triton's still under its own
            assert time.monotonic() < give_up, "the job never backed off"
            router.push(0.050)
            await asyncio.sleep(0.002)
        assert controller.last_wait_s == 0.050  # the larger wait is what the metrics show
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# --- the routers' queue wait read off their metrics endpoints -----------------------------


@pytest.fixture
def router_metrics() -> Iterator[Callable[[float | None], str]]:
    """Starts real Prometheus endpoints, each with the routers' queue-wait gauge at a value
    (None: an endpoint without it); returns the URL of each."""
    servers = []

    def start(wait_s: float | None) -> str:
        registry = CollectorRegistry()
        if wait_s is not None:
            Gauge(QUEUE_WAIT_METRIC, "the router's queue wait", registry=registry).set(wait_s)
        port = free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}/metrics"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_the_busiest_router_that_answers_sets_the_wait(router_metrics: Callable[[float | None], str]) -> None:
    quiet, busy, without = router_metrics(0.001), router_metrics(0.040), router_metrics(None)
    gone = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    assert await RouterMetricsWait([quiet, busy, without, gone]).sample() == pytest.approx(0.040)
    assert await RouterMetricsWait([quiet, gone]).sample() == pytest.approx(0.001)
    assert await RouterMetricsWait([gone, without]).sample() is None  # no reading: the job goes on


def test_router_metrics_are_urls_named_in_the_error() -> None:
    with pytest.raises(BatchInputError, match="router_metrics"):
        BatchJobSpec.build(route="r", input_path="in.parquet", output_dir="out", router_metrics=["10.0.0.1:9464"])
    with pytest.raises(ValueError, match="at least one"):
        RouterMetricsWait([])


async def test_the_gate_counts_the_time_it_admitted_nobody() -> None:
    now = [10.0]
    gate = AdjustableGate(2, clock=lambda: now[0])
    await gate.set_limit(0)
    now[0] = 12.0
    assert gate.paused_s == 2.0  # still paused: counted up to now
    await gate.set_limit(0)  # paused again while paused: no new start
    now[0] = 13.0
    await gate.set_limit(1)
    now[0] = 20.0
    assert gate.paused_s == 3.0
    await gate.set_limit(0)
    now[0] = 20.5
    assert gate.paused_s == 3.5
    assert AdjustableGate(0, clock=lambda: now[0]).paused_s == 0.0  # a gate made shut starts counting at once
