"""benchmarks/stream.py's logic at a tiny size against a real worker, Redis, Triton and the Feast
demo store: every phase's events answered by the primary, figures present, its streams deleted."""

from __future__ import annotations

import pathlib

import pytest
import redis.asyncio as aioredis

from inferline.bench.stream import StreamBenchConfig, run_stream_bench
from inferline.triton.launcher import TritonLauncher
from tests.integration.redis_fixtures import RedisServer
from tests.integration.router_fixtures import write_test_config
from tests.integration.test_batch_run import batch_config, feast_source

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]


async def test_stream_bench_at_tiny_size(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    feast_source(batch_config(tmp_path))  # skips without the materialised demo store
    cfg = StreamBenchConfig(
        engine="redis", server_url=redis_server.url, config=write_test_config(tmp_path / "inferline.yaml"),
        triton_url=triton_server.grpc_url, backlog=200, steady_s=1.0, burst_s=1.0, rate=100.0, timeout_s=60,
        prefix="tinybench",
    )  # fmt: skip
    result = await run_stream_bench(cfg)

    assert result["sustained"]["events"] == 200 and result["sustained"]["events_per_s"] > 0
    steady, burst = result["steady"], result["burst"]
    assert (steady["target_events_per_s"], burst["target_events_per_s"]) == (50.0, 300.0)
    assert steady["latency"]["count"] == 50 and 0 <= steady["latency"]["p50_ms"] <= steady["latency"]["p99_ms"]
    assert burst["events"] == 300 and burst["recovery_s"] >= 0
    for phase in (result["sustained"], steady, burst):
        assert phase["served_by"] == {"PRIMARY": 1.0}
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    try:
        assert [k async for k in client.scan_iter(match="*tinybench*")] == []  # streams and markers deleted
    finally:
        await client.aclose()
