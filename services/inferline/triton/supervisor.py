"""``TritonSupervisor``: notices that the bundled Triton died, reports it at once and restarts it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from inferline.core.deadline import Clock
from inferline.triton.launcher import TritonLauncher

logger = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0


class TritonSupervisor:
    """Watches the bundled Triton process and keeps it running (embedded default only).

    Algorithm: a background task polls ``launcher.is_running()`` every ``poll_interval_s``.
    When the process has exited it sets ``available`` to False at once (so the router
    degrades immediately instead of waiting for calls to time out), logs the death once,
    and calls ``launcher.restart()`` in a worker thread (same ports, so clients'
    addresses stay valid). A failed restart is retried after a backoff that starts at
    ``RESTART_BACKOFF_INITIAL_S`` and doubles up to ``RESTART_BACKOFF_MAX_S``. When a
    restart returns, the server and its models are ready: ``available`` becomes True,
    ``restarts`` grows by one and ``last_ready_at`` is set.

    States: AVAILABLE (polling) → DOWN (restarting, with backoff) → AVAILABLE.
    Invariants: ``available`` is True only between a ready (re)start and the next poll
    that finds the process gone; ``on_change(available)`` is called once per change of
    ``available``; only one restart runs at a time; the supervisor never stops Triton.

    It detects exits only: a hung but running server is the circuit breaker's business.
    Shut down in this order: ``await supervisor.stop()``, then ``launcher.stop()``;
    otherwise the supervisor takes the requested stop for a death and restarts the server.
    ``launcher.restart`` holds the launcher's lock, so a ``launcher.stop()`` issued after
    ``stop()`` cancelled the watch mid-restart waits for that restart, then stops the server.
    """

    def __init__(
        self,
        launcher: TritonLauncher,
        poll_interval_s: float = 0.2,
        on_change: Callable[[bool], None] | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self._launcher = launcher
        self._poll_interval_s = poll_interval_s
        self._on_change = on_change
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._available = False
        self._restarts = 0
        self._last_down_at: float | None = None
        self._last_ready_at: float | None = None

    @property
    def available(self) -> bool:
        """True while the server is running and its models were ready at the last (re)start."""
        return self._available

    @property
    def restarts(self) -> int:
        """Completed restarts (failed attempts are not counted)."""
        return self._restarts

    @property
    def last_down_at(self) -> float | None:
        """Clock reading when the supervisor last found the server gone; None if it never has."""
        return self._last_down_at

    @property
    def last_ready_at(self) -> float | None:
        """Clock reading when the server was last ready: at ``start`` or after a restart."""
        return self._last_ready_at

    async def start(self) -> None:
        """Start watching; no-op if already watching.

        The owner normally starts the launcher first; a server that is not running at
        this point is treated as down and started by the watch task.
        """
        if self._task is not None and not self._task.done():
            return
        if self._launcher.is_running():
            self._last_ready_at = self._clock()
            self._set_available(True)
        self._task = asyncio.create_task(self._watch(), name="triton-supervisor")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop watching (a restart already running in its thread finishes on its own); Triton keeps running."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() instead of awaiting the task: a cancellation of our caller still propagates.
        await asyncio.wait([task])

    async def _watch(self) -> None:
        while True:
            if self._launcher.is_running():
                await asyncio.sleep(self._poll_interval_s)
                continue
            self._last_down_at = self._clock()
            self._set_available(False)
            logger.error(
                "tritonserver exited (code %s); degrading and restarting it, log %s",
                self._launcher.returncode,
                self._launcher.log_path,
            )
            await self._restart_until_ready()

    async def _restart_until_ready(self) -> None:
        delay_s = RESTART_BACKOFF_INITIAL_S
        attempt = 1
        while True:
            try:
                await asyncio.to_thread(self._launcher.restart)
            except Exception as exc:  # any failure to start must leave the supervisor alive to retry
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                logger.warning("tritonserver restart %d failed (%s); next try in %.1f s", attempt, first_line, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, RESTART_BACKOFF_MAX_S)
                attempt += 1
                continue
            self._restarts += 1
            self._last_ready_at = self._clock()
            self._set_available(True)
            down_s = self._last_ready_at - (self._last_down_at or self._last_ready_at)
            logger.info("tritonserver ready again after %.1f s (pid %s)", down_s, self._launcher.pid)
            return

    def _set_available(self, available: bool) -> None:
        if available == self._available:
            return
        self._available = available
        if self._on_change is not None:
            try:
                self._on_change(available)
            except Exception:  # a faulty listener must not stop the supervision
                logger.exception("TritonSupervisor on_change listener failed")


def _log_crash(task: asyncio.Task[None]) -> None:
    """The watch loop only ends by cancellation; anything else means Triton is no longer supervised."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("TritonSupervisor stopped watching tritonserver", exc_info=task.exception())
