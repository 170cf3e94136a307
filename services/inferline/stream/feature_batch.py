"""``FeatureBatcher``: the features of concurrent events read together, in one store read.

Events are scored one by one (order per key), but reading the store one entity at a
time makes the store the bottleneck (Feast's embedded SQLite serialises reads on one
thread: ~70 events/s here). Requests that arrive while a read is running wait for the
next one, which takes them all (up to ``max_rows``): under load the reads grow to the
in-flight bound by themselves, and an idle worker still reads a lone event at once.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import numpy.typing as npt

from inferline.batch.features import BatchFeatures
from inferline.batch.rows import ParsedChunk
from inferline.stream.events import Event

Row = tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]


class FeatureBatcher:
    def __init__(self, features: BatchFeatures, request_features: list[str], max_rows: int = 1000) -> None:
        """``request_features``: the route's request-time feature names (taken from the events)."""
        self._features = features
        self._request = request_features
        self._max_rows = max_rows
        self._waiting: list[tuple[Event, asyncio.Future[Row]]] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def names(self) -> list[str]:
        return self._features.names

    async def get(self, event: Event) -> Row:
        """``event``'s feature row (route order) and which values are defaults."""
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, future))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all())
        return await future

    async def _read_all(self) -> None:
        try:
            await asyncio.sleep(0)  # let the events of this loop turn join the first read
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_rows], self._waiting[self._max_rows :]
                await self._read(batch)
        finally:
            self._reader = None

    async def _read(self, batch: list[tuple[Event, asyncio.Future[Row]]]) -> None:
        events = [event for event, _ in batch]
        chunk = ParsedChunk(
            index=0,
            rows=np.arange(len(events), dtype=np.int64),
            ids=[e.entity for e in events],
            timestamps=None,
            request_features={
                name: np.array([e.request_features.get(name, math.nan) for e in events]) for name in self._request
            },
        )
        try:
            values, defaulted = await self._features.matrix(chunk)
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for i, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result((values[i : i + 1], defaulted[i : i + 1]))
