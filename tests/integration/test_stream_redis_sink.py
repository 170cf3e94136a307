"""The Redis Streams sink's batch write against a real redis-server: one MULTI of the append-once
script, each output once per source event id, in order, also after the server lost its script cache."""

from __future__ import annotations

import redis.asyncio as aioredis

from inferline.stream.ports import Output
from inferline.stream.redis_streams import RedisStreamSink
from inferline.stream.spec import StreamEndpoint
from tests.integration.redis_fixtures import RedisServer


async def test_batch_appends_each_source_event_once_in_order(redis_server: RedisServer) -> None:
    base = f"redis://{redis_server.host}:{redis_server.port}"
    sink = RedisStreamSink(StreamEndpoint.parse(f"{base}/sink:out"), "sink:dead", dedupe_ttl_s=3600)
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    batch = [Output(f"{i}-0", {"event_id": f"{i}-0", "score": f"0.{i}"}) for i in range(1, 9)]
    try:
        assert await sink.write([batch[6]]) == [True]
        assert await sink.write(batch) == [True] * 6 + [False, True]  # a redelivered batch
        await client.script_flush()  # as after a restart: the batch's EVALSHAs find no script
        assert await sink.write(batch) == [False] * 8
        assert await sink.write([Output("9-0", {"event_id": "9-0", "score": "0.9"})]) == [True]
        out = [fields["event_id"] for _, fields in await client.xrange("sink:out")]
    finally:
        await sink.close()
        await client.aclose()
    assert out == ["7-0", "1-0", "2-0", "3-0", "4-0", "5-0", "6-0", "8-0", "9-0"]
