"""Redis Streams as source (a consumer group) and sink (an idempotent appender).

The sink's exactly-once rests on one Lua script: ``SET <marker> NX`` and ``XADD`` run
atomically, so an output is appended if and only if its source event id had none yet,
however many times the event is delivered (a worker killed between the write and the
XACK is the usual case). Markers expire after ``dedupe_ttl_s``. A batch of outputs is one
MULTI/EXEC of those scripts (one round trip, appended in order, all or none); every key
of it hashes to the output stream's slot, so it runs on one Redis Cluster node too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferline.stream.errors import StreamUnavailable
from inferline.stream.ports import Delivery, Output
from inferline.stream.spec import StreamEndpoint

CONNECTIONS = 16
"""Connections per client. Calls beyond it wait for one (a blocking pool): hundreds of events
in flight must queue for Redis, not fail with "Too many connections" and count as attempts."""

_APPEND_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
  return 1
end
return 0
"""


def _client(endpoint: StreamEndpoint) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool(
        host=endpoint.host, port=endpoint.port, decode_responses=True, max_connections=CONNECTIONS, timeout=None
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Redis unreachable or timing out → ``StreamUnavailable`` (not the event's fault: not an attempt)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise StreamUnavailable(f"{what}: {type(err).__name__}: {err}") from err


def _deliveries(entries: Sequence[Any]) -> list[Delivery]:
    # Entries deleted from the stream while pending come back without fields: nothing to score.
    return [Delivery(str(i), dict(fields)) for i, fields in entries if fields is not None]


class RedisStreamSource:
    """A consumer of one group on one stream (XREADGROUP, XAUTOCLAIM, XACK, XINFO GROUPS)."""

    def __init__(
        self, endpoint: StreamEndpoint, group: str, consumer: str, *, block_ms: int, claim_idle_ms: int
    ) -> None:
        self._redis = _client(endpoint)
        self._stream = endpoint.stream
        self._group = group
        self._consumer = consumer
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._claim_cursor = "0-0"
        self._attempts_key = f"{endpoint.stream}:{group}:attempts"

    async def start(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def read(self, count: int) -> list[Delivery]:
        with _unavailable("read"):
            answer: Any = await self._redis.xreadgroup(
                self._group, self._consumer, {self._stream: ">"}, count=count, block=self._block_ms
            )
        return [d for _, entries in answer or [] for d in _deliveries(entries)]

    async def claim(self, count: int) -> tuple[list[Delivery], bool]:
        """One XAUTOCLAIM step; the cursor walks the pending list and wraps at its end."""
        with _unavailable("claim"):
            answer: Any = await self._redis.xautoclaim(
                self._stream,
                self._group,
                self._consumer,
                min_idle_time=self._claim_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            )
        self._claim_cursor = str(answer[0])
        return _deliveries(answer[1]), self._claim_cursor == "0-0"

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            with _unavailable("ack"):
                await self._ack(ids)

    async def _ack(self, ids: Sequence[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(self._stream, self._group, *ids)
            pipe.hdel(self._attempts_key, *ids)
            await pipe.execute()

    async def failed(self, event_id: str) -> int:
        return int(await self._redis.hincrby(self._attempts_key, event_id, 1))

    async def lag(self) -> int:
        for group in await self._redis.xinfo_groups(self._stream):
            if group["name"] == self._group:
                lag = group.get("lag")
                # Redis answers nil when it cannot tell (entries deleted mid-range): count them.
                return int(lag) if lag is not None else int(await self._redis.xlen(self._stream))
        return 0

    async def close(self) -> None:
        await self._redis.aclose()


def _marker(stream: str, source_id: str) -> str:
    """The dedupe key of one output. Tagged ``{stream}`` so it hashes to the stream's own slot and
    the script's two keys stay on one node in Redis Cluster (a name with braces has its own tag)."""
    return f"{stream}:done:{source_id}" if "{" in stream else f"{{{stream}}}:done:{source_id}"


class RedisStreamSink:
    """Appends outputs to one stream, once per source event id; poison events to another."""

    def __init__(self, endpoint: StreamEndpoint, dead_letter: str, *, dedupe_ttl_s: float) -> None:
        self._redis = _client(endpoint)
        self._stream = endpoint.stream
        self._dead = dead_letter
        self._ttl_ms = str(int(dedupe_ttl_s * 1000))
        self._append = self._redis.register_script(_APPEND_ONCE)
        self._loaded = False
        """The script is in the server's cache (a batch calls it by its SHA, without checking first)."""

    def _args(self, stream: str, output: Output) -> dict[str, Any]:
        flat = [v for pair in output.fields.items() for v in pair]
        return {"keys": [_marker(stream, output.source_id), stream], "args": [self._ttl_ms, *flat]}

    async def write(self, outputs: Sequence[Output]) -> list[bool]:
        if not outputs:
            return []
        with _unavailable(f"append to {self._stream}"):
            try:
                return await self._write_batch(outputs)
            except NoScriptError:  # the server lost its script cache (a restart): every call of the batch failed
                self._loaded = False
                return await self._write_batch(outputs)

    async def _write_batch(self, outputs: Sequence[Output]) -> list[bool]:
        """One MULTI/EXEC of EVALSHAs. Not through redis-py's script-in-pipeline support, which
        asks SCRIPT EXISTS before every batch: a second round trip per batch."""
        if not self._loaded:
            await self._redis.script_load(_APPEND_ONCE)
            self._loaded = True
        async with self._redis.pipeline(transaction=True) as pipe:
            for output in outputs:
                call = self._args(self._stream, output)
                pipe.evalsha(self._append.sha, len(call["keys"]), *call["keys"], *call["args"])
            added = await pipe.execute()
        return [bool(a) for a in added]

    async def dead_letter(self, source_id: str, fields: Mapping[str, str], reason: str) -> bool:
        entry = {"event_id": source_id, "reason": reason, **{f"field:{k}": v for k, v in fields.items()}}
        with _unavailable(f"append to {self._dead}"):
            added = await self._append(**self._args(self._dead, Output(source_id, entry)))
        return bool(added)

    async def close(self) -> None:
        await self._redis.aclose()
