"""``--publish-cache``: a job's scores land in the real Redis score cache with their computation
time, expire when they would turn stale, and are never written already stale."""

from __future__ import annotations

import datetime as dt
import pathlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis

from inferline.batch import BatchInputError, BatchJobSpec, run_batch
from inferline.batch.plan import plan_job
from inferline.batch.publish import CachePublisher
from inferline.core.config import InferlineConfig
from inferline.degradation import RedisScoreCache
from inferline.triton.launcher import TritonLauncher
from tests.integration.redis_fixtures import RedisServer
from tests.integration.test_batch_run import ROUTE, batch_config, feast_source, read_output

TENANT = "demo"


def publishing_config(tmp: pathlib.Path, redis_url: str, prefix: str) -> InferlineConfig:
    return batch_config(
        tmp,
        INFERLINE_SCORE_CACHE__BACKEND="redis",
        INFERLINE_SCORE_CACHE__REDIS_URL=redis_url,
        INFERLINE_SCORE_CACHE__KEY_PREFIX=prefix,
    )


def ids_file(path: pathlib.Path, ids: list[int]) -> pathlib.Path:
    pq.write_table(pa.table({"driver_id": pa.array(ids, pa.int64())}), path)
    return path


@pytest.mark.requires_triton
@pytest.mark.requires_feast
async def test_published_scores_carry_their_computation_time(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    config = publishing_config(tmp_path, redis_server.url, "batchpub")
    feast_source(config)
    ids = list(range(1001, 1501))
    spec = BatchJobSpec.build(
        route=ROUTE,
        input_path=ids_file(tmp_path / "in.parquet", ids),
        output_dir=tmp_path / "out",
        chunk_rows=200,
        publish_cache=True,
        tenant=TENANT,
    )

    summary = await run_batch(config, spec, triton_server.grpc_url)

    assert summary["published"] == {"rows": 500, "stale": 0}
    out = read_output(tmp_path / "out")
    cache = RedisScoreCache(redis_server.url, "batchpub", {ROUTE: 3600}, 5.0)
    try:
        cached = await cache.get_many(TENANT, ROUTE, ids)
    finally:
        await cache.close()
    assert all(c is not None for c in cached)
    np.testing.assert_allclose([c.score for c in cached if c is not None], out["score"], rtol=1e-6)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        raw = await client.get(f"batchpub:{TENANT}:{ROUTE}:1001")
        ttl_ms = await client.pttl(f"batchpub:{TENANT}:{ROUTE}:1001")
    finally:
        await client.aclose()
    written_ms = round(float(raw.split(b",")[1]) * 1000)
    assert written_ms == out.loc[0, "computed_at"].value // 1_000_000  # the computation time, not the write time
    max_staleness_ms = config.routes[ROUTE].degradation.max_staleness_s * 1000
    assert 0 < ttl_ms <= max_staleness_ms  # gone from Redis by the time it would be stale


async def test_scores_already_stale_are_not_written(redis_server: RedisServer, tmp_path: pathlib.Path) -> None:
    config = publishing_config(tmp_path, redis_server.url, "batchstale")
    degradation = config.routes[ROUTE].degradation
    computed_at = time.time() - degradation.max_staleness_s - 1
    publisher = CachePublisher(config.score_cache, degradation, TENANT, ROUTE)
    try:
        await publisher.publish([1001, 1002], [0.1, 0.2], computed_at)
    finally:
        await publisher.close()
    assert (publisher.published, publisher.stale) == (0, 2)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.exists(f"batchstale:{TENANT}:{ROUTE}:1001") == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("tenant", "backend", "timestamps", "message"),
    [
        ("nobody", "redis", False, "--tenant 'nobody': no such tenant"),
        ("limited", "redis", False, "--tenant 'limited' may not call route"),
        (TENANT, "memory", False, "needs score_cache.backend: redis"),
        (TENANT, "redis", True, "point-in-time features"),
    ],
)
def test_publishing_is_refused_before_work(
    tmp_path: pathlib.Path, tenant: str, backend: str, timestamps: bool, message: str
) -> None:
    config = batch_config(tmp_path, INFERLINE_SCORE_CACHE__BACKEND=backend)
    columns = {"driver_id": pa.array([1001], pa.int64())}
    if timestamps:
        columns["event_timestamp"] = pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)])
    pq.write_table(pa.table(columns), tmp_path / "in.parquet")
    spec = BatchJobSpec.build(
        route=ROUTE, input_path=tmp_path / "in.parquet", output_dir=tmp_path / "out", publish_cache=True, tenant=tenant
    )
    with pytest.raises(BatchInputError, match=message):
        plan_job(config, spec)
