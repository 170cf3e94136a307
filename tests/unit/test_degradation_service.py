"""DegradationService: cache → light → baseline order, staleness, budgets, failures, write-behind."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from inferline.core.config import InferlineConfig, RouteConfig, load_config
from inferline.core.deadline import Deadline
from inferline.core.entities import EntityId
from inferline.core.errors import DependencyUnavailable, InvalidInput, RouteNotFound
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation import (
    CachedScore,
    DegradationService,
    InMemoryScoreCache,
    build_degradation_service,
    factory,
)
from inferline.degradation import service as service_module
from inferline.features.vector import FeatureVector
from inferline.triton.executor import InferResult
from tests.waiting import eventually

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUTE_NAME = "drivers"
ROUTE = RouteConfig.model_validate(
    {
        "entity": {"join_key": "driver_id", "type": "int64"},
        "max_entities": 10,
        "features": [
            {"name": "conv_rate", "source": "stats:conv_rate", "default": 0.5},
            {"name": "acc_rate", "source": "stats:acc_rate", "default": 0.7},
            {"name": "trips", "source": "stats:trips", "default": 480},
        ],
        "primary": {"model": "big", "features": ["conv_rate", "acc_rate", "trips"]},
        "light": {"model": "small", "features": ["acc_rate", "conv_rate"]},
        "degradation": {
            "max_staleness_s": 60,
            "baseline": {
                "score": 0.6,
                "segment_feature": "conv_rate",
                "segments": [{"below": 0.3, "score": 0.25}, {"below": 0.6, "score": 0.45}],
            },
        },
    }
)
NAMES = ("conv_rate", "acc_rate", "trips")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DictCache:
    """Dict-backed ScoreCache; reads/writes can be made to fail, stall, or wait on a gate."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.data: dict[tuple[str, str, EntityId], tuple[float, float]] = {}
        self.error: Exception | None = None
        self.read_delay_s = 0.0
        self.gate: asyncio.Event | None = None
        self.reads = self.writes = 0
        self.closed = False

    def seed(self, tenant: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        for entity, score in zip(ids, scores, strict=True):
            self.data[(tenant, ROUTE_NAME, entity)] = (score, self.clock())

    async def get_many(self, tenant: str, route: str, ids: Sequence[EntityId]) -> list[CachedScore | None]:
        self.reads += 1
        if self.read_delay_s:
            await asyncio.sleep(self.read_delay_s)
        if self.error is not None:
            raise self.error
        out: list[CachedScore | None] = []
        for entity in ids:
            entry = self.data.get((tenant, route, entity))
            out.append(None if entry is None else CachedScore(entry[0], self.clock() - entry[1]))
        return out

    async def put_many(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.writes += 1
        for entity, score in zip(ids, scores, strict=True):
            self.data[(tenant, route, entity)] = (score, self.clock())

    async def close(self) -> None:
        self.closed = True


class FakeLight:
    """LightModel answering ``0.1 + 0.1 * row`` with a settable predicted latency and failure."""

    model_name = "small"

    def __init__(self) -> None:
        self.latency_s = 0.001
        self.error: Exception | None = None
        self.output: npt.NDArray[np.float32] | None = None
        self.calls: list[npt.NDArray[np.float32]] = []

    def predicted_latency_s(self) -> float:
        return self.latency_s

    async def score(self, features: npt.NDArray[np.float32], *, deadline: Deadline) -> npt.NDArray[np.float32]:
        self.calls.append(features)
        if self.error is not None:
            raise self.error
        if self.output is not None:
            return self.output
        return (0.1 + 0.1 * np.arange(len(features))).astype(np.float32)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> DictCache:
    return DictCache(clock)


@pytest.fixture
def light() -> FakeLight:
    return FakeLight()


@pytest.fixture
async def service(cache: DictCache, light: FakeLight, clock: FakeClock) -> AsyncIterator[DegradationService]:
    svc = DegradationService({ROUTE_NAME: ROUTE}, cache, {ROUTE_NAME: light}, clock, max_pending_writes=3)
    yield svc
    await svc.close()


def features(conv: Sequence[float]) -> FeatureVector:
    values = np.array([[c, 0.9, 100.0] for c in conv], dtype=np.float32)
    return FeatureVector(NAMES, values, np.zeros(values.shape, np.bool_), degraded=False)


def deadline(clock: FakeClock, seconds: float = 0.05) -> Deadline:
    return Deadline.after(seconds, clock)


async def degrade(
    service: DegradationService,
    clock: FakeClock,
    ids: Sequence[EntityId],
    vector: FeatureVector | None,
    reason: Reason = Reason.DEADLINE,
    seconds: float = 0.05,
    tenant: str = "t1",
) -> Any:
    return await service.degrade(tenant, ROUTE_NAME, ids, vector, reason, deadline=deadline(clock, seconds))


async def test_all_fresh_cached_scores_are_served_from_cache(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight
) -> None:
    cache.seed("t1", [1], [0.8])
    clock.advance(5)
    cache.seed("t1", [2], [0.3])
    clock.advance(1)
    answer = await degrade(service, clock, [1, 2], features([0.1, 0.2]))
    assert answer.served_by is ServedBy.CACHE
    np.testing.assert_array_equal(answer.scores, np.array([0.8, 0.3], np.float32))
    assert answer.cache_age_ms == pytest.approx(6000)  # the oldest one used
    assert answer.model_name == ""
    assert light.calls == []


async def test_cache_miss_goes_to_light_model_with_its_columns(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight
) -> None:
    cache.seed("t1", [1], [0.8])
    answer = await degrade(service, clock, [1, 2], features([0.1, 0.2]))
    assert answer.served_by is ServedBy.LIGHT
    assert answer.model_name == "small"
    np.testing.assert_allclose(answer.scores, [0.1, 0.2])
    np.testing.assert_array_equal(light.calls[0], np.array([[0.9, 0.1], [0.9, 0.2]], np.float32))  # acc, conv


@pytest.mark.parametrize("reason", [Reason.FEATURES_DEGRADED, Reason.OVERLOAD])
async def test_features_degraded_and_overload_prefer_light_model_over_cache(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight, reason: Reason
) -> None:
    cache.seed("t1", [1, 2], [0.8, 0.3])
    answer = await degrade(service, clock, [1, 2], features([0.1, 0.2]), reason)
    assert answer.served_by is ServedBy.LIGHT
    assert cache.reads == 0


@pytest.mark.parametrize("reason", [Reason.DEADLINE, Reason.MODEL_UNAVAILABLE, Reason.CIRCUIT_OPEN])
async def test_other_reasons_prefer_the_cache(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight, reason: Reason
) -> None:
    cache.seed("t1", [1, 2], [0.8, 0.3])
    answer = await degrade(service, clock, [1, 2], features([0.1, 0.2]), reason)
    assert answer.served_by is ServedBy.CACHE
    assert light.calls == []


async def test_features_degraded_falls_back_to_cache_when_light_fails(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight
) -> None:
    cache.seed("t1", [1, 2], [0.8, 0.3])
    light.error = DependencyUnavailable("down")
    answer = await degrade(service, clock, [1, 2], features([0.1, 0.2]), Reason.FEATURES_DEGRADED)
    assert answer.served_by is ServedBy.CACHE
    assert service.counters.light_errors == 1


async def test_stale_cache_entries_are_not_served(
    service: DegradationService, cache: DictCache, clock: FakeClock
) -> None:
    cache.seed("t1", [1, 2], [0.8, 0.3])
    clock.advance(60.5)  # max_staleness_s is 60
    cache.seed("t1", [2], [0.35])
    answer = await degrade(service, clock, [1, 2], None)
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.6, 0.35])  # constant baseline, fresh entry
    assert answer.cache_age_ms == 0


@pytest.mark.parametrize(("latency_s", "budget_s", "tried"), [(0.010, 0.0154, False), (0.010, 0.0156, True)])
async def test_light_model_runs_only_when_predicted_latency_fits(
    service: DegradationService, clock: FakeClock, light: FakeLight, latency_s: float, budget_s: float, tried: bool
) -> None:
    light.latency_s = latency_s  # needs 10 ms × 1.5 + 0.5 ms = 15.5 ms
    answer = await degrade(service, clock, [1], features([0.1]), seconds=budget_s)
    assert (answer.served_by is ServedBy.LIGHT) is tried
    assert len(light.calls) == int(tried)
    assert service.counters.light_skipped == int(not tried)


@pytest.mark.parametrize(
    "output", [np.array([np.nan], np.float32), np.array([1.5], np.float32), np.array([0.2, 0.3], np.float32)]
)
async def test_invalid_light_output_falls_back_to_baseline(
    service: DegradationService, clock: FakeClock, light: FakeLight, output: npt.NDArray[np.float32]
) -> None:
    light.output = output
    answer = await degrade(service, clock, [1], features([0.1]))
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.25])
    assert service.counters.light_errors == 1


async def test_light_failure_falls_back_and_is_counted(
    service: DegradationService, cache: DictCache, clock: FakeClock, light: FakeLight
) -> None:
    cache.seed("t1", [2], [0.9])
    light.error = RuntimeError("boom")
    answer = await degrade(service, clock, [1, 2, 3], features([0.1, 0.45, 0.7]))
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.25, 0.9, 0.6])  # segment, cache, above the last bound
    assert service.counters.light_errors == 1


async def test_baseline_by_segment_when_features_lack_light_columns(
    service: DegradationService, clock: FakeClock, light: FakeLight
) -> None:
    only_segment = FeatureVector(
        ("conv_rate",), np.array([[0.0], [0.3], [0.6]], np.float32), np.zeros((3, 1), bool), False
    )
    answer = await degrade(service, clock, [1, 2, 3], only_segment)
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.25, 0.45, 0.6])
    assert light.calls == []


async def test_failing_cache_is_all_miss_and_never_raises(
    service: DegradationService, cache: DictCache, clock: FakeClock
) -> None:
    cache.seed("t1", [1], [0.8])
    cache.error = ConnectionError("redis down")
    answer = await degrade(service, clock, [1], None)
    assert answer.served_by is ServedBy.BASELINE
    assert service.counters.cache_read_errors == 1


async def test_slow_cache_lookup_is_bounded_by_cache_timeout(cache: DictCache, clock: FakeClock) -> None:
    service = DegradationService({ROUTE_NAME: ROUTE}, cache, {}, clock, cache_timeout_s=0.01)
    cache.seed("t1", [1], [0.8])
    cache.read_delay_s = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await degrade(service, clock, [1], None)
    assert loop.time() - started < cache.read_delay_s  # it did not wait for the 5 s read, whatever the machine
    assert answer.served_by is ServedBy.BASELINE
    assert service.counters.cache_read_errors == 1


async def test_tenants_do_not_share_cached_answers(
    service: DegradationService, cache: DictCache, clock: FakeClock
) -> None:
    cache.seed("t1", [1], [0.8])
    answer = await degrade(service, clock, [1], None, tenant="t2")
    assert answer.served_by is ServedBy.BASELINE


async def test_request_errors_raise(service: DegradationService, clock: FakeClock) -> None:
    with pytest.raises(RouteNotFound):
        await service.degrade("t1", "nope", [1], None, Reason.DEADLINE, deadline=deadline(clock))
    with pytest.raises(InvalidInput):
        await degrade(service, clock, [1, 2], features([0.1]))  # 1 feature row for 2 ids
    with pytest.raises(InvalidInput):
        await degrade(service, clock, [], None)
    with pytest.raises(RouteNotFound):
        service.record("t1", "nope", [1], [0.5])
    with pytest.raises(InvalidInput):
        service.record("t1", ROUTE_NAME, [1, 2], [0.5])
    with pytest.raises(InvalidInput):
        service.record("t1", ROUTE_NAME, [1], [float("nan")])


async def test_record_writes_in_background_then_serves_from_cache(
    service: DegradationService, cache: DictCache, clock: FakeClock
) -> None:
    service.record("t1", ROUTE_NAME, [1, 2], np.array([0.7, 0.2], np.float32))
    assert cache.writes == 0  # nothing written on the caller's path
    assert service.pending_writes == 1
    await asyncio.sleep(0)
    assert cache.writes == 1
    answer = await degrade(service, clock, [1, 2], None)
    assert answer.served_by is ServedBy.CACHE
    np.testing.assert_allclose(answer.scores, [0.7, 0.2])


async def test_record_with_failing_cache_never_raises(
    service: DegradationService, cache: DictCache, clock: FakeClock
) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    cache.error = ConnectionError("redis down")
    service.record("t1", ROUTE_NAME, [1], [0.5])
    await eventually(lambda: service.pending_writes == 0, "the background write")  # ran, and failed
    assert service.counters.cache_write_errors == 1
    assert unhandled == []


async def test_pending_writes_are_bounded(service: DegradationService, cache: DictCache) -> None:
    cache.gate = asyncio.Event()
    for i in range(5):  # max_pending_writes is 3
        service.record("t1", ROUTE_NAME, [i], [0.5])
    assert service.pending_writes == 3
    assert service.counters.writes_dropped == 2
    cache.gate.set()
    await service.close()
    assert sorted(entity for (_, _, entity) in cache.data) == [0, 1, 2]  # the queued ones, merged
    assert cache.writes == 1  # one put_many for the whole (tenant, route) batch
    assert cache.closed


async def test_close_cancels_writes_stuck_past_the_grace(
    service: DegradationService, cache: DictCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "CLOSE_GRACE_S", 0.01)
    cache.gate = asyncio.Event()  # never set
    service.record("t1", ROUTE_NAME, [1], [0.5])
    await service.close()
    assert service.pending_writes == 0
    service.record("t1", ROUTE_NAME, [1], [0.5])  # after close: dropped, not scheduled
    assert service.pending_writes == 0
    assert service.counters.writes_dropped == 1


async def test_in_memory_cache_keeps_ttl_staleness_and_bound(clock: FakeClock) -> None:
    cache = InMemoryScoreCache(2, {ROUTE_NAME: 10.0}, clock)
    await cache.put_many("t1", ROUTE_NAME, [1, 2], [0.1, 0.2])
    clock.advance(4)
    assert await cache.get_many("t1", ROUTE_NAME, [1, 2, 3]) == [CachedScore(0.1, 4.0), CachedScore(0.2, 4.0), None]
    assert await cache.get_many("t2", ROUTE_NAME, [1]) == [None]  # another tenant
    await cache.put_many("t1", ROUTE_NAME, [1], [0.15])  # rewrite: now the most recently written
    await cache.put_many("t1", ROUTE_NAME, [3], [0.3])  # over the bound: 2, least recently written, goes
    assert len(cache) == 2
    assert await cache.get_many("t1", ROUTE_NAME, [1, 2]) == [CachedScore(0.15, 0.0), None]
    clock.advance(10)
    assert await cache.get_many("t1", ROUTE_NAME, [1, 3]) == [None, None]  # expired


@pytest.fixture(scope="module")
def config() -> InferlineConfig:
    return load_config(ROOT / "deploy/local/inferline.yaml")


async def test_factory_builds_memory_cache_and_in_process_light_model(config: InferlineConfig) -> None:
    service = build_degradation_service(config, None)
    vector = FeatureVector(("conv_rate", "acc_rate"), np.array([[0.2, 0.9]], np.float32), np.zeros((1, 2), bool), False)
    answer = await service.degrade("demo", "driver_ranking", [7], vector, Reason.DEADLINE, deadline=Deadline.after(1))
    assert answer.served_by is ServedBy.LIGHT
    assert answer.model_name == "driver_ranker_light"
    await service.close()


async def test_factory_picks_redis_and_triton_light_model(
    config: InferlineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = config.routes["driver_ranking"]
    on_triton = route.model_copy(
        update={"degradation": route.degradation.model_copy(update={"light_in_process": False})}
    )
    suite = config.model_copy(
        update={
            "score_cache": config.score_cache.model_copy(update={"backend": "redis", "timeout_ms": 7}),
            "routes": {"driver_ranking": on_triton},
        }
    )
    with pytest.raises(ValueError, match="no executor"):
        build_degradation_service(suite, None)
    redis_args: list[tuple[Any, ...]] = []

    def fake_redis(*args: Any) -> InMemoryScoreCache:
        redis_args.append(args)
        return InMemoryScoreCache(10, {})

    monkeypatch.setattr(factory, "RedisScoreCache", fake_redis)
    executor = FakeExecutor()
    service = build_degradation_service(suite, executor)
    assert redis_args == [(suite.score_cache.redis_url, "inferline", {"driver_ranking": 3600.0}, 0.007)]
    vector = FeatureVector(("conv_rate", "acc_rate"), np.array([[0.2, 0.9]], np.float32), np.zeros((1, 2), bool), False)
    answer = await service.degrade("demo", "driver_ranking", [7], vector, Reason.DEADLINE, deadline=Deadline.after(1))
    assert (answer.served_by, answer.model_name) == (ServedBy.LIGHT, "driver_ranker_light")
    assert executor.calls == [("driver_ranker_light", 1, "features", "score")]
    await service.close()


class FakeExecutor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, str]] = []

    async def infer(
        self,
        model: str,
        inputs: npt.NDArray[np.float32],
        *,
        deadline: Deadline,
        priority: int,
        input_name: str,
        output_name: str,
        version: str = "",
    ) -> InferResult:
        self.calls.append((model, priority, input_name, output_name))
        return InferResult(np.full(len(inputs), 0.5, np.float32), model, "1")
