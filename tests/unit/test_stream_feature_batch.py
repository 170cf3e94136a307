"""``FeatureBatcher``: concurrent events' features come from one store read, each its own row."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from inferline.batch.rows import ParsedChunk
from inferline.stream.events import Event
from inferline.stream.feature_batch import FeatureBatcher


class FakeFeatures:
    """Row i = [entity, request feature or NaN]; counts reads; fails for entity 666."""

    def __init__(self) -> None:
        self.names = ["entity", "trip"]
        self.reads: list[int] = []

    async def matrix(self, chunk: ParsedChunk) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        self.reads.append(len(chunk.ids))
        await asyncio.sleep(0)
        if 666 in chunk.ids:
            raise ConnectionError("store down")
        values = np.stack([np.array(chunk.ids, np.float32), chunk.request_features["trip"].astype(np.float32)], 1)
        return values, np.isnan(values)


async def test_concurrent_events_share_one_read_and_get_their_own_rows() -> None:
    store = FakeFeatures()
    batcher = FeatureBatcher(store, ["trip"])  # type: ignore[arg-type]
    events = [Event(f"{i}-0", 1000 + i, {"trip": float(i)} if i % 2 else {}, i) for i in range(5)]
    rows = await asyncio.gather(*(batcher.get(e) for e in events))
    assert store.reads == [5]
    for i, (values, defaulted) in enumerate(rows):
        assert values[0, 0] == 1000 + i
        assert bool(defaulted[0, 1]) == (i % 2 == 0)


async def test_a_failed_read_fails_every_event_of_it_and_the_next_read_works() -> None:
    store = FakeFeatures()
    batcher = FeatureBatcher(store, ["trip"])  # type: ignore[arg-type]
    results = await asyncio.gather(
        batcher.get(Event("1-0", 666, {}, 1)), batcher.get(Event("2-0", 7, {}, 2)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    values, _ = await batcher.get(Event("3-0", 8, {}, 3))
    assert values[0, 0] == 8 and store.reads == [2, 1]


@pytest.mark.parametrize("max_rows", [1, 2])
async def test_reads_hold_at_most_max_rows(max_rows: int) -> None:
    store = FakeFeatures()
    batcher = FeatureBatcher(store, ["trip"], max_rows=max_rows)  # type: ignore[arg-type]
    await asyncio.gather(*(batcher.get(Event(f"{i}-0", i, {}, i)) for i in range(3)))
    assert max(store.reads) <= max_rows and sum(store.reads) == 3
