"""Yielding to online traffic: the AIMD policy on the online queue wait, and the adjustable gate."""

from __future__ import annotations

import asyncio

import pytest

from inferline.batch.throttle import AdjustableGate, YieldPolicy

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
