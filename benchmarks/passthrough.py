"""The thinnest Python gRPC hop in front of Triton: the floor a Python router is measured against.

A grpc.aio server (uvloop) implementing KServe v2's ``GRPCInferenceService`` with only
``ModelInfer`` (the request object is forwarded as-is to Triton on one channel and
Triton's response returned), plus ``ServerLive`` and ``ServerReady`` forwarding for
readiness checks. No deadline handling, no validation, no metrics.

    .venv/bin/python benchmarks/passthrough.py --listen 127.0.0.1:8101 --triton 127.0.0.1:8001

The forwarded call carries no gRPC deadline of its own; Triton's queue ``timeout``
parameter travels inside the request. A client that cancels its call cancels the
forwarded one too (as any naive hop would), so benchmark clients keep their deadline
past Triton's timeout (see inferline.bench.targets).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

import grpc
import uvloop
from tritonclient.grpc import service_pb2_grpc

log = logging.getLogger("passthrough")

_OPTIONS = (
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
)


class Passthrough(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Forwards ModelInfer, ServerLive and ServerReady to one Triton endpoint."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._infer = stub.ModelInfer
        self._live = stub.ServerLive
        self._ready = stub.ServerReady

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self._infer(request)
        except grpc.aio.AioRpcError as err:  # pass Triton's status through (else the caller sees UNKNOWN)
            await context.abort(err.code(), err.details() or "")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._live(request, timeout=context.time_remaining())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._ready(request, timeout=context.time_remaining())


async def serve(listen: str, triton: str) -> None:
    channel = grpc.aio.insecure_channel(triton, options=_OPTIONS)
    server = grpc.aio.server(options=_OPTIONS)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Passthrough(channel), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    log.info("passthrough listening on %s, forwarding to %s", listen, triton)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await channel.close(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to serve on")
    parser.add_argument("--triton", required=True, help="host:port of Triton's gRPC endpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvloop.run(serve(args.listen, args.triton))


if __name__ == "__main__":
    main()
