"""``StreamWorker`` with a fake source, sink and scorer: acknowledgement after the write, retries
through claims, and the dead-letter stream after ``max_attempts``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from inferline.core.config import RouteConfig
from inferline.core.served_by import ServedBy
from inferline.stream import StreamSpec
from inferline.stream.errors import StreamUnavailable
from inferline.stream.events import Event, Outcome
from inferline.stream.ports import Delivery, Output
from inferline.stream.worker import StreamWorker
from tests.waiting import eventually

ROUTE = RouteConfig.model_validate(
    {
        "entity": {"join_key": "driver_id"},
        "features": [{"name": "x", "default": 0.0}],
        "primary": {"model": "m", "features": ["x"]},
    }
)


class FakeSource:
    """New events once; every unacknowledged one is claimable at once (idle time zero)."""

    def __init__(self, deliveries: list[Delivery]) -> None:
        self.new = list(deliveries)
        self.pending: dict[str, Delivery] = {}
        self.attempts: dict[str, int] = {}
        self.acked: list[str] = []

    async def start(self) -> None:
        pass

    async def read(self, count: int) -> list[Delivery]:
        taken, self.new = self.new[:count], self.new[count:]
        self.pending.update({d.id: d for d in taken})
        await asyncio.sleep(0)
        return taken

    async def claim(self, count: int) -> tuple[list[Delivery], bool]:
        return list(self.pending.values())[:count], True

    async def ack(self, ids: Sequence[str]) -> None:
        for i in ids:
            self.pending.pop(i, None)
            self.acked.append(i)

    async def failed(self, event_id: str) -> int:
        self.attempts[event_id] = self.attempts.get(event_id, 0) + 1
        return self.attempts[event_id]

    async def lag(self) -> int:
        return len(self.new)

    async def close(self) -> None:
        pass


class FakeSink:
    def __init__(self) -> None:
        self.written: dict[str, Mapping[str, str]] = {}
        self.dead: dict[str, str] = {}
        self.fail_writes = 0

    async def write(self, outputs: Sequence[Output]) -> list[bool]:
        if self.fail_writes:
            self.fail_writes -= 1
            raise StreamUnavailable("sink down")
        added = [o.source_id not in self.written for o in outputs]
        for o in outputs:
            self.written.setdefault(o.source_id, dict(o.fields))
        return added

    async def dead_letter(self, source_id: str, fields: Mapping[str, str], reason: str) -> bool:
        self.dead[source_id] = reason
        return True

    async def close(self) -> None:
        pass


class FakeScorer:
    """Scores 0.5, except entity 13, which always raises."""

    async def score(self, event: Event, *, light: bool) -> Outcome:
        if event.entity == 13:
            raise RuntimeError("model exploded on 13")
        return Outcome(0.5, ServedBy.LIGHT if light else ServedBy.PRIMARY, None, "m", "1")


def worker(source: FakeSource, sink: FakeSink) -> StreamWorker:
    spec = StreamSpec.build(
        route="r", source="redis://h:1/in", group="g", sink="redis://h:1/out", claim_idle_ms=1, max_attempts=3,
        block_ms=1, lag_interval_s=60,
    )  # fmt: skip
    return StreamWorker(spec, ROUTE, source, sink, FakeScorer())  # type: ignore[arg-type]


async def run_until(w: StreamWorker, condition: object) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await eventually(condition, "worker condition")  # type: ignore[arg-type]
    finally:
        stop.set()
        await task


async def test_failing_event_is_retried_then_parked_and_acknowledged() -> None:
    source = FakeSource([Delivery("1-0", {"driver_id": "13"}), Delivery("2-0", {"driver_id": "7"})])
    sink = FakeSink()
    w = worker(source, sink)
    await run_until(w, lambda: "1-0" in sink.dead and "2-0" in sink.written)
    assert source.attempts["1-0"] == 3
    assert "3 attempts failed" in sink.dead["1-0"] and "model exploded on 13" in sink.dead["1-0"]
    assert sorted(source.acked) == ["1-0", "2-0"] and not source.pending
    assert "1-0" not in sink.written


async def test_unparseable_event_is_parked_at_once() -> None:
    source = FakeSource([Delivery("1-0", {"driver_id": "x1"})])
    sink = FakeSink()
    await run_until(worker(source, sink), lambda: "1-0" in sink.dead)
    assert "attempts" not in source.attempts and "invalid event" in sink.dead["1-0"]


async def test_no_acknowledgement_before_the_write_and_an_outage_is_not_an_attempt() -> None:
    source = FakeSource([Delivery("1-0", {"driver_id": "7"})])
    sink = FakeSink()
    sink.fail_writes = 2  # the sink is down twice: the event stays pending, is claimed and written
    await run_until(worker(source, sink), lambda: "1-0" in source.acked)
    assert source.attempts == {}  # the engine's outage is not the event's attempt
    assert list(sink.written) == ["1-0"] and source.acked == ["1-0"]


async def test_worker_keeps_reading_after_the_engine_was_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inferline.stream.worker.UNAVAILABLE_BACKOFF_S", 0.001)
    source = FakeSource([Delivery("1-0", {"driver_id": "7"})])
    outages = [StreamUnavailable("redis restarting")] * 2
    real_read = source.read

    async def flaky_read(count: int) -> list[Delivery]:
        if outages:
            raise outages.pop()
        return await real_read(count)

    source.read = flaky_read  # type: ignore[method-assign]
    sink = FakeSink()
    await run_until(worker(source, sink), lambda: "1-0" in source.acked)
    assert not outages and list(sink.written) == ["1-0"]
