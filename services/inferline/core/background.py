"""``BackgroundTask``: one named task running beside the server until stopped.

The router keeps a few small loops in the background (the event-loop lag probe, Triton
model readiness, Triton statistics). Each needs the same care: start once, keep a
reference (the event loop holds tasks only weakly), stop by cancelling and waiting, and a
periodic step that fails once must not end the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class BackgroundTask:
    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the task (in the running loop); a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Cancel the task and wait for it; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def every(
    interval_s: float, step: Callable[[], Awaitable[object]], what: str
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A loop that awaits ``step`` every ``interval_s``; a failing step is logged, and the loop goes on."""

    async def run() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                logger.exception("%s failed", what)

    return run
