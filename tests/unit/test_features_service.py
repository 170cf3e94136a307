"""FeaturesService: hot cache, coalesced single-flight reads, defaults, degradation, errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from inferline.core.config import FeatureStoreConfig, RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.errors import InvalidInput, RouteNotFound
from inferline.features import FeaturesService, FeatureVector
from inferline.features.vector import EntityId

CONV, ACC = "stats:conv_rate", "stats:acc_rate"
ROUTE = RouteConfig.model_validate(
    {
        "entity": {"join_key": "driver_id", "type": "int64"},
        "max_entities": 5,
        "features": [
            {"name": "conv_rate", "source": CONV, "default": 0.5},
            {"name": "acc_rate", "source": ACC, "default": 0.7},
            {"name": "trip_distance_km", "default": 6.0},
        ],
        "primary": {"model": "m", "features": ["conv_rate", "acc_rate", "trip_distance_km"]},
    }
)
ROWS: dict[EntityId, dict[str, float | None]] = {
    1: {CONV: 0.1, ACC: 0.2},
    2: {CONV: 0.3, ACC: None},  # acc_rate missing for this driver
    3: {CONV: 0.4, ACC: 0.9},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeStore:
    """Answers from ROWS; counts reads and their concurrency; can be held, or made to fail."""

    def __init__(self) -> None:
        self.reads: list[list[EntityId]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.in_flight = self.max_in_flight = 0

    async def read(self, refs: list[str], join_key: str, ids: list[EntityId]) -> dict[str, list[float | None]]:
        self.reads.append(list(ids))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            return {ref: [ROWS.get(i, {}).get(ref) for i in ids] for ref in refs}
        finally:
            self.in_flight -= 1


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def service(store: FakeStore, fake_clock: FakeClock) -> AsyncIterator[FeaturesService]:
    svc = FeaturesService({"r": ROUTE}, store, FeatureStoreConfig(hot_cache_ttl_s=30), clock=fake_clock)
    yield svc
    await svc.close()


HANG_S = 30.0
"""How long a call that should return at its deadline may take before it counts as hung."""


def later(seconds: float = 5.0) -> Deadline:
    return Deadline.after(seconds)


async def test_cache_hit_avoids_store(service: FeaturesService, store: FakeStore) -> None:
    first = await service.get("r", [1, 3], {}, deadline=later())
    second = await service.get("r", [3, 1], {}, deadline=later())
    assert len(store.reads) == 1
    np.testing.assert_array_equal(second.values[:, :2], first.values[::-1, :2])


async def test_cache_entries_expire_after_ttl(
    service: FeaturesService, store: FakeStore, fake_clock: FakeClock
) -> None:
    await service.get("r", [1], {}, deadline=later())
    fake_clock.advance(31)
    await service.get("r", [1], {}, deadline=later())
    assert store.reads == [[1], [1]]


async def test_ttl_zero_disables_cache(store: FakeStore) -> None:
    service = FeaturesService({"r": ROUTE}, store, FeatureStoreConfig(hot_cache_ttl_s=0))
    await service.get("r", [1], {}, deadline=later())
    await service.get("r", [1], {}, deadline=later())
    assert len(store.reads) == 2


async def test_concurrent_misses_share_one_or_two_reads(service: FeaturesService, store: FakeStore) -> None:
    store.gate = asyncio.Event()
    first = asyncio.create_task(service.get("r", [1], {}, deadline=later()))
    await asyncio.sleep(0)  # the first read is now in flight, held by the gate
    others = [asyncio.create_task(service.get("r", [1 + i % 3, 4], {}, deadline=later())) for i in range(20)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(first, *others)
    assert [sorted(ids) for ids in store.reads] == [[1], [2, 3, 4]]  # later misses all went into the 2nd read
    assert store.max_in_flight == 1
    assert not any(r.degraded for r in results)


async def test_missing_entity_gets_defaults_flagged_not_degraded(service: FeaturesService) -> None:
    vector = await service.get("r", [99], {"trip_distance_km": 2.5}, deadline=later())
    np.testing.assert_allclose(vector.values, [[0.5, 0.7, 2.5]])
    assert vector.defaulted.tolist() == [[True, True, False]]
    assert vector.defaulted_names(0) == ["conv_rate", "acc_rate"]
    assert not vector.degraded


async def test_missing_feature_value_gets_its_default(service: FeaturesService) -> None:
    vector = await service.get("r", [2], {"trip_distance_km": 1.0}, deadline=later())
    np.testing.assert_allclose(vector.values, [[0.3, 0.7, 1.0]])
    assert vector.defaulted_names(0) == ["acc_rate"]


async def test_request_time_feature_defaults_when_not_given(service: FeaturesService) -> None:
    vector = await service.get("r", [1, 3], {}, deadline=later())
    np.testing.assert_allclose(vector.values[:, 2], [6.0, 6.0])
    assert vector.defaulted[:, 2].tolist() == [True, True]
    assert vector.defaulted[:, :2].sum() == 0


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"unknown": 1.0}, "not a feature of this route"),
        ({"conv_rate": 1.0}, "fetched from the feature store"),
        ({"trip_distance_km": math.nan}, "finite"),
        ({"trip_distance_km": 1e39}, "finite"),
    ],
)
async def test_bad_request_feature_is_invalid(service: FeaturesService, given: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as err:
        await service.get("r", [1], given, deadline=later())
    assert err.value.field == "request_features"


async def test_store_failure_degrades_to_defaults(
    service: FeaturesService, store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.error = ConnectionError("store down")
    vector = await service.get("r", [1, 2], {}, deadline=later())
    assert vector.degraded
    np.testing.assert_allclose(vector.values[:, :2], [[0.5, 0.7], [0.5, 0.7]])
    assert vector.defaulted[:, :2].all()
    store.error = None
    recovered = await service.get("r", [1], {}, deadline=later())  # failures are not cached
    assert not recovered.degraded and len(store.reads) == 2
    assert "failing" in caplog.text


async def test_slow_store_degrades_on_time_and_fills_cache_later(
    service: FeaturesService, store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.gate = asyncio.Event()
    started = time.monotonic()
    # A service that waited for the read would wait forever (the gate stays shut): fail instead.
    vector = await asyncio.wait_for(service.get("r", [1], {}, deadline=later(0.05)), HANG_S)
    elapsed_s = time.monotonic() - started
    assert vector.degraded and vector.defaulted[0, :2].all()
    assert elapsed_s > 0.04  # it waited for its deadline (a busy machine only makes that longer)
    # ... and not for the read, which never ends until the gate opens: it was left running, not cancelled.
    assert store.in_flight == 1
    store.gate.set()
    await service.get("r", [1], {}, deadline=later())  # joins the same read
    cached = await service.get("r", [1], {}, deadline=Deadline.after(0))  # no time left: cache only
    assert not cached.degraded
    np.testing.assert_allclose(cached.values[0, :2], [0.1, 0.2])
    assert store.reads == [[1]]


async def test_failed_background_read_is_never_unobserved(
    service: FeaturesService, store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.gate, store.error = asyncio.Event(), RuntimeError("late failure")
    assert (await service.get("r", [1], {}, deadline=later(0.01))).degraded  # left before the read failed
    store.gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    assert store.in_flight == 0
    assert "never retrieved" not in caplog.text
    assert [r.levelno for r in caplog.records if "failing" in r.getMessage()] == [logging.WARNING]


async def test_warm_up_reads_each_view_set_once_and_never_raises(store: FakeStore) -> None:
    service = FeaturesService({"a": ROUTE, "b": ROUTE}, store, FeatureStoreConfig())
    store.error = ConnectionError("store down")
    await service.warm_up()
    assert store.reads == [[0]]


async def test_unknown_route_is_not_found(service: FeaturesService) -> None:
    with pytest.raises(RouteNotFound):
        await service.get("nope", [1], {}, deadline=later())


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        ([], "entities"),
        ([1, 2, 3, 4, 5, 6], "entities"),
        ([1, "2"], "entities[1]"),
        ([True], "entities[0]"),
        ([2**63], "entities[0]"),
    ],
)
async def test_bad_entity_ids_are_invalid(service: FeaturesService, ids: list[EntityId], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await service.get("r", ids, {}, deadline=later())
    assert err.value.field == field


async def test_names_select_and_order_columns(service: FeaturesService) -> None:
    vector = await service.get("r", [1], {}, deadline=later(), names=["acc_rate", "conv_rate"])
    assert vector.names == ("acc_rate", "conv_rate")
    np.testing.assert_allclose(vector.values, [[0.2, 0.1]])
    with pytest.raises(InvalidInput, match="'nope' is not a feature"):
        await service.get("r", [1], {}, deadline=later(), names=["nope"])


async def test_result_is_read_only_and_selectable(service: FeaturesService) -> None:
    vector = await service.get("r", [2], {}, deadline=later())
    with pytest.raises(ValueError, match="read-only"):
        vector.values[0, 0] = 1.0
    light = vector.select(["acc_rate", "conv_rate"])
    assert light.names == ("acc_rate", "conv_rate") and light.defaulted_names(0) == ["acc_rate"]
    with pytest.raises(ValueError, match="not among"):
        vector.select(["nope"])


def test_feature_vector_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="rows, 2"):
        FeatureVector(("a", "b"), np.zeros((1, 3), np.float32), np.zeros((1, 3), bool), degraded=False)
