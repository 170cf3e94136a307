"""``KeyedDispatcher``: same key in arrival order, different keys concurrently, bounded in flight.

Each submitted job becomes a task that first waits for the previous job of its key (the
key's tail), so jobs of one key run one after another in submission order while jobs of
other keys run alongside. ``submit`` waits for a free slot, and a slot is held from
submission until the job ends (waiting behind its key included): at most ``limit`` jobs
exist at once, so the reader stops when full and memory stays flat however far behind
the worker is. A failed job does not stop the jobs after it (the worker decides what a
failure means).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)


class KeyedDispatcher:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def room(self) -> int:
        return self._limit - len(self._tasks)

    async def wait_room(self) -> int:
        """Wait until at least one slot is free; the free slots."""
        async with self._slots:
            pass
        return max(self.room, 1)

    async def submit(self, key: Hashable, job: Callable[[], Awaitable[None]]) -> None:
        """Start ``job`` after the previous job of ``key``; waits while ``limit`` jobs exist."""
        await self._slots.acquire()
        previous = self._tails.get(key)
        task = asyncio.create_task(self._run(key, previous, job))
        self._tails[key] = task
        self._tasks.add(task)

    async def _run(
        self, key: Hashable, previous: asyncio.Task[None] | None, job: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own; only the order matters here
            await job()
        except Exception:  # the worker handles its own failures; this is a bug, kept from killing the loop
            logger.exception("stream job of key %r failed", key)
        finally:
            me = asyncio.current_task()
            if me is not None:
                self._tasks.discard(me)
            if self._tails.get(key) is me:
                del self._tails[key]
            self._slots.release()

    async def drain(self) -> None:
        """Wait for every job submitted so far."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
