"""``inferline stream run`` against real Redis, the bundled Triton and the Feast demo store.

Scores are checked against the batch tests' oracle (features read straight from the
Feast source file, scored by a direct tritonclient call); order per key, exactly-once
output, the dead-letter stream, the score cache and the lag switch are read back from Redis.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from inferline.core.config import InferlineConfig
from inferline.degradation import RedisScoreCache
from inferline.stream import StreamSpec
from inferline.stream.runner import run_stream
from inferline.triton.launcher import TritonLauncher
from tests.integration.redis_fixtures import RedisServer
from tests.integration.test_batch_run import ROUTE, batch_config, direct_scores, expected_features, feast_source
from tests.waiting import WITHIN_S

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]
TENANT = "demo"


def stream_config(tmp: pathlib.Path, redis: RedisServer, prefix: str) -> InferlineConfig:
    return batch_config(
        tmp,
        INFERLINE_SCORE_CACHE__BACKEND="redis",
        INFERLINE_SCORE_CACHE__REDIS_URL=redis.url,
        INFERLINE_SCORE_CACHE__KEY_PREFIX=prefix,
    )


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async condition (a hang fails after ``WITHIN_S``; not a measure of speed)."""
    deadline = time.monotonic() + WITHIN_S
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not met within {WITHIN_S} s"
        await asyncio.sleep(0.01)


async def entries(client: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [(i, f) for i, f in await client.xrange(stream)]


class Worker:
    """``run_stream`` in a task of this loop, stopped (in-flight events finished) by ``stop``."""

    def __init__(self, config: InferlineConfig, spec: StreamSpec, url: str) -> None:
        self.registry = CollectorRegistry()
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(run_stream(config, spec, url, self.stop_event, registry=self.registry))

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"route": ROUTE, **labels})

    async def stop(self) -> Any:
        self.stop_event.set()
        return await self.task


HOUR_MS = 3_600_000


def spec_for(redis: RedisServer, name: str, **options: Any) -> StreamSpec:
    """Events appended before the worker has started (Feast, Triton client) are still in budget."""
    base = f"redis://{redis.host}:{redis.port}"
    return StreamSpec.build(
        route=ROUTE, source=f"{base}/{name}:in", group="g", sink=f"{base}/{name}:out", budget_ms=HOUR_MS, **options
    )


async def test_events_scored_once_in_key_order_with_poison_parked_and_cache_refreshed(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    config = stream_config(tmp_path, redis_server, "s1")
    source = feast_source(config)
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    n = 120
    rows = pd.DataFrame(
        {"driver_id": 1001 + np.arange(n) % 10, "trip_distance_km": np.round(np.linspace(0.5, 25.0, n), 3)}
    )
    ids = [await client.xadd("s1:in", {"driver_id": str(r.driver_id), "trip_distance_km": str(r.trip_distance_km)})
           for r in rows.itertuples()]  # fmt: skip
    poison = await client.xadd("s1:in", {"driver_id": "not-a-number"})
    old_ms = int(time.time() * 1000) - 2 * HOUR_MS  # past its budget: the degradation ladder answers
    late = await client.xadd("s1:in", {"driver_id": "1003", "event_time_ms": str(old_ms)})
    worker = Worker(config, spec_for(redis_server, "s1", tenant=TENANT, read_count=16, max_in_flight=32),
                    triton_server.grpc_url)  # fmt: skip
    try:
        await until(lambda: _length(client, "s1:out", n + 1), "every good event answered")
        await until(lambda: _length(client, "s1:in:dead", 1), "the poison event parked")
        out = await entries(client, "s1:out")
        dead = await entries(client, "s1:in:dead")
        await worker.stop()
        pending = await client.xpending("s1:in", "g")
    finally:
        if not worker.task.done():
            await worker.stop()
        await client.aclose()

    by_event = {f["event_id"]: f for _, f in out}
    assert len(out) == len(by_event) == n + 1  # each output once
    assert set(by_event) == {*ids, late}
    assert pending["pending"] == 0
    for key in range(1001, 1011):  # arrival order per key
        emitted = [f["event_id"] for _, f in out if f["driver_id"] == str(key) and f["event_id"] != late]
        assert emitted == [i for i, d in zip(ids, rows["driver_id"], strict=True) if d == key]
    want = direct_scores(triton_server.grpc_url, expected_features(source, rows))
    got = np.array([float(by_event[i]["score"]) for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-5)
    first = by_event[ids[0]]
    assert (first["served_by"], first["model"], first["mode"], first["reason"]) == (
        "PRIMARY", "driver_ranker", "primary", ""
    )  # fmt: skip
    assert first["worker"] and int(first["computed_at_ms"]) >= int(ids[0].split("-")[0])
    assert by_event[late]["served_by"] in {"CACHE", "LIGHT", "BASELINE"} and by_event[late]["reason"] == "DEADLINE"
    assert dead[0][1]["event_id"] == poison and "driver_id" in dead[0][1]["reason"]
    cache = RedisScoreCache(redis_server.url, "s1", {ROUTE: 3600}, 5.0)
    try:
        cached = await cache.get_many(TENANT, ROUTE, [1001, 1002])
    finally:
        await cache.close()
    last = {k: float(by_event[[i for i, d in zip(ids, rows["driver_id"], strict=True) if d == k][-1]]["score"])
            for k in (1001, 1002)}  # fmt: skip
    assert [c.score if c else None for c in cached] == pytest.approx([last[1001], last[1002]], abs=1e-6)


async def test_lag_spike_switches_to_the_light_model_and_back(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    config = stream_config(tmp_path, redis_server, "s2")
    feast_source(config)
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    for i in range(150):  # the backlog a burst leaves
        await client.xadd("s2:in", {"driver_id": str(1001 + i % 7)})
    spec = spec_for(redis_server, "s2", lag_high=40, lag_low=5, lag_interval_s=0.05, read_count=8, max_in_flight=8)
    worker = Worker(config, spec, triton_server.grpc_url)
    try:
        await until(lambda: _length(client, "s2:out", 150), "the backlog answered")

        async def primary_again() -> bool:
            return worker.metric("inferline_stream_light_mode") == 0

        await until(primary_again, "back to the primary once the lag fell")
        after = [await client.xadd("s2:in", {"driver_id": "1001"}) for _ in range(5)]
        await until(lambda: _length(client, "s2:out", 155), "the later events answered")
        out = {f["event_id"]: f for _, f in await entries(client, "s2:out")}
        await worker.stop()
    finally:
        if not worker.task.done():
            await worker.stop()
        await client.aclose()
    first = min(out, key=lambda i: tuple(map(int, i.split("-"))))
    assert (out[first]["mode"], out[first]["served_by"], out[first]["reason"]) == ("light", "LIGHT", "OVERLOAD")
    assert out[first]["model"] == "driver_ranker_light"
    assert [(out[i]["mode"], out[i]["served_by"]) for i in after] == [("primary", "PRIMARY")] * 5
    assert worker.metric("inferline_stream_events_total", served_by="LIGHT") >= 1  # type: ignore[operator]
    assert worker.metric("inferline_stream_lag") == 0


async def test_the_routes_stream_budget_decides_which_events_are_too_old(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    """No --budget-ms: the route's budgets.stream_ms (an hour here) applies, not the 5 s default."""
    config = batch_config(tmp_path, INFERLINE_ROUTES__DRIVER_RANKING__BUDGETS__STREAM_MS=str(HOUR_MS))
    feast_source(config)
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    now_ms = int(time.time() * 1000)
    minute_old = await client.xadd("s3:in", {"driver_id": "1001", "event_time_ms": str(now_ms - 60_000)})
    too_old = await client.xadd("s3:in", {"driver_id": "1002", "event_time_ms": str(now_ms - 2 * HOUR_MS)})
    base = f"redis://{redis_server.host}:{redis_server.port}"
    spec = StreamSpec.build(route=ROUTE, source=f"{base}/s3:in", group="g", sink=f"{base}/s3:out")
    worker = Worker(config, spec, triton_server.grpc_url)
    try:
        await until(lambda: _length(client, "s3:out", 2), "both events answered")
        out = {f["event_id"]: f for _, f in await entries(client, "s3:out")}
        await worker.stop()
    finally:
        if not worker.task.done():
            await worker.stop()
        await client.aclose()
    assert (out[minute_old]["served_by"], out[minute_old]["reason"]) == ("PRIMARY", "")
    assert out[too_old]["served_by"] != "PRIMARY" and out[too_old]["reason"] == "DEADLINE"


async def _length(client: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await client.xlen(stream)) >= n
