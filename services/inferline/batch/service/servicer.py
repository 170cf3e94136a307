"""The ``inferline.v1.BatchJobs`` gRPC service: submit, get, list and cancel batch jobs.

Callers authenticate as for ``Predict``, through the same ``RequestGate`` (API key or
JWT → tenant; UNAUTHENTICATED), and submit only on routes (unknown: NOT_FOUND; not the
tenant's: PERMISSION_DENIED) and traffic classes the tenant may use. Every job belongs to
the tenant that submitted it: another tenant's job id is NOT_FOUND, never PERMISSION_DENIED
(which would say it exists). A submit is checked whole before it is queued
(``request.py``); the jobs run in ``JobRunner``; their state is in ``JobStore``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from inferline.batch.service.manager import JobRunner
from inferline.batch.service.request import check_files, check_options, check_request_id
from inferline.batch.service.store import JobRecord, JobState, JobStore, NewJob, OutputInUse, RequestReused, TooManyJobs
from inferline.core.config import InferlineConfig
from inferline.core.errors import InferlineError, InvalidInput, Shed, echo, rpc_method
from inferline.router.gate import RequestGate, TenantRules
from inferline.v1 import batch_jobs_pb2 as pb
from inferline.v1 import batch_jobs_pb2_grpc as pb_grpc

SERVICE_NAME = "inferline.v1.BatchJobs"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_JOB_ID_CHARS = 64
CANCEL_WAIT_S = 2.0
"""Longest a Cancel waits for its job to stop (it stops within a second) before answering."""
FILE_CHECKS = 4
"""Submits whose files are checked at once (a CSV is scanned whole); more are refused (SHED), not
queued: waiting submits would hold call slots the server shares with Predict."""
CHECKS_BUSY_RETRY_S = 1.0
_STATES = {s: pb.BatchJobState.Value(f"BATCH_JOB_STATE_{s.value}") for s in JobState}
_BY_STATE = {v: s for s, v in _STATES.items()}


class BatchJobNotFound(InferlineError):
    """No job of the caller's tenant has this id (another tenant's job included)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "BATCH_JOB_NOT_FOUND"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no batch job {echo(job_id)}", job_id=job_id)


class BatchJobLimit(InferlineError):
    """The tenant has ``batch_jobs.max_jobs_per_tenant`` jobs queued or running."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BATCH_JOB_LIMIT"


class BatchJobsServicer(pb_grpc.BatchJobsServicer):
    def __init__(self, config: InferlineConfig, gate: RequestGate, store: JobStore, runner: JobRunner) -> None:
        self._config = config
        self._gate = gate
        self._store = store
        self._runner = runner
        self._file_checks = asyncio.Semaphore(FILE_CHECKS)

    def _tenant(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, TenantRules]:
        return self._gate.authenticate(context.invocation_metadata())  # type: ignore[arg-type]

    @rpc_method
    async def SubmitBatchJob(
        self, request: pb.SubmitBatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SubmitBatchJobResponse:
        tenant, rules = self._tenant(context)
        request_id = check_request_id(request.request_id)
        if not request.HasField("spec"):
            raise InvalidInput("spec", "required")
        options = check_options(self._gate, self._config, tenant, rules, request.spec)
        api_spec = json_format.MessageToDict(request.spec, preserving_proto_field_name=True)
        if request_id is not None:
            earlier = await asyncio.to_thread(self._store.by_request, tenant, request_id)
            if earlier is not None:
                return pb.SubmitBatchJobResponse(job=self._same_request(earlier, api_spec))
        limit = self._config.batch_jobs.max_jobs_per_tenant
        if await asyncio.to_thread(self._store.active_jobs, tenant) >= limit:
            raise self._limit(tenant, limit)
        if self._file_checks.locked():
            raise Shed(f"{FILE_CHECKS} submitted jobs are being checked now: submit again shortly", CHECKS_BUSY_RETRY_S)
        async with self._file_checks:
            checked = await asyncio.to_thread(check_files, self._config, tenant, request.spec, options)
        new = NewJob(
            job_id=uuid.uuid4().hex,
            tenant=tenant,
            request_id=request_id,
            api_spec=checked.api_spec,
            job_spec=checked.spec.model_dump(mode="json"),
            output_key=checked.output_key,
            errors_file=checked.errors_file,
        )
        try:
            record, created = await asyncio.to_thread(self._store.insert, new, limit)
        except TooManyJobs:
            raise self._limit(tenant, limit) from None
        except OutputInUse as err:
            raise InvalidInput(
                "spec.output", f"{echo(request.spec.output)} is the output of job {err.job_id}, queued or running"
            ) from None
        except RequestReused as err:
            raise InvalidInput("request_id", f"created job {err.job_id} with another spec") from None
        if created:
            self._runner.wake()
        return pb.SubmitBatchJobResponse(job=job_message(record))

    @staticmethod
    def _same_request(earlier: JobRecord, api_spec: dict[str, Any]) -> pb.BatchJob:
        if earlier.api_spec != api_spec:
            raise InvalidInput("request_id", f"created job {earlier.job_id} with another spec")
        return job_message(earlier)

    @staticmethod
    def _limit(tenant: str, limit: int) -> BatchJobLimit:
        return BatchJobLimit(f"tenant {tenant!r} has {limit} batch jobs queued or running; submit when one has ended")

    @rpc_method
    async def GetBatchJob(
        self, request: pb.GetBatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetBatchJobResponse:
        tenant, _ = self._tenant(context)
        return pb.GetBatchJobResponse(job=job_message(await self._job(tenant, request.job_id)))

    async def _job(self, tenant: str, job_id: str) -> JobRecord:
        record = None
        if job_id and len(job_id) <= MAX_JOB_ID_CHARS:
            record = await asyncio.to_thread(self._store.get, tenant, job_id)
        if record is None:
            raise BatchJobNotFound(job_id)
        return record

    @rpc_method
    async def ListBatchJobs(
        self, request: pb.ListBatchJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListBatchJobsResponse:
        tenant, _ = self._tenant(context)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = _page_position(request.page_token)
        states = _states(request.states)
        records, more = await asyncio.to_thread(self._store.page, tenant, states, before, size)
        token = _page_token(records[-1].seq) if more and records else ""
        return pb.ListBatchJobsResponse(jobs=[job_message(r) for r in records], next_page_token=token)

    @rpc_method
    async def CancelBatchJob(
        self, request: pb.CancelBatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelBatchJobResponse:
        tenant, _ = self._tenant(context)
        job_id = request.job_id
        record = await self._job(tenant, job_id)  # NOT_FOUND before any change
        flagged = await asyncio.to_thread(self._store.request_cancel, tenant, job_id)
        record = flagged if flagged is not None else record
        if record.state.active:
            self._runner.cancel(job_id)  # at once when it runs here; otherwise its owner sees the flag
            remaining = context.time_remaining()
            deadline = time.monotonic() + min(CANCEL_WAIT_S, remaining if remaining is not None else CANCEL_WAIT_S)
            while record.state.active and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                record = await self._job(tenant, job_id)
        return pb.CancelBatchJobResponse(job=job_message(record))


def job_message(record: JobRecord) -> pb.BatchJob:
    job = pb.BatchJob(
        job_id=record.job_id,
        spec=json_format.ParseDict(record.api_spec, pb.BatchJobSpec()),
        state=_STATES[record.state],
        rows_total=record.rows_total,
        rows_done=record.rows_done,
        rows_scored=record.rows_scored,
        row_errors=record.row_errors,
        error=record.error,
        errors_file=record.errors_file,
        runs=record.runs,
        create_time=_timestamp(record.created_at),
        update_time=_timestamp(record.updated_at),
    )
    if record.started_at is not None:
        job.start_time.CopyFrom(_timestamp(record.started_at))
    if record.ended_at is not None:
        job.end_time.CopyFrom(_timestamp(record.ended_at))
    return job


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode()


def _page_position(token: str) -> int | None:
    """The sequence number a page token continues below; INVALID_ARGUMENT for a token not of ours."""
    if not token:
        return None
    try:
        version, _, seq = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii").partition(":")
        if version == "v1" and seq.isdigit() and len(seq) <= 19:
            return int(seq)
    except (ValueError, binascii.Error, UnicodeError):
        pass
    raise InvalidInput("page_token", "not a token this service gave (pass next_page_token as it came)")


def _states(values: Sequence[int]) -> set[JobState]:
    states = set()
    for value in values:
        state = _BY_STATE.get(value)  # type: ignore[call-overload]
        if state is None:
            raise InvalidInput("states", f"unknown job state {value}")
        states.add(state)
    return states
