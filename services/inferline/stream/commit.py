"""``Committer``: group commit of finished events: one sink write, then one acknowledgement.

Writing and acknowledging event by event costs two engine round trips per event, and
those round trips, not the model, bounded a worker (~800 events/s on a 2-core VM). Here
an event that is scored hands its output to the committer and waits: the first waiter
starts a flush, and every output that arrives while a flush is in flight joins the next
one, so under load the batches grow by themselves (up to ``max_batch``) and an idle worker
still writes a lone output at once, without a timer.

A flush writes its outputs with one ``Sink.write`` and, only once that returned (every
output durably written), acknowledges their events with one ``Source.ack``. Each waiter
gets its own output's result or the flush's error, so the worker's per-event handling
(retry, dead-letter) stays as it was. Order per key holds because a waiter returns only
after its output is written, and the worker starts an event of a key only after the
previous one of that key returned; exactly-once holds because the sink deduplicates by
source event id, whatever a crash between the write and the acknowledgement redelivers.
"""

from __future__ import annotations

import asyncio

from inferline.stream.ports import Output, Sink, Source

MAX_BATCH = 1000
"""Outputs per flush at most (the worker's in-flight bound is usually smaller)."""

_Waiter = tuple[Output, "asyncio.Future[bool]"]


class Committer:
    def __init__(self, sink: Sink, source: Source, max_batch: int = MAX_BATCH) -> None:
        self._sink = sink
        self._source = source
        self._max_batch = max_batch
        self._waiting: list[_Waiter] = []
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        """Flushes so far (sink writes): with ``committed``, the mean batch size."""
        self.committed = 0
        """Outputs written and acknowledged so far."""

    async def commit(self, output: Output) -> bool:
        """Write ``output`` and acknowledge its event; True when appended, False when it was already there.

        Raises:
            Exception: the flush's error (the event stays unacknowledged, to be redelivered).
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((output, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_all(), name="stream-commit")
        return await future

    async def _flush_all(self) -> None:
        try:
            await asyncio.sleep(0)  # let the events finishing in this loop turn join the first flush
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
                await self._flush(batch)
        finally:
            self._flusher = None

    async def _flush(self, batch: list[_Waiter]) -> None:
        outputs = [output for output, _ in batch]
        try:
            appended = await self._sink.write(outputs)
            await self._source.ack([o.source_id for o in outputs])
        except Exception as err:  # each waiter decides what it means for its event
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        self.flushes += 1
        self.committed += len(batch)
        for (_, future), added in zip(batch, appended, strict=True):
            if not future.done():
                future.set_result(added)
