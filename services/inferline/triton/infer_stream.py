"""``InferStream``: many ModelInfer requests over one ModelStreamInfer stream of Triton's.

Why: a unary gRPC call costs its client a call object, metadata, a deadline and a
completion of its own. On the bundled Triton (2-core VM, 128-row requests, 4 in flight,
2026-12-06) a unary ``ModelInfer`` cost the client ~370 µs of CPU and a message on an open
stream ~220 µs: 228,000–240,000 rows/s unary against 329,000–371,000 streamed, alternated on
one Triton. A batch job, whose requests are many, alike and not individually urgent, is
where that matters (``TritonExecutor(stream_calls=True)``).

How Triton (2.51) answers a stream of a model that is not decoupled: one response per
request, carrying the request's ``id``, in the order the requests were sent; a request that
fails (unknown model, queue full, queue timeout, too large a batch) is answered with its
``error_message`` and the stream goes on. So each request gets an id of the stream's own,
its answer is matched by id, and a failed request fails alone.

In order means an answer waits for every request sent before it: a 2 ms request sent
behind a 300 ms one on the same stream came back at 304 ms. A stream therefore suits
requests of one model and priority, as a batch job's are, and ``TritonExecutor`` keeps one
per model (a variant measured beside the job's requests does not wait behind them). The router's calls stay unary:
their priorities must overtake each other. (Tried on the router all the same, 2 interleaved
pairs of ``benchmarks/online_overhead.py --targets router``: the knee rose from 900 / 990
to 1,089 / 1,198 req/s, but at 900 req/s the median answer took 34 ms against 11.)

Never cancelled (docs/triton.md): a caller that stops waiting leaves its request to finish,
and the stream is half-closed on close, then read to its end. Requests are written by a
task of the stream's own, never by the callers: grpc.aio cancels the whole call when a task
is cancelled inside ``write``, and a caller's task is cancelled whenever its job is. If the
stream itself breaks (Triton restarted, the connection lost), every request on it fails
with the stream's status and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

logger = logging.getLogger(__name__)

CLOSE_WAIT_S = 30.0
"""At most this long for the stream's last answers on close (its requests carry Triton queue
timeouts, so they end); past it the stream is cancelled."""

Answer = asyncio.Future[service_pb2.ModelInferResponse]


class StreamedRequestFailed(Exception):
    """Triton answered one request of the stream with an error (``message``, Triton's words)."""


class _Call:
    """One open ModelStreamInfer call: its writer and reader tasks and its unanswered requests."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self.call: Any = stub.ModelStreamInfer()  # no deadline: a stream lives as long as its job
        self.pending: dict[str, Answer] = {}
        self.outbox: asyncio.Queue[service_pb2.ModelInferRequest | None] = asyncio.Queue()
        self.ended = False
        self.writer = asyncio.create_task(self._write(), name="triton-infer-stream-write")
        self.reader = asyncio.create_task(self._read(), name="triton-infer-stream-read")

    async def _write(self) -> None:
        while (request := await self.outbox.get()) is not None:
            try:
                await self.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                self._end(await _status_of(self.call, exc))
                return
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._end(await _status_of(self.call, exc))

    async def _read(self) -> None:
        failure: grpc.aio.AioRpcError | None = None
        try:
            async for response in self.call:
                answer = self.pending.pop(response.infer_response.id, None)
                if answer is None or answer.done():
                    continue
                if response.error_message:
                    answer.set_exception(StreamedRequestFailed(response.error_message))
                else:
                    answer.set_result(response.infer_response)
        except grpc.aio.AioRpcError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = _rpc_error(grpc.StatusCode.CANCELLED, "the stream was closed")
            raise
        finally:
            self._end(failure or _rpc_error(grpc.StatusCode.UNAVAILABLE, "the stream ended"))

    def _end(self, failure: grpc.aio.AioRpcError) -> None:
        """No more requests on this call; fail those it still holds with ``failure``."""
        if not self.ended:
            self.outbox.put_nowait(None)  # the writer's last item: it ends, not waits on forever
        self.ended = True
        if self.pending:
            logger.info("Triton's inference stream ended with %d requests unanswered", len(self.pending))
        pending, self.pending = self.pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(failure)

    async def close(self) -> None:
        """Half-close once every queued request is written, then read the answers to the end."""
        self.outbox.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.gather(self.writer, self.reader)), CLOSE_WAIT_S)
        except TimeoutError:
            logger.warning(
                "Triton's inference stream still had %d requests after %.0f s: cancelled",
                len(self.pending),
                CLOSE_WAIT_S,
            )
            self.writer.cancel()
            self.reader.cancel()
            self.call.cancel()
            await asyncio.gather(self.writer, self.reader, return_exceptions=True)


class InferStream:
    """ModelInfer requests over one ModelStreamInfer stream, opened on first use and again after
    it broke (see the module docstring)."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub
        self._call: _Call | None = None
        self._ids = itertools.count()
        self._closing = False

    @property
    def unanswered(self) -> int:
        """Requests sent on the stream and not answered yet."""
        return 0 if self._call is None else len(self._call.pending)

    def submit(self, request: service_pb2.ModelInferRequest) -> Answer:
        """Queue ``request`` for the stream (its ``id`` is replaced by the stream's own) and
        return the future of its answer, which fails with ``StreamedRequestFailed`` (Triton
        refused the request) or ``grpc.aio.AioRpcError`` (the stream broke, or could not be
        opened). Nothing here waits, so nothing a caller cancels reaches the stream."""
        if self._closing:
            raise RuntimeError("the stream is closing")
        if self._call is None or self._call.ended:
            self._call = _Call(self._stub)
        request.id = str(next(self._ids))
        answer: Answer = asyncio.get_running_loop().create_future()
        self._call.pending[request.id] = answer
        self._call.outbox.put_nowait(request)
        return answer

    async def close(self) -> None:
        """Half-close the stream and wait for its last answers (at most ``CLOSE_WAIT_S``)."""
        self._closing = True
        if self._call is not None:
            await self._call.close()


async def _status_of(call: Any, exc: BaseException) -> grpc.aio.AioRpcError:
    """The stream's own status as an ``AioRpcError`` (a write after the end raises a bare
    ``InvalidStateError``)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc
    code = await call.code()
    details = await call.details()
    return _rpc_error(code, details)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An ``AioRpcError`` the stream's own status did not come with (its end, seen from here)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")
