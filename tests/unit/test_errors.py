"""``rpc_method``: domain errors become rich gRPC statuses, never a leak of internals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError  # what gRPC raises when a gone caller is sent a status

from inferline.core.errors import InvalidInput, QuotaExceeded, Shed, rpc_method


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self.code, self.details, self.trailing = code, details, trailing


class FakeContext:
    def __init__(self, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._trailing = trailing

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        raise Aborted(code, details, trailing)


class GoneCallerContext(FakeContext):
    """A call whose client went away: sending anything fails inside gRPC, as it does for real."""

    def cancelled(self) -> bool:
        return True

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        raise ExecuteBatchError("Failed 'execute_batch': (<grpc.StatusCode...>)")


class Servicer:
    def __init__(self, error: Exception) -> None:
        self.error = error

    @rpc_method
    async def Call(self, request: Any, context: Any) -> Any:
        raise self.error


async def call(error: Exception, trailing: tuple[tuple[str, str], ...] = ()) -> Aborted:
    with pytest.raises(Aborted) as aborted:
        await Servicer(error).Call(None, FakeContext(trailing))
    return aborted.value


def status_of(aborted: Aborted) -> status_pb2.Status:
    details = dict(aborted.trailing)["grpc-status-details-bin"]
    return status_pb2.Status.FromString(details)


async def test_shed_carries_reason_retry_info_and_pushback() -> None:
    aborted = await call(Shed("route 'r' is overloaded for traffic class 'batch'", 0.025))
    assert aborted.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(aborted.trailing)["grpc-retry-pushback-ms"] == "25"
    status = status_of(aborted)
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    status.details[0].Unpack(info)
    status.details[1].Unpack(retry)
    assert info.reason == "SHED" and info.metadata["retry_after_ms"] == "25"
    assert retry.retry_delay.ToMilliseconds() == 25


async def test_trailing_metadata_set_by_the_handler_goes_out_with_the_status() -> None:
    # The gateway's overload signal is set before the handler fails; the abort must not drop it.
    aborted = await call(Shed("overloaded", 0.01), trailing=(("x-inferline-overloaded", "batch"),))
    trailing = dict(aborted.trailing)
    assert trailing["x-inferline-overloaded"] == "batch"
    assert trailing["grpc-retry-pushback-ms"] == "10"
    assert "grpc-status-details-bin" in trailing


async def test_quota_exceeded_is_a_shed_with_its_own_reason() -> None:
    aborted = await call(QuotaExceeded("tenant 't' is over its request quota", 0.5))
    assert aborted.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(aborted.trailing)["grpc-retry-pushback-ms"] == "500"
    info = error_details_pb2.ErrorInfo()
    status_of(aborted).details[0].Unpack(info)
    assert info.reason == "QUOTA_EXCEEDED"


async def test_other_errors_are_built_each_time_with_their_own_details() -> None:
    aborted = await call(InvalidInput("entities", "at least one entity is required"))
    assert aborted.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc-retry-pushback-ms" not in dict(aborted.trailing)
    assert aborted.details == "entities: at least one entity is required"


async def test_unexpected_errors_are_internal_with_a_request_id_only() -> None:
    aborted = await call(RuntimeError("secret internals"))
    assert aborted.code is grpc.StatusCode.INTERNAL
    assert "secret" not in aborted.details and "request_id=" in aborted.details


@pytest.mark.parametrize("error", [Shed("overloaded", 0.05), RuntimeError("stream gone")])
async def test_a_caller_that_went_away_is_a_debug_line_not_a_traceback(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    # Ended as cancelled, which gRPC logs at DEBUG (a new AbortError would make it log an ERROR).
    with caplog.at_level(logging.DEBUG, logger="inferline.core.errors"), pytest.raises(asyncio.CancelledError):
        await Servicer(error).Call(None, GoneCallerContext())
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert not any(r.exc_info for r in caplog.records)
