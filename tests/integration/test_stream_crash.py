"""A worker SIGKILLed mid-stream: a second worker takes over what it left and finishes, with
every event's output exactly once and in arrival order per key — on Redis Streams and on
NATS JetStream (real servers, the bundled Triton, the Feast demo store; the CLI)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any, Protocol

import nats
import pytest
import redis.asyncio as aioredis

from inferline.triton.launcher import TritonLauncher
from tests.integration.redis_fixtures import RedisServer
from tests.integration.router_fixtures import write_test_config
from tests.integration.test_batch_run import ROOT, ROUTE, batch_config, feast_source
from tests.integration.test_stream_nats import messages, nats_url
from tests.integration.test_stream_run import HOUR_MS, until

__all__ = ["nats_url"]  # the fixture, used here too
pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]
EVENTS = 300
KEYS = 12


class Engine(Protocol):
    base: str

    async def append(self, driver_id: int) -> str: ...
    async def outputs(self) -> list[dict[str, str]]: ...
    async def output_count(self) -> int: ...
    async def unacknowledged(self) -> int: ...
    async def close(self) -> None: ...


class RedisEngine:
    def __init__(self, server: RedisServer) -> None:
        self.base = f"redis://{server.host}:{server.port}"
        self._r = aioredis.Redis(host=server.host, port=server.port, decode_responses=True)

    async def append(self, driver_id: int) -> str:
        return str(await self._r.xadd("crash:in", {"driver_id": str(driver_id)}))

    async def outputs(self) -> list[dict[str, str]]:
        return [fields for _, fields in await self._r.xrange("crash:out")]

    async def output_count(self) -> int:
        return int(await self._r.xlen("crash:out"))

    async def unacknowledged(self) -> int:
        return int((await self._r.xpending("crash:in", "g"))["pending"])

    async def close(self) -> None:
        await self._r.aclose()


class NatsEngine:
    def __init__(self, url: str, nc: Any) -> None:
        self.base = url
        self._nc = nc
        self._js = nc.jetstream()

    @classmethod
    async def connect(cls, url: str) -> NatsEngine:
        for _ in range(200):
            try:
                engine = cls(url, await nats.connect(url))
                await engine._js.add_stream(name="crash:in", subjects=["crash:in"])
                return engine
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("nats-server did not accept connections")

    async def append(self, driver_id: int) -> str:
        return str((await self._js.publish("crash:in", json.dumps({"driver_id": driver_id}).encode())).seq)

    async def outputs(self) -> list[dict[str, str]]:
        return await messages(self._js, "crash:out")

    async def output_count(self) -> int:
        try:
            return int((await self._js.stream_info("crash:out")).state.messages)
        except nats.js.errors.NotFoundError:
            return 0

    async def unacknowledged(self) -> int:
        try:
            return int((await self._js.consumer_info("crash:in", "g")).num_ack_pending)
        except nats.js.errors.NotFoundError:
            return 0

    async def close(self) -> None:
        await self._nc.close()


def start_worker(
    config: pathlib.Path, base: str, triton_url: str, consumer: str, log: pathlib.Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "inferline.cli", "stream", "run", "--config", str(config), "--route", ROUTE,
        "--source", f"{base}/crash:in", "--group", "g", "--sink", f"{base}/crash:out", "--triton-url", triton_url,
        "--consumer", consumer, "--read-count", "4", "--max-in-flight", "4", "--claim-idle-ms", "300",
        "--budget-ms", str(HOUR_MS),
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))


@pytest.mark.parametrize("engine_name", ["redis", "nats"])
async def test_sigkill_mid_stream_loses_nothing_and_emits_nothing_twice(
    engine_name: str, tmp_path: pathlib.Path, triton_server: TritonLauncher, request: pytest.FixtureRequest
) -> None:
    feast_source(batch_config(tmp_path))  # skips without the materialised demo store
    config = write_test_config(tmp_path / "inferline.yaml")
    engine: Engine
    if engine_name == "redis":
        engine = RedisEngine(request.getfixturevalue("redis_server"))
    else:
        engine = await NatsEngine.connect(request.getfixturevalue("nats_url"))
    ids = [await engine.append(1001 + i % KEYS) for i in range(EVENTS)]

    async def outputs_at_least(n: int) -> bool:
        return await engine.output_count() >= n

    first = start_worker(config, engine.base, triton_server.grpc_url, "a", tmp_path / "a.log")
    second = None
    try:
        await until(lambda: outputs_at_least(20), "the first worker's outputs")

        async def frozen_holding_events() -> bool:
            """Freeze the worker; keep it frozen only while it holds read, unacknowledged events."""
            first.send_signal(signal.SIGSTOP)
            if await engine.unacknowledged() > 0:
                return True
            first.send_signal(signal.SIGCONT)
            return False

        await until(frozen_holding_events, "the first worker holding unacknowledged events")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert await engine.output_count() < EVENTS  # killed mid-stream, not after the end
        second = start_worker(config, engine.base, triton_server.grpc_url, "b", tmp_path / "b.log")
        await until(lambda: outputs_at_least(EVENTS), "every event answered")

        async def all_acknowledged() -> bool:
            return await engine.unacknowledged() == 0

        await until(all_acknowledged, "every event acknowledged")
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 60) == 0
        out = await engine.outputs()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        await engine.close()

    emitted = [f["event_id"] for f in out]
    assert sorted(emitted) == sorted(ids) and len(emitted) == EVENTS  # none lost, none twice
    assert {f["worker"] for f in out} == {"a", "b"}
    for key in range(1001, 1001 + KEYS):
        per_key = [f["event_id"] for f in out if f["driver_id"] == str(key)]
        assert per_key == [i for n, i in enumerate(ids) if 1001 + n % KEYS == key]  # arrival order per key
    assert all(f["served_by"] == "PRIMARY" for f in out)
