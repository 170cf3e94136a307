"""``Committer`` with a recording sink and source: outputs finishing together share one write and
one acknowledgement, the acknowledgement follows the write, and a failed write acknowledges nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from inferline.stream.commit import Committer
from inferline.stream.errors import StreamUnavailable
from inferline.stream.ports import Output


class Recorder:
    """Sink and source in one: the calls in order; ``gate`` holds a write until set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.written: set[str] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def write(self, outputs: Sequence[Output]) -> list[bool]:
        self.calls.append(("write", [o.source_id for o in outputs]))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        added = [o.source_id not in self.written for o in outputs]
        self.written.update(o.source_id for o in outputs)
        return added

    async def ack(self, ids: Sequence[str]) -> None:
        self.calls.append(("ack", list(ids)))


def committer(rec: Recorder, max_batch: int = 1000) -> Committer:
    return Committer(rec, rec, max_batch)  # type: ignore[arg-type]


def out(i: int) -> Output:
    return Output(str(i), {"score": "0.5"})


async def test_a_lone_output_is_written_then_acknowledged_at_once() -> None:
    rec = Recorder()
    assert await committer(rec).commit(out(1)) is True
    assert rec.calls == [("write", ["1"]), ("ack", ["1"])]


async def test_outputs_arriving_during_a_write_go_together_in_the_next() -> None:
    rec = Recorder()
    c = committer(rec)
    rec.gate.clear()
    first = asyncio.create_task(c.commit(out(0)))
    await asyncio.sleep(0.01)  # the first flush is in flight, held by the gate
    rest = [asyncio.create_task(c.commit(out(i))) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    assert rec.calls == [("write", ["0"])]  # nothing acknowledged before its write returned
    rec.gate.set()
    assert await asyncio.gather(first, *rest) == [True] * 6
    batch = ["1", "2", "3", "4", "5"]
    assert rec.calls == [("write", ["0"]), ("ack", ["0"]), ("write", batch), ("ack", batch)]
    assert (c.flushes, c.committed) == (2, 6)


async def test_batches_are_capped_and_keep_arrival_order() -> None:
    rec = Recorder()
    assert await asyncio.gather(*_commits(committer(rec, 2), 5)) == [True] * 5
    writes = [ids for kind, ids in rec.calls if kind == "write"]
    assert writes == [["0", "1"], ["2", "3"], ["4"]]


def _commits(c: Committer, n: int) -> list[asyncio.Task[bool]]:
    return [asyncio.ensure_future(c.commit(out(i))) for i in range(n)]


async def test_an_output_already_there_reports_false() -> None:
    rec = Recorder()
    c = committer(rec)
    await c.commit(out(1))
    assert await c.commit(out(1)) is False


async def test_a_failed_write_fails_every_waiter_and_acknowledges_nothing() -> None:
    rec = Recorder()
    rec.fail = StreamUnavailable("redis away")
    c = committer(rec)
    results = await asyncio.gather(*_commits(c, 3), return_exceptions=True)
    assert all(isinstance(r, StreamUnavailable) for r in results)
    assert [kind for kind, _ in rec.calls] == ["write"]
    rec.fail = None
    assert await c.commit(out(0)) is True  # the next flush starts afresh
    assert rec.calls == [("write", ["0", "1", "2"]), ("write", ["0"]), ("ack", ["0"])]
