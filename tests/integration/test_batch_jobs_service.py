"""The BatchJobs gRPC service on a real router process (``inferline up --no-gateway``), with the
real bundled Triton and the materialised Feast demo repo.

A job submitted through the service writes what ``inferline batch run`` writes for the same
input (``run_batch``, the command's entry point, is the oracle); tenants see and cancel only
their own jobs; a cancel stops a job within a second and leaves it resumable; a router
stopped (SIGTERM) or killed (SIGKILL) while a job runs resumes it when it starts again (the
job runs in a child process of its own, below the router's CPU priority, which ends with the
router); bad
requests get INVALID_ARGUMENT naming the field, and no message names a server path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import pathlib
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inferline.batch import BatchJobSpec, run_batch
from inferline.batch.output import OutputDir
from inferline.batch.spec import Shard
from inferline.core.config import load_config
from inferline.core.processes import may_raise_priority
from inferline.triton.launcher import TritonLauncher
from inferline.v1 import batch_jobs_pb2 as pb
from inferline.v1 import batch_jobs_pb2_grpc as pb_grpc
from tests.integration.gateway_fixtures import start_gateway
from tests.integration.router_fixtures import DEMO_KEY, LIMITED_KEY, ServerProcess, start_router, write_test_config
from tests.integration.test_batch_run import feast_source, read_output
from tests.postgres_fixtures import fresh_schema, postgres_url
from tests.waiting import wait_until

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]
__all__ = ["postgres_url"]  # the session fixture (a PostgreSQL cluster of the tests' own)

ROUTE = "driver_ranking"
OTHER_KEY = "other-tenant-key"
STANDARD_ONLY_KEY = "standard-only-key"
ROWS, CHUNK_ROWS = 3000, 100
BAD_ROWS = [7, 1500]
SLOW_ROWS_PER_S = 600.0
"""The rate of jobs a test stops part-way: 30 chunks over ~5 s, so the stop lands mid-job."""
LEASE_S = 2.0
COMPARED = ["input_row", "driver_id", "score", "decision", "model", "model_version", "defaulted_features"]


JOB_NICE = 19
"""``batch_jobs.process_nice``'s default."""


def job_processes(router_pid: int) -> list[int]:
    """The pids of the router's batch job processes (``inferline.batch.service.job_process``)."""
    found = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == router_pid and b"inferline.batch.service.job_process" in cmdline:
            found.append(int(proc.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has ended)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


DEMO, OTHER = auth(DEMO_KEY), auth(OTHER_KEY)


@dataclass
class Service:
    """The router process serving BatchJobs, restartable on the same config and state."""

    config: pathlib.Path
    roots: tuple[pathlib.Path, pathlib.Path]
    triton: TritonLauncher
    log_dir: pathlib.Path
    process: ServerProcess | None = None
    channel: grpc.Channel | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log_dir = self.log_dir / f"run-{self.starts}"
        log_dir.mkdir()
        self.process = start_router(self.triton, self.config, log_dir)
        self.channel = grpc.insecure_channel(self.process.address)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.process is not None and self.channel is not None
        self.channel.close()
        if sig == signal.SIGKILL:
            assert self.process.server.proc is not None
            self.process.server.proc.kill()
            assert self.process.stop() == -signal.SIGKILL
        else:
            code = self.process.stop()
            assert code == 0, f"router exited with {code}:\n{self.process.log_tail()}"
        self.process = self.channel = None

    @property
    def stub(self) -> pb_grpc.BatchJobsStub:
        assert self.channel is not None
        return pb_grpc.BatchJobsStub(self.channel)

    @property
    def log_path(self) -> pathlib.Path | None:
        return None if self.process is None else self.process.log_path

    def input_dir(self, tenant: str = "demo") -> pathlib.Path:
        return self.roots[0] / tenant

    def output_dir(self, tenant: str = "demo") -> pathlib.Path:
        return self.roots[1] / tenant


def write_config(tmp: pathlib.Path, roots: tuple[pathlib.Path, pathlib.Path]) -> pathlib.Path:
    config = write_test_config(tmp / "inferline.yaml", budgets={"features_ms": 1000, "model_ms": 1000})
    raw = yaml.safe_load(config.read_text())
    raw["batch_jobs"] = {
        "input_root": str(roots[0]),
        "output_root": str(roots[1]),
        "state_path": str(tmp / "state" / "jobs.sqlite"),
        "max_running": 2,
        "max_jobs_per_tenant": 3,
        "lease_s": LEASE_S,
    }
    demo = raw["tenants"]["demo"]
    raw["tenants"]["other"] = {**demo, "api_key_sha256": [hashlib.sha256(OTHER_KEY.encode()).hexdigest()]}
    raw["tenants"]["standard_only"] = {
        **demo,
        "api_key_sha256": [hashlib.sha256(STANDARD_ONLY_KEY.encode()).hexdigest()],
        "traffic_classes": ["standard"],
        "default_traffic_class": "standard",
    }
    config.write_text(yaml.safe_dump(raw))
    return config


def write_input(path: pathlib.Path) -> pathlib.Path:
    """``ROWS`` drivers (null keys at ``BAD_ROWS``) with a request-time feature."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [None if i in BAD_ROWS else 1001 + (i * 37) % 1000 for i in range(ROWS)]
    table = pa.table(
        {"driver_id": pa.array(ids, pa.int64()), "trip_distance_km": pa.array(np.linspace(0.5, 25.0, ROWS))}
    )
    pq.write_table(table, path, row_group_size=256)
    return path


@pytest.fixture(scope="module")
def service(triton_server: TritonLauncher, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("batch-jobs")
    roots = (tmp / "in", tmp / "out")
    config = write_config(tmp, roots)
    feast_source(load_config(config))
    write_input(roots[0] / "demo" / "drivers.parquet")
    write_input(roots[0] / "other" / "drivers.parquet")
    service = Service(config, roots, triton_server, tmp / "logs")
    service.log_dir.mkdir()
    service.start()
    try:
        yield service
    finally:
        if service.process is not None:
            service.stop()


@pytest.fixture(scope="module")
def oracle(service: Service, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, str]:
    """What ``inferline batch run`` writes for the demo input: (the output, the errors file)."""
    out = tmp_path_factory.mktemp("oracle") / "out"
    spec = BatchJobSpec.build(
        route=ROUTE, input_path=service.input_dir() / "drivers.parquet", output_dir=out, chunk_rows=CHUNK_ROWS
    )
    asyncio.run(run_batch(load_config(service.config), spec, service.triton.grpc_url))
    return read_output(out), (out / "_errors.csv").read_text()


def job_spec(output: str, **options: object) -> pb.BatchJobSpec:
    return pb.BatchJobSpec(
        **{"route": ROUTE, "input": "drivers.parquet", "output": output, "chunk_rows": CHUNK_ROWS, **options}
    )


def submit(service: Service, spec: pb.BatchJobSpec, metadata: Sequence[tuple[str, str]] = DEMO) -> pb.BatchJob:
    return service.stub.SubmitBatchJob(pb.SubmitBatchJobRequest(spec=spec), metadata=metadata, timeout=30).job


def get(service: Service, job_id: str, metadata: Sequence[tuple[str, str]] = DEMO) -> pb.BatchJob:
    return service.stub.GetBatchJob(pb.GetBatchJobRequest(job_id=job_id), metadata=metadata, timeout=10).job


def wait_for_state(service: Service, job_id: str, *states: int, within_s: float = 120) -> pb.BatchJob:
    seen: list[pb.BatchJob] = []

    def reached() -> bool:
        seen.append(get(service, job_id))
        return seen[-1].state in states

    wait_until(reached, f"job {job_id} in {states} (last: {seen[-1] if seen else None})", within_s, 0.05)
    return seen[-1]


def wait_for_rows(service: Service, job_id: str, rows: int) -> pb.BatchJob:
    seen: list[pb.BatchJob] = []

    def reached() -> bool:
        seen.append(get(service, job_id))
        assert seen[-1].state in (pb.BATCH_JOB_STATE_QUEUED, pb.BATCH_JOB_STATE_RUNNING), seen[-1]
        return seen[-1].rows_done >= rows

    wait_until(reached, f"job {job_id} past {rows} rows", 120, 0.02)
    return seen[-1]


def assert_oracle_output(out: pathlib.Path, oracle: tuple[pd.DataFrame, str]) -> None:
    want, want_errors = oracle
    got = read_output(out)
    assert not got["input_row"].duplicated().any()
    assert sorted([*got["input_row"], *BAD_ROWS]) == list(range(ROWS))
    pd.testing.assert_frame_equal(got[COMPARED], want[COMPARED])
    assert (out / "_errors.csv").read_text() == want_errors


def parts(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet"))


def refusal(call: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """(code, ErrorInfo reason, its metadata, message) of a failed call."""
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    assert status is not None, call
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    return call.code(), info.reason, dict(info.metadata), call.details()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def first_job(service: Service) -> tuple[pb.BatchJob, pb.BatchJob]:
    """A job run to its end through the service, into ``first``: (as submitted, as ended)."""
    submitted = submit(service, job_spec("first"))
    return submitted, wait_for_state(service, submitted.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)


def test_a_submitted_job_writes_what_batch_run_writes(
    service: Service, oracle: tuple[pd.DataFrame, str], first_job: tuple[pb.BatchJob, pb.BatchJob]
) -> None:
    submitted, job = first_job
    assert submitted.state in (pb.BATCH_JOB_STATE_QUEUED, pb.BATCH_JOB_STATE_RUNNING)
    assert submitted.spec == job_spec("first")
    assert submitted.create_time.seconds > 0
    assert job.state == pb.BATCH_JOB_STATE_SUCCEEDED, job.error
    assert (job.rows_total, job.rows_done, job.rows_scored, job.row_errors) == (
        ROWS,
        ROWS,
        ROWS - len(BAD_ROWS),
        len(BAD_ROWS),
    )
    assert (job.runs, job.error, job.errors_file) == (1, "", "first/_errors.csv")
    created, started, ended = (t.ToNanoseconds() for t in (job.create_time, job.start_time, job.end_time))
    assert 0 < created <= started <= ended <= job.update_time.ToNanoseconds()
    assert_oracle_output(service.output_dir() / "first", oracle)


@pytest.mark.parametrize(
    ("view_scan", "scans"),
    [(pb.BATCH_VIEW_SCAN_ALWAYS, 1), (pb.BATCH_VIEW_SCAN_NEVER, 0)],
    ids=["always", "never"],
)
def test_a_job_reads_the_store_whole_as_its_spec_says(
    service: Service, oracle: tuple[pd.DataFrame, str], view_scan: int, scans: int
) -> None:
    output = f"view-scan-{pb.BatchViewScan.Name(view_scan).lower()}"
    submitted = submit(service, job_spec(output, view_scan=view_scan))
    assert submitted.spec.view_scan == view_scan
    job = wait_for_state(service, submitted.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)
    assert job.state == pb.BATCH_JOB_STATE_SUCCEEDED, job.error
    assert_oracle_output(service.output_dir() / output, oracle)  # the same scores either way
    summary = json.loads(OutputDir(service.output_dir() / output, Shard().label, False).summary_path.read_text())
    features = summary["this_run"]["features"]
    assert features["view_scans"] == scans
    assert (features["entities_scanned"] > 0) == bool(scans)
    assert (features["entities_read"] > 0) == (not scans)  # a scanned store leaves nothing to read


def test_tenants_see_and_cancel_only_their_own_jobs(service: Service) -> None:
    mine = submit(service, job_spec("mine", max_rows_per_s=SLOW_ROWS_PER_S))
    theirs = submit(service, job_spec("theirs", max_rows_per_s=SLOW_ROWS_PER_S), metadata=OTHER)
    try:
        for call in (
            lambda: get(service, mine.job_id, metadata=OTHER),
            lambda: service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=mine.job_id), metadata=OTHER),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            code, reason, metadata, _ = refusal(refused.value)
            assert (code, reason, metadata) == (
                grpc.StatusCode.NOT_FOUND,
                "BATCH_JOB_NOT_FOUND",
                {"job_id": mine.job_id},
            )
        assert get(service, mine.job_id).state != pb.BATCH_JOB_STATE_CANCELLED  # the other tenant's cancel did nothing

        listed = service.stub.ListBatchJobs(pb.ListBatchJobsRequest(), metadata=OTHER).jobs
        assert [j.job_id for j in listed] == [theirs.job_id]
        # The demo tenant's jobs, newest first, one per page.
        ids, token = [], ""
        while True:
            page = service.stub.ListBatchJobs(pb.ListBatchJobsRequest(page_size=1, page_token=token), metadata=DEMO)
            ids += [j.job_id for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        everything = service.stub.ListBatchJobs(pb.ListBatchJobsRequest(), metadata=DEMO).jobs
        assert ids == [j.job_id for j in everything]
        assert ids[0] == mine.job_id and theirs.job_id not in ids
        assert [j.seconds for j in (e.create_time for e in everything)] == sorted(
            (e.create_time.seconds for e in everything), reverse=True
        )
        active = service.stub.ListBatchJobs(
            pb.ListBatchJobsRequest(states=[pb.BATCH_JOB_STATE_QUEUED, pb.BATCH_JOB_STATE_RUNNING]), metadata=DEMO
        ).jobs
        assert [j.job_id for j in active] == [mine.job_id]
    finally:
        for job, metadata in ((mine, DEMO), (theirs, OTHER)):
            service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=metadata, timeout=10)


def test_a_repeated_submit_with_its_request_id_returns_the_same_job(service: Service) -> None:
    request = pb.SubmitBatchJobRequest(spec=job_spec("once", max_rows_per_s=SLOW_ROWS_PER_S), request_id="nightly-1")
    first = service.stub.SubmitBatchJob(request, metadata=DEMO).job
    try:
        again = service.stub.SubmitBatchJob(request, metadata=DEMO).job
        assert again.job_id == first.job_id
        with pytest.raises(grpc.RpcError) as refused:  # the same key, another job
            service.stub.SubmitBatchJob(
                pb.SubmitBatchJobRequest(spec=job_spec("twice"), request_id="nightly-1"), metadata=DEMO
            )
        assert refusal(refused.value)[:3] == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
            {"field": "request_id"},
        )
        # Another tenant's key space is its own.
        theirs = service.stub.SubmitBatchJob(
            pb.SubmitBatchJobRequest(spec=job_spec("once-other"), request_id="nightly-1"), metadata=OTHER
        ).job
        assert theirs.job_id != first.job_id
        service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=theirs.job_id), metadata=OTHER)
    finally:
        service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=first.job_id), metadata=DEMO)


@pytest.mark.parametrize(
    ("metadata", "spec", "code", "reason"),
    [
        ([], job_spec("a"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (auth("no-such-key"), job_spec("a"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        ([("authorization", "Basic eDp5")], job_spec("a"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (auth(LIMITED_KEY), job_spec("a"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (DEMO, job_spec("a", route="no_such_route"), grpc.StatusCode.NOT_FOUND, "ROUTE_NOT_FOUND"),
        (auth(STANDARD_ONLY_KEY), job_spec("a"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (DEMO, job_spec("a", traffic_class="gold"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),
    ],
    ids=[
        "no-token",
        "unknown-key",
        "not-bearer",
        "route-not-allowed",
        "unknown-route",
        "class-not-allowed",
        "bad-class",
    ],
)
def test_auth_and_tenant_rules_as_predict(
    service: Service, metadata: list[tuple[str, str]], spec: pb.BatchJobSpec, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        submit(service, spec, metadata=metadata)
    assert refusal(refused.value)[:2] == (code, reason)


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, md: stub.GetBatchJob(pb.GetBatchJobRequest(job_id="x"), metadata=md),
        lambda stub, md: stub.ListBatchJobs(pb.ListBatchJobsRequest(), metadata=md),
        lambda stub, md: stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id="x"), metadata=md),
    ],
    ids=["get", "list", "cancel"],
)
def test_every_method_needs_a_tenant(service: Service, call: object) -> None:
    for metadata in ([], auth("no-such-key")):
        with pytest.raises(grpc.RpcError) as refused:
            call(service.stub, metadata)  # type: ignore[operator]
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _bad_inputs(service: Service) -> None:
    """Files the bad-input cases name, under the demo tenant's directories."""
    inputs, outputs = service.input_dir(), service.output_dir()
    (inputs / "sub").mkdir(exist_ok=True)
    pq.write_table(pa.table({"trip_distance_km": [1.0]}), inputs / "no_key.parquet")
    pq.write_table(pa.table({"driver_id": ["1001"]}), inputs / "text_key.parquet")
    whole = (inputs / "drivers.parquet").read_bytes()
    (inputs / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (inputs / "drivers.txt").write_text("driver_id\n1001\n")
    (inputs / "ragged.csv").write_text("driver_id,trip_distance_km\n1001,2\n1002\n")
    secret = inputs.parent.parent / "secret.csv"
    secret.write_text("driver_id\n1\n")
    for name, target in (("escape.csv", secret), ("escape_dir", inputs.parent.parent)):
        if not (inputs / name).is_symlink():
            (inputs / name).symlink_to(target)
    (outputs / "full").mkdir(parents=True, exist_ok=True)
    (outputs / "full" / "notes.txt").write_text("not a job's output")
    if not (outputs / "out_link").is_symlink():
        (outputs / "out_link").symlink_to(inputs.parent.parent)


BAD_INPUTS: list[tuple[str, dict[str, object], str, str]] = [
    ("absolute-input", {"input": "/etc/passwd"}, "spec.input", "relative"),
    ("dotdot-input", {"input": "../other/drivers.parquet"}, "spec.input", "'..'"),
    ("link-out", {"input": "escape.csv"}, "spec.input", "leads out"),
    ("dir-link-out", {"input": "escape_dir/secret.csv"}, "spec.input", "leads out"),
    ("missing", {"input": "nope.parquet"}, "spec.input", "no such file"),
    ("a-directory", {"input": "sub"}, "spec.input", "no such file"),
    ("empty-input", {"input": ""}, "spec.input", "required"),
    ("nul", {"input": "drivers.parquet\x00.csv"}, "spec.input", "control characters"),
    ("long", {"input": "a/" * 600 + "x.csv"}, "spec.input", "longer than"),
    ("backslash", {"input": "..\\drivers.parquet"}, "spec.input", "relative"),
    ("unknown-format", {"input": "drivers.txt"}, "spec.input", "unknown format"),
    ("no-entity-column", {"input": "no_key.parquet"}, "spec.input", "no entity column 'driver_id'"),
    ("wrong-key-type", {"input": "text_key.parquet"}, "spec.input", "needs an integer type"),
    ("truncated", {"input": "truncated.parquet"}, "spec.input", "unreadable or truncated"),
    ("ragged-csv", {"input": "ragged.csv"}, "spec.input", "unreadable or truncated"),
    ("no-timestamp-column", {"timestamp_column": "ts"}, "spec.timestamp_column", "no timestamp column 'ts'"),
    ("offline-without-times", {"features": pb.BATCH_FEATURE_SOURCE_OFFLINE}, "spec.features", "event times"),
    ("absolute-output", {"output": "/tmp/x"}, "spec.output", "relative"),
    ("dotdot-output", {"output": "../other/x"}, "spec.output", "'..'"),
    ("output-link-out", {"output": "out_link/x"}, "spec.output", "leads out"),
    ("output-root", {"output": "."}, "spec.output", "itself"),
    ("output-not-empty", {"output": "full"}, "spec.output", "not empty and not an inferline batch output"),
    ("output-inside-a-job", {"output": "first/nested"}, "spec.output", "inside another job's output"),
    ("output-holds-the-job", {"output": "first"}, "spec.output", "already holds this job"),
    ("resume-another-job", {"output": "first", "resume": True, "chunk_rows": 50}, "spec.resume", "chunk_rows differs"),
    ("shard-index", {"shard_index": 2, "shard_count": 2}, "spec.shard_index", "below shard_count"),
    ("chunk-rows", {"chunk_rows": 10_000_000}, "spec.chunk_rows", "above the limit"),
    ("concurrency", {"concurrency": 100_000}, "spec.concurrency", "above the limit"),
    ("nan-rate", {"max_rows_per_s": math.nan}, "spec.max_rows_per_s", "finite"),
    ("tiny-rate", {"max_rows_per_s": 1e-300}, "spec.max_rows_per_s", "at least 1"),
    ("inf-yield", {"yield_queue_ms": math.inf}, "spec.yield_queue_ms", "finite"),
    ("negative-yield", {"yield_queue_ms": -1.0}, "spec.yield_queue_ms", "finite"),
    ("tiny-interval", {"yield_interval_s": 1e-9}, "spec.yield_interval_s", "within"),
    ("nan-deadline", {"deadline_s": math.nan}, "spec.deadline_s", "finite"),
    ("negative-deadline", {"deadline_s": -5.0}, "spec.deadline_s", "within"),
    ("year-deadline", {"deadline_s": 365 * 86400.0}, "spec.deadline_s", "within"),
    ("publish-memory-cache", {"publish_cache": True}, "spec.publish_cache", "score_cache.backend: redis"),
    ("view-scan", {"view_scan": 9}, "spec.view_scan", "unknown view scan mode 9"),
]


@pytest.mark.parametrize(("case", "fields", "field", "says"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_requests_are_refused_naming_the_field(
    service: Service,
    first_job: tuple[pb.BatchJob, pb.BatchJob],
    case: str,
    fields: dict[str, object],
    field: str,
    says: str,
) -> None:
    """``first_job``: the output cases name its directory."""
    _bad_inputs(service)
    options = dict(fields)
    with pytest.raises(grpc.RpcError) as refused:
        submit(service, job_spec(str(options.pop("output", "fresh")), **options))
    code, reason, metadata, message = refusal(refused.value)
    assert (code, reason, metadata) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", {"field": field}), message
    assert says in message
    roots = service.roots[0].parent
    assert str(roots) not in message, "a server path in a caller's message"
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field
    assert not (service.output_dir() / "fresh").exists()  # nothing was created


def test_bad_page_tokens_states_and_ids(service: Service) -> None:
    for token in ("garbage", "djE6LTE=", "\u00e9", "x" * 5000):
        with pytest.raises(grpc.RpcError) as refused:
            service.stub.ListBatchJobs(pb.ListBatchJobsRequest(page_token=token), metadata=DEMO)
        assert refusal(refused.value)[2] == {"field": "page_token"}
    with pytest.raises(grpc.RpcError) as refused:
        service.stub.ListBatchJobs(pb.ListBatchJobsRequest(states=[pb.BATCH_JOB_STATE_UNSPECIFIED]), metadata=DEMO)
    assert refusal(refused.value)[2] == {"field": "states"}
    for job_id in ("", "x" * 100_000, "' OR 1=1 --"):
        with pytest.raises(grpc.RpcError) as refused:
            get(service, job_id)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_jobs_queue_beyond_max_running_and_a_tenant_has_a_limit(service: Service) -> None:
    jobs = [submit(service, job_spec(f"limit-{i}", max_rows_per_s=SLOW_ROWS_PER_S)) for i in range(2)]
    try:
        # Two jobs never write one output (the second would be refused as "already holds this job"
        # without resume; with it, it is refused for the running job).
        with pytest.raises(grpc.RpcError) as refused:
            submit(service, job_spec("limit-0", max_rows_per_s=SLOW_ROWS_PER_S, resume=True))
        code, _, metadata, message = refusal(refused.value)
        assert (code, metadata) == (grpc.StatusCode.INVALID_ARGUMENT, {"field": "spec.output"})
        assert f"is the output of job {jobs[0].job_id}" in message
        jobs.append(submit(service, job_spec("limit-2", max_rows_per_s=SLOW_ROWS_PER_S)))
        with pytest.raises(grpc.RpcError) as refused:
            submit(service, job_spec("limit-3"))
        assert refusal(refused.value)[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_JOB_LIMIT")
        wait_until(
            lambda: [get(service, j.job_id).state for j in jobs[:2]] == [pb.BATCH_JOB_STATE_RUNNING] * 2,
            "the first two jobs running",
        )
        assert get(service, jobs[2].job_id).state == pb.BATCH_JOB_STATE_QUEUED  # batch_jobs.max_running: 2
        cancelled = service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=jobs[2].job_id), metadata=DEMO).job
        assert (cancelled.state, cancelled.runs) == (pb.BATCH_JOB_STATE_CANCELLED, 0)  # never started
    finally:
        for job in jobs:
            service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=DEMO)
    assert [get(service, j.job_id).state for j in jobs] == [pb.BATCH_JOB_STATE_CANCELLED] * 3


def test_cancel_stops_within_a_second_and_the_job_resumes_after_a_restart(
    service: Service, oracle: tuple[pd.DataFrame, str]
) -> None:
    out = service.output_dir() / "cancelled"
    job = submit(service, job_spec("cancelled", max_rows_per_s=SLOW_ROWS_PER_S))
    wait_for_rows(service, job.job_id, 5 * CHUNK_ROWS)

    started = time.monotonic()
    cancelled = service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=DEMO, timeout=10).job
    took = time.monotonic() - started

    assert cancelled.state == pb.BATCH_JOB_STATE_CANCELLED, cancelled
    assert took < 1.0, f"cancel took {took:.2f} s"
    assert cancelled.end_time.ToNanoseconds() > 0
    kept = parts(out)
    assert 5 <= len(kept) < ROWS // CHUNK_ROWS
    time.sleep(0.5)
    assert parts(out) == kept, "the job went on after its cancel"
    assert not (out / "_inferline/shard-0-of-1/summary.json").exists()
    # Cancelling again changes nothing.
    again = service.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=DEMO).job
    assert (again.state, again.end_time) == (cancelled.state, cancelled.end_time)

    service.stop()
    service.start()

    known = get(service, job.job_id)  # the restarted service knows the job, and leaves it cancelled
    assert (known.state, known.rows_done, known.runs) == (pb.BATCH_JOB_STATE_CANCELLED, cancelled.rows_done, 1)
    resumed = submit(service, job_spec("cancelled", resume=True))
    done = wait_for_state(service, resumed.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)
    assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
    assert (done.rows_total, done.rows_done) == (ROWS, ROWS)
    assert_oracle_output(out, oracle)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_running_job_resumes_when_the_service_starts_again(
    service: Service, oracle: tuple[pd.DataFrame, str], sig: signal.Signals
) -> None:
    output = f"restarted-{sig.name.lower()}"
    job = submit(service, job_spec(output, max_rows_per_s=SLOW_ROWS_PER_S))
    before = wait_for_rows(service, job.job_id, 5 * CHUNK_ROWS)
    assert service.process is not None and service.process.server.proc is not None
    router = service.process.server.proc.pid
    [child] = job_processes(router)  # the job runs in a child process of its own, below the router's priority
    own = os.getpriority(os.PRIO_PROCESS, 0)  # the router's, which it inherited from this process
    assert os.getpriority(os.PRIO_PROCESS, child) == min(19, own + JOB_NICE)
    # The router's event loop runs boosted (server.loop_priority_boost, 5 by default), the job not with it.
    loop = max(-20, own - 5) if may_raise_priority(max(-20, own - 5)) else own
    wait_until(lambda: os.getpriority(os.PRIO_PROCESS, router) == loop, "the router's event loop boosted")

    service.stop(sig)
    wait_until(lambda: not running(child), "the job's process ending with its router")
    service.start()

    done = wait_for_state(service, job.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)
    assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
    assert done.runs == 2
    assert (done.rows_total, done.rows_done, done.row_errors) == (ROWS, ROWS, len(BAD_ROWS))
    assert done.start_time == before.start_time  # the first run's start
    assert_oracle_output(service.output_dir() / output, oracle)


def test_the_gateway_forwards_the_service(service: Service, tmp_path: pathlib.Path) -> None:
    """Through a real Envoy (``inferline gateway render``): calls, their statuses and details."""
    assert service.process is not None
    with (
        start_gateway({}, service.config, service.process.address, tmp_path) as gateway,
        grpc.insecure_channel(gateway.address) as channel,
    ):
        stub = pb_grpc.BatchJobsStub(channel)
        job = stub.SubmitBatchJob(
            pb.SubmitBatchJobRequest(spec=job_spec("via-gateway", max_rows_per_s=SLOW_ROWS_PER_S)),
            metadata=DEMO,
            timeout=30,
        ).job
        listed = stub.ListBatchJobs(pb.ListBatchJobsRequest(page_size=1), metadata=DEMO, timeout=10)
        assert [j.job_id for j in listed.jobs] == [job.job_id]
        cancelled = stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=DEMO, timeout=10)
        assert cancelled.job.state == pb.BATCH_JOB_STATE_CANCELLED
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetBatchJob(pb.GetBatchJobRequest(job_id=job.job_id), metadata=OTHER, timeout=10)
        assert refusal(refused.value)[:2] == (grpc.StatusCode.NOT_FOUND, "BATCH_JOB_NOT_FOUND")
        # REST callers reach the service too, through Envoy's transcoder, as the same tenant.
        get = "/inferline.v1.BatchJobs/GetBatchJob"
        status, answer = gateway.post_json(get, {"jobId": job.job_id}, **dict(DEMO))
        assert status == 200 and answer["job"]["state"] == "BATCH_JOB_STATE_CANCELLED", answer
        status, answer = gateway.post_json(get, {"jobId": job.job_id}, **dict(OTHER))
        assert status == 404 and answer["code"] == grpc.StatusCode.NOT_FOUND.value[0], answer


def test_a_router_that_runs_no_jobs_serves_them_and_leaves_the_running_to_the_others(
    service: Service, oracle: tuple[pd.DataFrame, str], tmp_path: pathlib.Path
) -> None:
    """``batch_jobs.run_jobs: false`` (the protected lane's setting): Submit, Get and List work
    there, the job waits QUEUED, and a router sharing the state runs it."""
    runs_jobs = write_config(tmp_path, service.roots)  # a state file of this test's own
    raw = yaml.safe_load(runs_jobs.read_text())
    raw["batch_jobs"]["run_jobs"] = False
    serves_only_config = tmp_path / "serves-only.yaml"
    serves_only_config.write_text(yaml.safe_dump(raw))
    serves_only = Service(serves_only_config, service.roots, service.triton, tmp_path / "logs-serves-only")
    runner = Service(runs_jobs, service.roots, service.triton, tmp_path / "logs-runner")
    try:
        for process in (serves_only, runner):
            process.log_dir.mkdir()
        serves_only.start()
        job = submit(serves_only, job_spec("left-to-others"))
        listed = serves_only.stub.ListBatchJobs(pb.ListBatchJobsRequest(), metadata=DEMO, timeout=10)
        assert [(j.job_id, j.state) for j in listed.jobs] == [(job.job_id, pb.BATCH_JOB_STATE_QUEUED)]

        runner.start()  # seconds after the submit woke the first one's (absent) job runner
        done = wait_for_state(serves_only, job.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)
        assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
        assert done.runs == 1
        assert_oracle_output(service.output_dir() / "left-to-others", oracle)
        assert serves_only.log_path is not None and runner.log_path is not None
        assert f"batch job {job.job_id} (tenant demo" in runner.log_path.read_text()
        served_log = serves_only.log_path.read_text()
        assert "run by the other processes sharing the state" in served_log
        assert f"batch job {job.job_id}" not in served_log
    finally:
        for process in (serves_only, runner):
            if process.process is not None:
                process.stop()


def test_routers_sharing_a_postgres_state_share_the_jobs(
    service: Service, oracle: tuple[pd.DataFrame, str], postgres_url: str, tmp_path: pathlib.Path
) -> None:
    """Two router processes on one Postgres (``batch_jobs.state_url``), as replicas on two hosts
    would be: a job submitted through one is seen, followed and cancelled through the other,
    and resumed through it to the same output as ``batch run``'s."""
    config = write_config(tmp_path, service.roots)
    raw = yaml.safe_load(config.read_text())
    del raw["batch_jobs"]["state_path"]
    raw["batch_jobs"]["state_url"] = fresh_schema(postgres_url)
    config.write_text(yaml.safe_dump(raw))
    replicas = [Service(config, service.roots, service.triton, tmp_path / f"logs-{i}") for i in range(2)]
    try:
        for replica in replicas:
            replica.log_dir.mkdir()
            replica.start()
        one, two = replicas
        job = submit(one, job_spec("replicas", max_rows_per_s=SLOW_ROWS_PER_S))
        assert get(two, job.job_id).spec == job.spec
        wait_for_rows(two, job.job_id, 5 * CHUNK_ROWS)  # progress, seen through the other replica

        two.stub.CancelBatchJob(pb.CancelBatchJobRequest(job_id=job.job_id), metadata=DEMO, timeout=10)
        cancelled = wait_for_state(one, job.job_id, pb.BATCH_JOB_STATE_CANCELLED, pb.BATCH_JOB_STATE_SUCCEEDED)
        assert cancelled.state == pb.BATCH_JOB_STATE_CANCELLED
        assert 5 * CHUNK_ROWS <= cancelled.rows_done < ROWS

        resumed = submit(two, job_spec("replicas", resume=True))
        done = wait_for_state(one, resumed.job_id, pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED)
        assert done.state == pb.BATCH_JOB_STATE_SUCCEEDED, done.error
        assert (done.rows_total, done.rows_done) == (ROWS, ROWS)
        assert_oracle_output(service.output_dir() / "replicas", oracle)
    finally:
        for replica in replicas:
            if replica.process is not None:
                replica.stop()
