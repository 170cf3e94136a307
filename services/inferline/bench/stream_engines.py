"""The stream benchmark's side of each engine: append events, count and read back the outputs.

One small class per engine (Redis Streams, NATS JetStream) behind ``BenchStreams``, each on
streams of its own (``<prefix>:in``, ``<prefix>:out``) that ``close`` deletes again, with
what the worker left on the server (its dedupe markers, attempts, dead-letter stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import nats
import redis.asyncio as aioredis
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from inferline.bench.stream_stats import StreamOutput

READ_CHUNK = 5000
"""Output entries read back per call."""


class BenchStreams(Protocol):
    source_url: str
    sink_url: str

    async def start(self) -> None: ...
    async def append(self, events: Sequence[dict[str, str]]) -> list[str]:
        """Append ``events`` in order; their event ids."""

    async def output_count(self) -> int: ...
    async def read_new(self) -> list[StreamOutput]:
        """The output entries appended since the last call, in order."""

    async def close(self) -> None:
        """Delete the benchmark's streams and what the worker kept for them."""


def _output(fields: dict[str, Any], output_ms: int) -> StreamOutput:
    return StreamOutput(str(fields["event_id"]), int(fields["event_time_ms"]), output_ms, str(fields["served_by"]))


class RedisBenchStreams:
    def __init__(self, url: str, prefix: str) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 6379
        self._in, self._out = f"{prefix}:in", f"{prefix}:out"
        self.source_url = f"redis://{self._host}:{self._port}/{self._in}"
        self.sink_url = f"redis://{self._host}:{self._port}/{self._out}"
        self._redis = aioredis.Redis(host=self._host, port=self._port, decode_responses=True)
        self._cursor = "-"

    async def start(self) -> None:
        await self._redis.ping()

    async def append(self, events: Sequence[dict[str, str]]) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(self._in, event)  # type: ignore[arg-type]
            return [str(i) for i in await pipe.execute()]

    async def output_count(self) -> int:
        return int(await self._redis.xlen(self._out))

    async def read_new(self) -> list[StreamOutput]:
        out: list[StreamOutput] = []
        while True:
            entries: Any = await self._redis.xrange(self._out, min=self._cursor, count=READ_CHUNK)
            for entry_id, fields in entries:
                out.append(_output(fields, int(entry_id.split("-")[0])))
            if len(entries) < READ_CHUNK:
                if entries:
                    self._cursor = f"({entries[-1][0]}"
                return out
            self._cursor = f"({entries[-1][0]}"

    async def close(self) -> None:
        try:
            markers = [k async for k in self._redis.scan_iter(match=f"{{{self._out}}}:done:*", count=5000)]
            for start in range(0, len(markers), 5000):
                await self._redis.unlink(*markers[start : start + 5000])
            await self._redis.unlink(self._in, self._out, f"{self._in}:dead", f"{self._in}:bench:attempts")
        finally:
            await self._redis.aclose()


class NatsBenchStreams:
    """Events published with JetStream acks (their sequence is the event id); outputs read back
    through a durable pull consumer on the output stream, which the worker creates (durable: the
    server deletes an ephemeral one idle for 5 s, as it is while a phase runs; deleted with the
    stream)."""

    def __init__(self, url: str, prefix: str) -> None:
        parts = urlsplit(url)
        base = f"nats://{parts.hostname or '127.0.0.1'}:{parts.port or 4222}"
        name = prefix.replace(":", "_").replace(".", "_")  # a JetStream name: no dots
        self._in, self._out = f"{name}_in", f"{name}_out"
        self.source_url, self.sink_url = f"{base}/{self._in}", f"{base}/{self._out}"
        self._url = base
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None

    async def start(self) -> None:
        self._nc = await nats.connect(self._url)
        self._js = self._nc.jetstream()
        await self._js.add_stream(name=self._in, subjects=[self._in])

    async def append(self, events: Sequence[dict[str, str]]) -> list[str]:
        acks = await asyncio.gather(*(self._js.publish(self._in, json.dumps(e).encode()) for e in events))
        return [str(a.seq) for a in acks]

    async def output_count(self) -> int:
        try:
            return int((await self._js.stream_info(self._out)).state.messages)
        except NotFoundError:
            return 0

    async def read_new(self) -> list[StreamOutput]:
        if self._sub is None:
            if not await self.output_count():
                return []
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
            self._sub = await self._js.pull_subscribe(self._out, durable="reader", stream=self._out, config=config)
        out: list[StreamOutput] = []
        while True:
            try:
                msgs = await self._sub.fetch(READ_CHUNK, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                return out
            for msg in msgs:
                out.append(_output(json.loads(msg.data), int(msg.metadata.timestamp.timestamp() * 1000)))

    async def close(self) -> None:
        try:
            for stream in (self._in, self._out, f"{self._in}:dead"):
                with contextlib.suppress(NotFoundError):
                    await self._js.delete_stream(stream)
        finally:
            await self._nc.close()


def open_bench_streams(engine: str, url: str, prefix: str) -> BenchStreams:
    if engine == "nats":
        return NatsBenchStreams(url, prefix)
    return RedisBenchStreams(url, prefix)
