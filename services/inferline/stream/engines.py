"""The source and sink of an endpoint, by its URL scheme (``redis://``, ``nats://``)."""

from __future__ import annotations

from inferline.stream.ports import Sink, Source
from inferline.stream.spec import StreamSpec


def open_source(spec: StreamSpec) -> Source:
    if spec.source.scheme == "nats":
        from inferline.stream.nats_streams import NatsStreamSource

        return NatsStreamSource(
            spec.source, spec.group, block_ms=spec.block_ms, claim_idle_ms=spec.claim_idle_ms,
            max_in_flight=spec.max_in_flight,
        )  # fmt: skip
    from inferline.stream.redis_streams import RedisStreamSource

    return RedisStreamSource(
        spec.source, spec.group, spec.consumer, block_ms=spec.block_ms, claim_idle_ms=spec.claim_idle_ms
    )


def open_sink(spec: StreamSpec) -> Sink:
    if spec.sink.scheme == "nats":
        from inferline.stream.nats_streams import NatsStreamSink

        return NatsStreamSink(spec.sink, spec.dead_letter_stream, dedupe_ttl_s=spec.dedupe_ttl_s)
    from inferline.stream.redis_streams import RedisStreamSink

    return RedisStreamSink(spec.sink, spec.dead_letter_stream, dedupe_ttl_s=spec.dedupe_ttl_s)
