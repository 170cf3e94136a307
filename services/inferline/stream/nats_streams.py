"""NATS JetStream as source (a durable pull consumer) and sink (publishes deduplicated by id).

The same contract as Redis Streams, with JetStream's own mechanisms: the durable consumer
is the group; a message not acknowledged within ``ack_wait`` (the claim idle time) is
redelivered by the server to whichever worker fetches next, so ``claim`` has nothing to
do; the delivery count is the attempt count. An event is one message on the subject
named like the stream, its body a JSON object of the fields; its id is its stream
sequence and its time the server's receive time. The sink publishes with the
``Nats-Msg-Id`` header set to the source event id: JetStream drops a repeat within the
output stream's duplicate window, which this worker sets to ``dedupe_ttl_s`` when it
creates the stream. A batch of outputs is published concurrently (one connection, so
they reach the stream in order) and ``write`` returns once the server has confirmed
every one (its publish acks): only then are the events acknowledged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import nats
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError

from inferline.stream.errors import StreamUnavailable
from inferline.stream.ports import Delivery, Output
from inferline.stream.spec import StreamEndpoint


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (ConnectionClosedError, NoServersError, NatsTimeoutError, OSError) as err:
        raise StreamUnavailable(f"{what}: {type(err).__name__}: {err}") from err


async def _ensure_stream(js: Any, name: str, duplicate_window_s: float | None = None) -> None:
    """Create the stream (subject = its name) unless it exists; an existing one is used as is."""
    try:
        await js.stream_info(name)
    except NotFoundError:
        config = StreamConfig(name=name, subjects=[name])
        if duplicate_window_s is not None:
            config.duplicate_window = duplicate_window_s
        await js.add_stream(config)


def _fields(data: bytes) -> dict[str, str]:
    """The event's fields; a body that is not a JSON object gives no fields (parked as invalid)."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in body.items()} if isinstance(body, dict) else {}


class NatsStreamSource:
    def __init__(self, endpoint: StreamEndpoint, group: str, *, block_ms: int, claim_idle_ms: int, max_in_flight: int):
        self._endpoint = endpoint
        self._group = group
        self._block_s = block_ms / 1000
        self._ack_wait_s = claim_idle_ms / 1000
        self._max_in_flight = max_in_flight
        self._nc: Any = None
        self._sub: Any = None
        self._held: dict[str, Any] = {}

    async def start(self) -> None:
        self._nc = await nats.connect(f"nats://{self._endpoint.host}:{self._endpoint.port}")
        js = self._nc.jetstream()
        stream = self._endpoint.stream
        await _ensure_stream(js, stream)
        config = ConsumerConfig(
            durable_name=self._group,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._ack_wait_s,
            max_ack_pending=max(self._max_in_flight * 4, 1000),
        )
        self._sub = await js.pull_subscribe(stream, durable=self._group, stream=stream, config=config)

    async def read(self, count: int) -> list[Delivery]:
        with _unavailable("fetch"):
            try:
                msgs = await self._sub.fetch(count, timeout=self._block_s)
            except (TimeoutError, NatsTimeoutError):
                return []
        out = []
        for msg in msgs:
            meta = msg.metadata
            event_id = str(meta.sequence.stream)
            self._held[event_id] = msg
            out.append(Delivery(event_id, _fields(msg.data), int(meta.timestamp.timestamp() * 1000)))
        return out

    async def claim(self, count: int) -> tuple[list[Delivery], bool]:
        """Nothing: the server redelivers after ``ack_wait`` through ``read``."""
        return [], True

    async def ack(self, ids: Sequence[str]) -> None:
        """Each ack is a publish into the connection's write buffer, sent with the others in one flush."""
        with _unavailable("ack"):
            for event_id in ids:
                msg = self._held.pop(event_id, None)
                if msg is not None:
                    await msg.ack()

    async def failed(self, event_id: str) -> int:
        """Deliveries so far; the message stays unacknowledged, so the server redelivers it after ``ack_wait``."""
        msg = self._held.get(event_id)
        return int(msg.metadata.num_delivered) if msg is not None else 1

    async def lag(self) -> int:
        with _unavailable("consumer info"):
            info = await self._sub.consumer_info()
        return int(info.num_pending or 0)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class NatsStreamSink:
    def __init__(self, endpoint: StreamEndpoint, dead_letter: str, *, dedupe_ttl_s: float) -> None:
        self._endpoint = endpoint
        self._dead = dead_letter
        self._window_s = dedupe_ttl_s
        self._nc: Any = None
        self._js: Any = None
        self._lock = asyncio.Lock()

    async def _jetstream(self) -> Any:
        async with self._lock:
            if self._js is None:
                self._nc = await nats.connect(f"nats://{self._endpoint.host}:{self._endpoint.port}")
                self._js = self._nc.jetstream()
                await _ensure_stream(self._js, self._endpoint.stream, self._window_s)
                await _ensure_stream(self._js, self._dead, self._window_s)
        return self._js

    async def _once(self, stream: str, source_id: str, fields: Mapping[str, str]) -> bool:
        with _unavailable(f"publish to {stream}"):
            js = await self._jetstream()
            ack = await js.publish(stream, json.dumps(dict(fields)).encode(), headers={"Nats-Msg-Id": source_id})
        return not ack.duplicate

    async def write(self, outputs: Sequence[Output]) -> list[bool]:
        """Publish every output at once and wait for all the server's acks; the first error raises
        after all have settled (those written are deduplicated when their events come again)."""
        results = await asyncio.gather(
            *(self._once(self._endpoint.stream, o.source_id, o.fields) for o in outputs), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [bool(r) for r in results]

    async def dead_letter(self, source_id: str, fields: Mapping[str, str], reason: str) -> bool:
        entry = {"event_id": source_id, "reason": reason, **{f"field:{k}": v for k, v in fields.items()}}
        return await self._once(self._dead, source_id, entry)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
