"""``BackgroundTask`` and ``every`` alone."""

from __future__ import annotations

from inferline.core.background import BackgroundTask, every
from tests.waiting import eventually


async def test_every_runs_the_step_and_survives_a_failing_one() -> None:
    calls = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("one bad round")

    task = BackgroundTask("t", every(0.001, step, "test step"))
    task.start()
    task.start()  # a second start does nothing
    await eventually(lambda: len(calls) >= 4, "four rounds")
    assert task.running
    await task.stop()
    await task.stop()  # idempotent
    assert not task.running
    assert len(calls) >= 4, "the loop went on after the failing step"
