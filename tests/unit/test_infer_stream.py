"""InferStream alone, against an in-process gRPC server speaking Triton's stream protocol.

The server stands in for Triton only here, to make what Triton does rarely happen on cue:
answers out of order, a request refused in the middle of a stream, the stream broken with
requests on it. tests/integration/test_triton_executor.py runs the same calls on Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.triton.infer_stream import InferStream, StreamedRequestFailed
from tests.waiting import eventually


class ScriptedTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers each request by its model name: "echo" at once, "hold" when released (in
    reverse order), "refuse" with an error message, "break" by ending the stream UNAVAILABLE."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.streams = 0
        self.received = 0
        self.cancelled = 0
        """Streams the client cancelled (what must never happen under requests in flight)."""

    async def ModelStreamInfer(
        self, requests: AsyncIterator[service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        self.streams += 1
        context.add_done_callback(lambda done: setattr(self, "cancelled", self.cancelled + done.cancelled()))
        held: list[service_pb2.ModelInferRequest] = []
        async for request in requests:
            self.received += 1
            if request.model_name == "echo":
                yield _answer(request)
            elif request.model_name == "hold":
                held.append(request)
                if len(held) == 3:
                    await self.release.wait()
                    for waiting in reversed(held):
                        yield _answer(waiting)
                    held.clear()
            elif request.model_name == "refuse":
                yield service_pb2.ModelStreamInferResponse(
                    error_message="Request for unknown model: 'refuse' is not found",
                    infer_response=service_pb2.ModelInferResponse(id=request.id),
                )
            else:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")


def _answer(request: service_pb2.ModelInferRequest) -> service_pb2.ModelStreamInferResponse:
    # The answer carries the request's bytes back, so a caller can tell whose answer it got.
    response = service_pb2.ModelInferResponse(
        id=request.id, model_name=request.model_name, raw_output_contents=list(request.raw_input_contents)
    )
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _request(model: str, payload: bytes) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name=model, raw_input_contents=[payload])


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedTriton, InferStream]]:
    server = grpc.aio.server()
    triton = ScriptedTriton()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = InferStream(service_pb2_grpc.GRPCInferenceServiceStub(channel))
    try:
        yield triton, stream
    finally:
        await stream.close()
        await channel.close()
        await server.stop(None)


async def test_answers_out_of_order_reach_their_own_requests(scripted: tuple[ScriptedTriton, InferStream]) -> None:
    triton, stream = scripted
    answers = [stream.submit(_request("hold", bytes([i]))) for i in range(3)]
    assert stream.unanswered == 3
    triton.release.set()
    got = await asyncio.gather(*answers)
    assert [a.raw_output_contents[0] for a in got] == [b"\x00", b"\x01", b"\x02"]
    assert stream.unanswered == 0 and triton.streams == 1


async def test_a_refused_request_fails_alone_and_the_stream_goes_on(
    scripted: tuple[ScriptedTriton, InferStream],
) -> None:
    triton, stream = scripted
    refused = stream.submit(_request("refuse", b"r"))
    with pytest.raises(StreamedRequestFailed, match="unknown model"):
        await refused
    answer = await stream.submit(_request("echo", b"e"))
    assert answer.raw_output_contents[0] == b"e"
    assert triton.streams == 1


async def test_a_broken_stream_fails_what_it_held_and_the_next_request_opens_another(
    scripted: tuple[ScriptedTriton, InferStream],
) -> None:
    triton, stream = scripted
    held = [stream.submit(_request("hold", bytes([i]))) for i in range(2)]
    broken = stream.submit(_request("break", b"b"))
    for answer in [*held, broken]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await answer
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert stream.unanswered == 0
    answer = await stream.submit(_request("echo", b"again"))
    assert answer.raw_output_contents[0] == b"again"
    assert triton.streams == 2

    def writers() -> int:
        return sum(t.get_name() == "triton-infer-stream-write" and not t.done() for t in asyncio.all_tasks())

    await eventually(lambda: writers() == 1, "the broken stream's writer to end (only the new one left)")


async def test_close_lets_the_unanswered_requests_finish(scripted: tuple[ScriptedTriton, InferStream]) -> None:
    """Closing never cancels the stream under requests Triton is still working on."""
    triton, stream = scripted
    answers = [stream.submit(_request("hold", bytes([i]))) for i in range(3)]
    closing = asyncio.create_task(stream.close())
    for _ in range(20):  # let close run as far as it will before anything is answered
        await asyncio.sleep(0)
    triton.release.set()
    await closing
    assert [(await a).raw_output_contents[0] for a in answers] == [b"\x00", b"\x01", b"\x02"]
    with pytest.raises(RuntimeError, match="closing"):
        stream.submit(_request("echo", b"late"))


async def test_callers_cancelled_mid_call_never_cancel_the_stream(scripted: tuple[ScriptedTriton, InferStream]) -> None:
    """A job's tasks are cancelled with it, at any point of a request; the stream must outlive them."""
    triton, stream = scripted

    async def caller(payload: bytes) -> bytes:
        answer = stream.submit(_request("hold", payload))
        done, _ = await asyncio.wait([answer])  # as the executor waits: not on the answer itself
        return (await done.pop()).raw_output_contents[0]

    callers = [asyncio.create_task(caller(bytes([i]))) for i in range(3)]
    for _ in range(5):  # each caller as far as its submit and wait, the writer mid-way
        await asyncio.sleep(0)
    callers[0].cancel()
    triton.release.set()
    assert await asyncio.gather(*callers[1:]) == [b"\x01", b"\x02"]
    await stream.close()
    assert triton.cancelled == 0 and triton.received == 3
