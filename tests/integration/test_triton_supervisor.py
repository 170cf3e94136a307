"""TritonSupervisor against the real bundled Triton: SIGKILL it, see it degrade, restart and serve again."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from inferline.core.config import TritonConfig
from inferline.core.deadline import Deadline
from inferline.core.errors import DependencyUnavailable
from inferline.demo.driver_data import PRIMARY_FEATURES
from inferline.triton.executor import TritonExecutor
from inferline.triton.launcher import START_ATTEMPTS, TritonLauncher, TritonStartError
from inferline.triton.supervisor import TritonSupervisor

pytestmark = pytest.mark.requires_triton

MODEL = "driver_ranker"
POLL_INTERVAL_S = 0.1
DOWN_DETECTED_WITHIN_S = 10 * POLL_INTERVAL_S
"""The supervisor must see the kill at one of its next polls: ten leave a busy machine room,
and a supervisor that does not poll would never see it at all."""
EXTRA_OUTAGE_S = 15.0
RESTART_WITHIN_S = EXTRA_OUTAGE_S + 30.0
RECONNECT_WITHIN_S = 2.0
"""How soon after Triton is ready again the executor's channel answers. The bound tells the
executor's reconnect settings (backoff capped well under a second) from gRPC's default, which
after this outage has grown to ~7-11 s (``SlowToRestartLauncher``): a mechanism's figure, with
a busy machine's second to spare, not a measure of speed."""


class SlowToRestartLauncher(TritonLauncher):
    """Stays down ``EXTRA_OUTAGE_S`` longer before restarting, like a server with big models to load.

    The outage must be long for the test to tell the reconnect settings apart: gRPC's default
    backoff (1 s, x1.6, ±20%) would have grown to ~7-11 s by the time the server is back, so a
    channel with it would most likely wait well past ``RECONNECT_WITHIN_S``.
    """

    def restart(self) -> None:
        time.sleep(EXTRA_OUTAGE_S)
        super().restart()


@pytest.fixture
async def triton_launcher(triton_config: TritonConfig, tmp_path: pathlib.Path) -> AsyncIterator[TritonLauncher]:
    """A bundled Triton of this test's own (the shared ``triton_server`` must survive the kill)."""
    launcher = SlowToRestartLauncher(triton_config, log_path=tmp_path / "tritonserver.log")
    await asyncio.to_thread(launcher.start)
    try:
        yield launcher
    finally:
        await asyncio.to_thread(launcher.stop)


async def score(executor: TritonExecutor) -> bool:
    """One inference of one row; True when the model answered with a score."""
    rows = np.zeros((1, len(PRIMARY_FEATURES)), np.float32)
    try:
        result = await executor.infer(MODEL, rows, deadline=Deadline.after(1.0), priority=1)
    except DependencyUnavailable:  # includes ModelBudgetExceeded
        return False
    return result.scores.shape == (1,)


async def wait_for(condition: Callable[[], bool], within_s: float, step_s: float = 0.02) -> float:
    """Poll ``condition`` until it holds; returns the monotonic time it was seen true."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(step_s)
    return time.monotonic()


async def test_killed_triton_is_reported_down_restarted_and_served_again(triton_launcher: TritonLauncher) -> None:
    changes: list[bool] = []
    executor = TritonExecutor(triton_launcher.grpc_url)  # created before the kill, on purpose
    supervisor = TritonSupervisor(triton_launcher, poll_interval_s=POLL_INTERVAL_S, on_change=changes.append)
    await supervisor.start()
    try:
        assert supervisor.available
        assert await score(executor)  # the channel is connected
        first_pid, first_url = triton_launcher.pid, triton_launcher.grpc_url
        assert first_pid is not None

        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_for(lambda: not supervisor.available, DOWN_DETECTED_WITHIN_S)
        assert supervisor.last_down_at is not None
        assert supervisor.last_down_at - killed_at < DOWN_DETECTED_WITHIN_S

        # Keep calling while it is down, as the router would: every call fails fast and the
        # channel keeps failing to connect, which is what grows gRPC's reconnect backoff.
        deadline = time.monotonic() + RESTART_WITHIN_S
        while not supervisor.available:
            assert time.monotonic() < deadline, "Triton not restarted in time"
            await score(executor)  # fails, unless it lands between ready and the supervisor noticing
            await asyncio.sleep(0.2)
        assert supervisor.restarts == 1
        assert triton_launcher.pid not in (None, first_pid)
        assert triton_launcher.grpc_url == first_url
        assert changes == [True, False, True]  # available at start, then down, then up again

        ready_at = supervisor.last_ready_at
        assert ready_at is not None
        answered_at = await wait_for_score(executor, ready_at + RECONNECT_WITHIN_S)
        assert answered_at - ready_at <= RECONNECT_WITHIN_S
    finally:
        await supervisor.stop()
        await executor.close()
    assert triton_launcher.is_running()  # stopping the supervisor leaves Triton to its owner


async def wait_for_score(executor: TritonExecutor, until: float) -> float:
    """Call until the model answers; returns the monotonic time of the first answer."""
    while not await score(executor):
        assert time.monotonic() < until, "the executor's channel did not reconnect in time"
        await asyncio.sleep(0.05)
    return time.monotonic()


class CrashesOnceDuringStartup(TritonLauncher):
    """Kills its first server before it is ready, as the python backend's rare abort while
    loading does; every later server starts untouched."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.killed: list[int] = []

    def _wait_ready(self, deadline: float) -> None:
        if not self.killed:
            assert self._proc is not None
            self.killed.append(self._proc.pid)
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        super()._wait_ready(deadline)


def test_a_server_that_dies_during_startup_is_started_once_more(
    triton_config: TritonConfig, tmp_path: pathlib.Path
) -> None:
    launcher = CrashesOnceDuringStartup(triton_config, log_path=tmp_path / "tritonserver.log", models=[MODEL])
    try:
        launcher.start()
        assert launcher.is_running() and launcher.pid not in launcher.killed
        assert launcher.models == (MODEL,)
        log = (tmp_path / "tritonserver.log").read_text()
        assert log.count("=== inferline: starting") == 2  # both starts, in the one kept log
    finally:
        launcher.stop()


def test_a_server_that_keeps_dying_during_startup_is_reported_after_the_second_start(
    triton_config: TritonConfig, tmp_path: pathlib.Path
) -> None:
    class AlwaysCrashes(CrashesOnceDuringStartup):
        def _wait_ready(self, deadline: float) -> None:
            self.killed.clear()
            super()._wait_ready(deadline)

    launcher = AlwaysCrashes(triton_config, log_path=tmp_path / "tritonserver.log", models=[MODEL])
    with pytest.raises(TritonStartError, match="exited with code") as failed:
        launcher.start()
    assert failed.value.exited and not launcher.is_running()
    assert (tmp_path / "tritonserver.log").read_text().count("=== inferline: starting") == START_ATTEMPTS
