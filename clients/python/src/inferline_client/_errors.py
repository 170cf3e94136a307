"""Errors a call to inferline raises, decoded at one place from the gRPC status.

::

    InferlineError                 any failed call; .code, .reason (ErrorReason), .metadata
    ├── InvalidArgumentError       INVALID_ARGUMENT: the request is wrong (.field names what)
    ├── AuthenticationError        UNAUTHENTICATED: no or a bad API key
    ├── PermissionDeniedError      PERMISSION_DENIED: the tenant may not use the route or class
    ├── NotFoundError              NOT_FOUND: no such route (or model)
    ├── OverloadedError            RESOURCE_EXHAUSTED: shed or over quota; retry after .retry_after_s
    ├── DeadlineExceededError      DEADLINE_EXCEEDED: the deadline ran out (or was too short on arrival)
    └── UnavailableError           UNAVAILABLE: the service could not be reached or answer

The class follows the gRPC status code, which every inferline answer (and a gateway's or
gRPC's own) has; ``reason`` follows the server's ``google.rpc.ErrorInfo`` when there is
one, and is ``ERROR_REASON_UNSPECIFIED`` otherwise (e.g. a connection refused).
"""

from __future__ import annotations

from typing import Protocol

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inferline.v1 import errors_pb2

DOMAIN = "inferline.v1"
_PREFIX = "ERROR_REASON_"
_PUSHBACK_HEADER = "grpc-retry-pushback-ms"


class InferlineError(Exception):
    """A failed call. ``reason`` is an ``ErrorReason`` value; ``reason_name`` is the wire string."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason_name: str = "",
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
        field: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason_name})" if reason_name else ""))
        self.message = message
        self.code = code
        self.reason_name = reason_name
        # An unknown reason (a newer server) keeps its name but maps to UNSPECIFIED.
        self.reason: int = errors_pb2.ErrorReason.DESCRIPTOR.values_by_name.get(
            _PREFIX + reason_name, errors_pb2.ErrorReason.DESCRIPTOR.values_by_number[0]
        ).number
        self.metadata = metadata or {}
        self.retry_after_s = retry_after_s
        self.field = field


class InvalidArgumentError(InferlineError):
    """The request is malformed; ``field`` names the field when the server said which."""


class AuthenticationError(InferlineError):
    """The call carried no API key, or one the server does not know."""


class PermissionDeniedError(InferlineError):
    """The tenant may not use this route or traffic class."""


class NotFoundError(InferlineError):
    """No such route (or model)."""


class OverloadedError(InferlineError):
    """Shed under overload, or the tenant's quota is spent: retry after ``retry_after_s``."""


class DeadlineExceededError(InferlineError):
    """The deadline ran out before an answer (or was too short to afford one on arrival)."""


class UnavailableError(InferlineError):
    """The service could not be reached or could not answer; safe to retry with backoff."""


_BY_CODE: dict[grpc.StatusCode, type[InferlineError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


class _FailedCall(Protocol):
    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> object: ...


def decode_error(call: _FailedCall) -> InferlineError:
    """The typed error for a failed call (a ``grpc.RpcError`` or ``grpc.aio.AioRpcError``).

    Reads the ``google.rpc.Status`` the server sent in the trailers: ``ErrorInfo`` of the
    ``inferline.v1`` domain (reason, metadata), ``RetryInfo`` (the retry delay) and
    ``BadRequest`` (the bad field). gRPC's own ``grpc-retry-pushback-ms`` trailer stands
    in for a missing ``RetryInfo`` (as a gateway may send).
    """
    code = call.code()
    message = call.details() or ""
    reason_name, metadata, retry_after_s, field = "", {}, None, ""
    try:
        status = rpc_status.from_call(call)  # type: ignore[arg-type]
    except ValueError:  # a status whose code or message disagrees with the call's: ignore it
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason_name, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else ""
    if retry_after_s is None:
        retry_after_s = _pushback_s(call.trailing_metadata())
    cls = _BY_CODE.get(code, InferlineError)
    return cls(message, code=code, reason_name=reason_name, metadata=metadata, retry_after_s=retry_after_s, field=field)


def _pushback_s(trailing: object) -> float | None:
    for key, value in trailing or ():  # type: ignore[attr-defined]
        if key == _PUSHBACK_HEADER:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None
