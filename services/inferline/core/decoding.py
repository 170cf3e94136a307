"""``SafeDecoding``: an undecodable request body is the caller's error (INVALID_ARGUMENT), not ours.

gRPC decodes a request before any handler runs; when the bytes are not a valid message
it answers UNKNOWN "Unexpected DecodeError…" and logs an ERROR with a full traceback, once
per call, so anyone could flood the log with garbage bytes. This interceptor wraps each
unary method's deserializer: a body that fails to decode reaches a tiny handler that
answers INVALID_ARGUMENT naming the expected message, and the event is logged at most
once per ``LOG_EVERY_S`` with a count of those not logged.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class _Undecodable:
    """Stands in for a request whose bytes did not decode."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


class RateLimitedWarning:
    """A warning logged at most once per ``every_s``, saying how many were left out since.

    Hand-written: the stdlib has no rate limiting for log records, and a filter on the
    logger would have to key on the message text.
    """

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._next_at = float("-inf")
        self._suppressed = 0

    def warn(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless one was logged within ``every_s``; returns whether it was."""
        now = self._clock()
        if now < self._next_at:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more since the last report)"
            args = (*args, self._suppressed)
        logger.warning(message, *args)
        self._suppressed = 0
        self._next_at = now + self._every_s
        return True


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = grpc.aio.ServerInterceptor


class SafeDecoding(_Interceptor):
    """Answers INVALID_ARGUMENT to unary calls whose request bytes do not decode."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}
        self._warning = RateLimitedWarning(every_s)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:  # a method's handler is made once: wrap it once
            cached = (handler, self._wrap(handler_call_details.method, handler))
            self._wrapped[id(handler)] = cached
        return cached[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        decode = handler.request_deserializer
        behaviour: Any = handler.unary_unary  # an aio handler: takes the aio context
        assert decode is not None and behaviour is not None
        message = f"the request body is not a valid message for {method[:200]}"

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:  # protobuf raises DecodeError, and others on some malformed input
                return _UNDECODABLE

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is _UNDECODABLE:
                self._warning.warn("refused undecodable request bodies on %s", method[:200])
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=safe_decode, response_serializer=handler.response_serializer
        )
