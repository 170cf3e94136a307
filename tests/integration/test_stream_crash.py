"""A worker SIGKILLed mid-stream: a second worker claims what it left and finishes, with every
event's output exactly once and in arrival order per key (real Redis, Triton, Feast; the CLI)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from inferline.triton.launcher import TritonLauncher
from tests.integration.redis_fixtures import RedisServer
from tests.integration.router_fixtures import write_test_config
from tests.integration.test_batch_run import ROOT, ROUTE, batch_config, feast_source
from tests.integration.test_stream_run import HOUR_MS, until

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]
EVENTS = 300
KEYS = 12


def start_worker(
    config: pathlib.Path, redis: RedisServer, triton_url: str, consumer: str, log: pathlib.Path
) -> subprocess.Popen[bytes]:
    base = f"redis://{redis.host}:{redis.port}"
    command = [
        sys.executable, "-m", "inferline.cli", "stream", "run", "--config", str(config), "--route", ROUTE,
        "--source", f"{base}/crash:in", "--group", "g", "--sink", f"{base}/crash:out", "--triton-url", triton_url,
        "--consumer", consumer, "--read-count", "4", "--max-in-flight", "4", "--claim-idle-ms", "300",
        "--budget-ms", str(HOUR_MS),
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))


async def test_sigkill_mid_stream_loses_nothing_and_emits_nothing_twice(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, redis_server: RedisServer
) -> None:
    feast_source(batch_config(tmp_path))  # skips without the materialised demo store
    config = write_test_config(tmp_path / "inferline.yaml")
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    ids = [await client.xadd("crash:in", {"driver_id": str(1001 + i % KEYS)}) for i in range(EVENTS)]

    async def outputs_at_least(n: int) -> bool:
        return int(await client.xlen("crash:out")) >= n

    first = start_worker(config, redis_server, triton_server.grpc_url, "a", tmp_path / "a.log")
    second = None
    try:
        await until(lambda: outputs_at_least(20), "the first worker's outputs")

        async def frozen_holding_events() -> bool:
            """Freeze the worker; keep it frozen only while it holds read, unacknowledged events."""
            first.send_signal(signal.SIGSTOP)
            if (await client.xpending("crash:in", "g"))["pending"] > 0:
                return True
            first.send_signal(signal.SIGCONT)
            return False

        await until(frozen_holding_events, "the first worker holding unacknowledged events")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert int(await client.xlen("crash:out")) < EVENTS  # killed mid-stream, not after the end
        second = start_worker(config, redis_server, triton_server.grpc_url, "b", tmp_path / "b.log")
        await until(lambda: outputs_at_least(EVENTS), "every event answered")

        async def all_acknowledged() -> bool:
            return (await client.xpending("crash:in", "g"))["pending"] == 0

        await until(all_acknowledged, "every event acknowledged")
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 60) == 0
        out = [fields for _, fields in await client.xrange("crash:out")]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        await client.aclose()

    emitted = [f["event_id"] for f in out]
    assert sorted(emitted) == sorted(ids) and len(emitted) == EVENTS  # none lost, none twice
    assert {f["worker"] for f in out} == {"a", "b"}
    for key in range(1001, 1001 + KEYS):
        per_key = [f["event_id"] for f in out if f["driver_id"] == str(key)]
        assert per_key == [i for n, i in enumerate(ids) if 1001 + n % KEYS == key]  # arrival order per key
    assert all(f["served_by"] == "PRIMARY" for f in out)
