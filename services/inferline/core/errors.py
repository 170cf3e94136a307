"""Domain errors and the one place where they become gRPC statuses (``rpc_method``).

Each ``InferlineError`` subclass carries its gRPC code and an UPPER_SNAKE reason. The
``rpc_method`` decorator turns them into a ``google.rpc.Status`` whose first detail is
an ``ErrorInfo(reason, domain="inferline.v1")``. Anything unexpected becomes INTERNAL
with only a request id for the caller; the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

DOMAIN = "inferline.v1"
MAX_MESSAGE_CHARS = 1000
"""Longest message a caller gets. Messages echo what the caller sent (a route, a model, a
field): echoed unbounded, a 10 KB route name makes 20 KB of trailers, past the 16 KB metadata
limit of gRPC clients, and the caller gets "Stream removed" instead of NOT_FOUND."""
MAX_ECHO_CHARS = 64
"""Longest piece of caller input echoed in a message or an ErrorInfo metadata value."""
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|dns):[^\s,;'\"]*[^\s,;'\":]|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?"
)


def echo(value: object) -> str:
    """``repr`` of caller input for a message, cut to ``MAX_ECHO_CHARS`` (the cut is marked)."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 4] + "...'"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact_addresses(text: str) -> str:
    """``text`` with network addresses (``ipv4:127.0.0.1:8001``, ``10.0.0.7:8001``, ``unix:/…``) replaced:
    a dependency's message may name where it runs, which must never reach a caller."""
    return _ADDRESS.sub("<address>", text)


class InferlineError(Exception):
    """Base of every error inferline reports to a caller."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        message = _clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.metadata = {key: _clip(value, MAX_ECHO_CHARS) for key, value in metadata.items()}

    def details(self) -> list[Any]:
        """Extra google.rpc detail messages after the ErrorInfo."""
        return []


class InvalidInput(InferlineError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_INPUT"

    def __init__(self, field: str, message: str) -> None:
        field = _clip(field, MAX_ECHO_CHARS)
        super().__init__(f"{field}: {message}", field=field)
        self.field = field

    def details(self) -> list[Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class Unauthenticated(InferlineError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(InferlineError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class RouteNotFound(InferlineError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "ROUTE_NOT_FOUND"

    def __init__(self, route: str) -> None:
        super().__init__(f"unknown route {echo(route)}", route=route)


class ModelNotFound(InferlineError):
    """A model (KServe v2 front door) that no route serves, or a version the model server lacks."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"unknown model {echo(model)}", model=model)


class Shed(InferlineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "SHED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_ms=str(max(1, round(retry_after_s * 1000))))
        self.retry_after_s = retry_after_s

    def details(self) -> list[Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_s * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class QuotaExceeded(Shed):
    """The tenant sent more than its quota (token bucket); retry after the hint."""

    reason = "QUOTA_EXCEEDED"


class DeadlineUnaffordable(InferlineError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_UNAFFORDABLE"


class DeadlineExceeded(InferlineError):
    """The request's deadline ran out before an answer, and there is no degraded answer to give."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class DependencyUnavailable(InferlineError):
    """A dependency (Triton, feature store, a remote service) failed; triggers degradation."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"


class ModelOutputInvalid(InferlineError):
    """Model output not finite, out of range, or of the wrong shape; a model failure."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INVALID_OUTPUT"


_BY_REASON: dict[str, type[InferlineError]] = {
    cls.reason: cls
    for cls in (
        InvalidInput,
        Unauthenticated,
        PermissionDenied,
        RouteNotFound,
        ModelNotFound,
        Shed,
        QuotaExceeded,
        DeadlineUnaffordable,
        DeadlineExceeded,
        DependencyUnavailable,
        ModelOutputInvalid,
    )
}


def to_status(err: InferlineError) -> status_pb2.Status:
    """Build the rich status: ErrorInfo first, then the error's own details."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    packed = []
    for detail in [info, *err.details()]:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=packed)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> InferlineError:
    """Rebuild the domain error a remote inferline service raised (client side, one place)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    message = exc.details() or ""
    reason = ""
    metadata: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
                break
    cls = _BY_REASON.get(reason)
    if cls is InvalidInput:
        field = metadata.get("field", "")
        return InvalidInput(field, message.removeprefix(f"{field}: "))
    if cls is RouteNotFound:
        return RouteNotFound(metadata.get("route", ""))
    if cls is ModelNotFound:
        return ModelNotFound(metadata.get("model", ""), message)
    if cls is Shed or cls is QuotaExceeded:
        return cls(message, int(metadata.get("retry_after_ms", "0")) / 1000)
    if cls is not None:
        return cls(message, **metadata)
    return DependencyUnavailable(f"remote call failed with {exc.code().name}: {message}")


_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
Handler = Callable[[_Servicer, _Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Response]]


def rpc_method(func: Handler[_Servicer, _Request, _Response]) -> Handler[_Servicer, _Request, _Response]:
    """Map exceptions raised by a servicer method onto gRPC statuses (the one place).

    A caller that went away (its deadline passed, it cancelled) cannot be told anything:
    sending the status then fails inside gRPC (``ExecuteBatchError``). That is the caller's
    business, not a fault of ours, so it is one DEBUG line, never a traceback per call.
    """

    @functools.wraps(func)
    async def wrapper(self: _Servicer, request: _Request, context: grpc.aio.ServicerContext[Any, Any]) -> _Response:
        try:
            return await func(self, request, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted the call itself
        except InferlineError as err:
            status = rpc_status.to_status(to_status(err))
            # What the handler set (e.g. the gateway's overload signal) goes out with the status.
            trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
            if isinstance(err, Shed):
                # gRPC's own retry policy honours this pushback (gRFC A6); clients read it too.
                trailing = (*trailing, ("grpc-retry-pushback-ms", str(max(1, int(err.retry_after_s * 1000)))))
            await _abort(context, status.code, status.details, trailing)
        except Exception as exc:
            if _caller_gone(context):
                logger.debug("%s: the caller went away (%s)", func.__qualname__, type(exc).__name__)
                raise asyncio.CancelledError() from None
            request_id = uuid.uuid4().hex[:12]
            logger.exception("unhandled error in %s (request_id=%s)", func.__qualname__, request_id)
            status = rpc_status.to_status(
                status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (request_id={request_id})")
            )
            await _abort(context, status.code, status.details, status.trailing_metadata)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _caller_gone(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    return bool(context.cancelled() or context.done())


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str, trailing: Any
) -> None:
    """``context.abort``; when the status cannot be sent because the caller went away, a DEBUG line.

    The call is then ended as cancelled (``CancelledError``, which gRPC logs at DEBUG): a
    new ``AbortError`` would not do, as gRPC checks that it is the one ``context.abort``
    raised and logs an ERROR with a traceback otherwise.
    """
    try:
        await context.abort(code, details, trailing)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # grpc's ExecuteBatchError: the stream is gone
        if not _caller_gone(context):
            raise
        logger.debug("could not send %s to a caller that went away (%s)", code.name, type(exc).__name__)
        raise asyncio.CancelledError() from None
