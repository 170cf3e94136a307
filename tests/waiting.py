"""Waiting for a condition instead of sleeping for a guessed time.

A test that sleeps "long enough" for something to happen fails on a machine busy enough
to make it take longer, and wastes the time on an idle one. These poll the condition
itself and give up only after ``WITHIN_S``, a bound nothing that works comes near: it
turns a hang into a failure, it is not a measure of speed.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Callable

WITHIN_S = 30.0
"""How long a condition may take to hold before the test fails (a hang, not slowness)."""


async def eventually(condition: Callable[[], bool], what: str = "", within_s: float = WITHIN_S) -> float:
    """Poll ``condition`` on the running loop until it holds; the monotonic time it was seen true."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what or 'condition'} not met within {within_s} s"
        await asyncio.sleep(0.005)
    return time.monotonic()


def wait_until(
    condition: Callable[[], bool], what: str = "", within_s: float = WITHIN_S, step_s: float = 0.02
) -> float:
    """Poll ``condition``, blocking (run it in a thread from async code); the monotonic time it was seen true."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what or 'condition'} not met within {within_s} s"
        time.sleep(step_s)
    return time.monotonic()


def process_running(pid: int) -> bool:
    """``pid`` is alive and not a zombie: an orphan's zombie waits for a reaper this container's
    PID 1 may not be, and a process that has exited is gone for a test's purposes."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the (command), which may hold spaces
