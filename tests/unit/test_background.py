"""``BackgroundTask`` and ``every`` alone."""

from __future__ import annotations

import asyncio

from inferline.core.background import BackgroundTask, every


async def test_every_runs_the_step_and_survives_a_failing_one() -> None:
    calls = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("one bad round")

    task = BackgroundTask("t", every(0.001, step, "test step"))
    task.start()
    task.start()  # a second start does nothing
    for _ in range(200):
        if len(calls) >= 4:
            break
        await asyncio.sleep(0.002)
    assert task.running
    await task.stop()
    await task.stop()  # idempotent
    assert not task.running
    assert len(calls) >= 4, "the loop went on after the failing step"
