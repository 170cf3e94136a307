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

Never cancelled (docs/triton.md): the stream is half-closed only when every request on it
has been answered, and a caller that stops waiting leaves its request to finish. If the
stream itself breaks (Triton restarted, the connection lost), every request still on it
fails with the stream's status and the next request opens a new stream.
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
"""At most this long for the stream's unanswered requests on close (they carry Triton queue
timeouts, so they end); past it the stream is cancelled."""


class StreamedRequestFailed(Exception):
    """Triton answered one request of the stream with an error (``message``, Triton's words)."""


class InferStream:
    """One ModelStreamInfer stream, opened on first use (see the module docstring)."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._stub = stub
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[service_pb2.ModelInferResponse]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time
        self._closing = False

    @property
    def unanswered(self) -> int:
        """Requests written to the stream and not answered yet."""
        return len(self._pending)

    async def submit(self, request: service_pb2.ModelInferRequest) -> asyncio.Future[service_pb2.ModelInferResponse]:
        """Write ``request`` (its ``id`` is replaced by the stream's own) and return the future
        of its answer, which fails with ``StreamedRequestFailed`` (Triton refused the request)
        or ``grpc.aio.AioRpcError`` (the stream broke).

        Raises:
            grpc.aio.AioRpcError: the stream could not be opened or written to.
        """
        if self._closing:
            raise RuntimeError("the stream is closing")
        request_id = str(next(self._ids))
        request.id = request_id
        answer: asyncio.Future[service_pb2.ModelInferResponse] = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            call = self._open()
            self._pending[request_id] = answer
            try:
                await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The stream ended under us: its reader fails what it held; say why here too.
                self._pending.pop(request_id, None)
                raise await _status_of(call, exc) from exc
        return answer

    def _open(self) -> Any:
        if self._call is None:
            call = self._stub.ModelStreamInfer()  # no deadline: a stream lives as long as its job
            self._call = call
            self._reader = asyncio.create_task(self._read(call), name="triton-infer-stream")
        return self._call

    async def _read(self, call: Any) -> None:
        failure: BaseException | None = None
        try:
            async for response in call:
                answer = self._pending.pop(response.infer_response.id, None)
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
            if self._call is call:
                self._call = None
            if self._pending:
                if failure is None:
                    failure = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the stream ended")
                logger.info("Triton's inference stream ended with %d requests unanswered", len(self._pending))
                pending, self._pending = self._pending, {}
                for answer in pending.values():
                    if not answer.done():
                        answer.set_exception(failure)

    async def close(self) -> None:
        """Half-close the stream once every request on it is answered (at most ``CLOSE_WAIT_S``)."""
        self._closing = True
        call, reader = self._call, self._reader
        if call is None or reader is None:
            return
        if self._pending:
            await asyncio.wait(list(self._pending.values()), timeout=CLOSE_WAIT_S)
        try:
            async with self._write_lock:
                await call.done_writing()
            await asyncio.wait_for(asyncio.shield(reader), CLOSE_WAIT_S)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            reader.cancel()
            call.cancel()
        await asyncio.gather(reader, return_exceptions=True)


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
