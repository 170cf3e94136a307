"""A submitted job, checked: every refusal of ``inferline batch run`` before any work, plus
the service's own, each naming the request field at fault (INVALID_ARGUMENT).

Everything in a request is hostile until checked. File names are relative to the tenant's
own directories (``input_root/<tenant>/``, ``output_root/<tenant>/``): absolute paths and
``..`` are refused, and a name whose real path (links followed) leads out of the directory
is refused too, so a caller reads and writes nothing else on the server. Numbers are
bounded (NaN, infinities and absurd sizes refused), strings are bounded and free of control
characters, and no message a caller gets names a server path: they are rewritten to the
names the caller sent.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from inferline.batch.errors import BatchInputError
from inferline.batch.output import STATE_DIR, OutputDir
from inferline.batch.plan import plan_job
from inferline.batch.spec import BatchJobSpec, Shard
from inferline.core.config import BatchJobsConfig, InferlineConfig
from inferline.core.errors import InvalidInput, PermissionDenied, RouteNotFound, echo
from inferline.router.gate import RequestGate, TenantRules
from inferline.v1 import batch_jobs_pb2 as pb

MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_SHARDS = 10_000
MAX_CHUNK_ROWS = 1_000_000
MAX_CONCURRENCY = 256
MAX_YIELD_QUEUE_MS = 60_000.0
YIELD_INTERVAL_S = (0.05, 60.0)
MIN_ROWS_PER_S = 1.0
DEADLINE_S = (1.0, 30 * 24 * 3600.0)
DEFAULT_CLASS = "batch"
_FEATURES = {
    pb.BATCH_FEATURE_SOURCE_UNSPECIFIED: "auto",
    pb.BATCH_FEATURE_SOURCE_ONLINE: "online",
    pb.BATCH_FEATURE_SOURCE_OFFLINE: "offline",
}
_VIEW_SCAN = {
    pb.BATCH_VIEW_SCAN_UNSPECIFIED: "auto",
    pb.BATCH_VIEW_SCAN_AUTO: "auto",
    pb.BATCH_VIEW_SCAN_ALWAYS: "always",
    pb.BATCH_VIEW_SCAN_NEVER: "never",
}
_FIELD_OF_MESSAGE = (
    ("--features offline", "spec.features"),
    ("--publish-cache", "spec.publish_cache"),
    ("--tenant", "spec.publish_cache"),
    ("output ", "spec.output"),
    ("--resume", "spec.resume"),
)
"""``BatchInputError`` messages of the batch package → the request field they are about (default: the input)."""


@dataclass(frozen=True)
class CheckedJob:
    spec: BatchJobSpec
    """What the job runs (server paths)."""
    api_spec: dict[str, Any]
    """The caller's spec, as Get and List return it (the proto's JSON form)."""
    output_key: str
    """The output directory and shard: no two active jobs share one."""
    errors_file: str
    """The errors file, relative to the tenant's output directory."""


@dataclass(frozen=True)
class TenantDirs:
    """A tenant's input and output directories (real paths) and how to keep them out of messages."""

    input: pathlib.Path
    output: pathlib.Path

    @classmethod
    def of(cls, config: BatchJobsConfig, tenant: str) -> TenantDirs:
        assert config.input_root is not None and config.output_root is not None
        return cls(
            (config.input_root / tenant).resolve(),
            (config.output_root / tenant).resolve(),
        )

    def hide(self, text: str, named: dict[pathlib.Path, str]) -> str:
        """``text`` with server paths replaced: ``named`` by the caller's names, the tenant's directories by ``.``."""
        for path, name in sorted(named.items(), key=lambda item: -len(str(item[0]))):
            text = text.replace(str(path), name)
        for root in (self.input, self.output):
            text = text.replace(f"{root}/", "").replace(str(root), ".")
        return text


def check_route(config: InferlineConfig, tenant: str, rules: TenantRules, route: str) -> None:
    """As ``Predict``: an unknown route is NOT_FOUND, one the tenant may not call PERMISSION_DENIED."""
    if route not in config.routes:
        raise RouteNotFound(route)
    if route not in rules.routes:
        raise PermissionDenied(f"tenant {tenant!r} may not call route {route!r}")


def check_options(
    gate: RequestGate, config: InferlineConfig, tenant: str, rules: TenantRules, spec: pb.BatchJobSpec
) -> dict[str, Any]:
    """Everything of ``spec`` but its files, checked; returns the ``BatchJobSpec`` options they give.

    Raises:
        RouteNotFound, PermissionDenied, InvalidInput: naming the field.
    """
    check_route(config, tenant, rules, spec.route)
    traffic_class = gate.traffic_class(tenant, rules, spec.traffic_class or DEFAULT_CLASS)
    count = spec.shard_count or 1
    if count > MAX_SHARDS:
        raise InvalidInput("spec.shard_count", f"at most {MAX_SHARDS}")
    if spec.shard_index >= count:
        raise InvalidInput("spec.shard_index", f"{spec.shard_index} must be below shard_count {count}")
    _bounded("spec.chunk_rows", spec.chunk_rows, MAX_CHUNK_ROWS)
    _bounded("spec.request_rows", spec.request_rows, MAX_CHUNK_ROWS)
    _bounded("spec.concurrency", spec.concurrency, MAX_CONCURRENCY)
    _text("spec.timestamp_column", spec.timestamp_column, MAX_NAME_CHARS)
    if spec.features not in _FEATURES:
        raise InvalidInput("spec.features", f"unknown feature source {spec.features}")
    if spec.view_scan not in _VIEW_SCAN:
        raise InvalidInput("spec.view_scan", f"unknown view scan mode {spec.view_scan}")
    options: dict[str, Any] = {
        "route": spec.route,
        "shard": Shard(index=spec.shard_index, count=count),
        "resume": spec.resume,
        "traffic_class": traffic_class,
        "features_from": _FEATURES[spec.features],
        "timestamp_column": spec.timestamp_column or None,
        "view_scan": _VIEW_SCAN[spec.view_scan],
    }
    if spec.chunk_rows:
        options["chunk_rows"] = spec.chunk_rows
    if spec.request_rows:
        options["request_rows"] = spec.request_rows
    if spec.concurrency:
        options["concurrency"] = spec.concurrency
    if spec.max_rows_per_s:
        _finite("spec.max_rows_per_s", spec.max_rows_per_s, MIN_ROWS_PER_S, math.inf)
        options["max_rows_per_s"] = spec.max_rows_per_s
    if spec.deadline_s:
        _finite("spec.deadline_s", spec.deadline_s, *DEADLINE_S)
        options["deadline_s"] = spec.deadline_s
    if spec.HasField("yield_queue_ms"):
        _finite("spec.yield_queue_ms", spec.yield_queue_ms, 0.0, MAX_YIELD_QUEUE_MS)
        options["yield_queue_ms"] = spec.yield_queue_ms
    if spec.yield_interval_s:
        _finite("spec.yield_interval_s", spec.yield_interval_s, *YIELD_INTERVAL_S)
        options["yield_interval_s"] = spec.yield_interval_s
    if spec.publish_cache:
        if config.score_cache.backend != "redis":
            raise InvalidInput(
                "spec.publish_cache", "needs the Redis score cache (score_cache.backend: redis) on the server"
            )
        options |= {"publish_cache": True, "tenant": tenant}
    return options


def check_files(config: InferlineConfig, tenant: str, spec: pb.BatchJobSpec, options: dict[str, Any]) -> CheckedJob:
    """The input and output of the job, confined to the tenant's directories and checked as
    ``batch run`` checks them before any work (blocking: reads the input's footer, or scans
    a CSV whole; run it in a thread).

    Raises:
        InvalidInput: naming ``spec.input``, ``spec.output`` or the option at fault.
    """
    dirs = TenantDirs.of(config.batch_jobs, tenant)
    input_path = _confined(dirs.input, spec.input, "spec.input")
    output_dir = _confined(dirs.output, spec.output, "spec.output")
    if input_path == dirs.input or not input_path.is_file():
        raise InvalidInput("spec.input", f"{echo(spec.input)}: no such file in the tenant's input directory")
    if output_dir == dirs.output:
        raise InvalidInput("spec.output", "names the tenant's output directory itself: name a directory in it")
    for parent in output_dir.parents:
        if parent == dirs.output or not parent.is_relative_to(dirs.output):
            break
        if (parent / STATE_DIR).exists():
            raise InvalidInput("spec.output", f"{echo(spec.output)} is inside another job's output directory")
    named = {input_path: spec.input, output_dir: spec.output}
    try:
        job_spec = BatchJobSpec.build(input_path=input_path, output_dir=output_dir, **options)
        plan = plan_job(config, job_spec)
        out = OutputDir(output_dir, job_spec.shard.label, job_spec.shard.count > 1)
        out.check(plan.identity(), resume=job_spec.resume)
    except BatchInputError as err:
        message = dirs.hide(str(err), named)
        field = next((f for prefix, f in _FIELD_OF_MESSAGE if message.startswith(prefix)), "spec.input")
        if "timestamp column" in message:
            field = "spec.timestamp_column"
        raise InvalidInput(field, message) from None
    except OSError as err:  # a directory of the output path not readable, say
        raise InvalidInput("spec.output", dirs.hide(f"{err.strerror}: {err.filename}", named)) from None
    errors_file = pathlib.PurePosixPath(spec.output.strip("/")) / out.errors_path.name
    return CheckedJob(
        spec=job_spec,
        api_spec=json_format.MessageToDict(spec, preserving_proto_field_name=True),
        output_key=f"{output_dir}#{job_spec.shard.label}",
        errors_file=str(errors_file),
    )


def check_request_id(request_id: str) -> str | None:
    _text("request_id", request_id, MAX_REQUEST_ID_CHARS)
    return request_id or None


def _confined(base: pathlib.Path, name: str, field: str) -> pathlib.Path:
    """``base / name`` with links followed, refused unless it stays inside ``base``."""
    if not name:
        raise InvalidInput(field, "required: a path relative to the tenant's directory")
    _text(field, name, MAX_PATH_CHARS)
    relative = pathlib.PurePosixPath(name)
    if relative.is_absolute() or "\\" in name:
        raise InvalidInput(field, f"{echo(name)}: must be a path relative to the tenant's directory, '/' between names")
    if ".." in relative.parts:
        raise InvalidInput(field, f"{echo(name)}: '..' is not allowed")
    try:
        real = (base / relative).resolve()
    except (OSError, RuntimeError) as err:  # a loop of links, a name too long for the file system
        raise InvalidInput(field, f"{echo(name)}: cannot be resolved ({type(err).__name__})") from None
    if not real.is_relative_to(base):
        raise InvalidInput(field, f"{echo(name)}: leads out of the tenant's directory")
    return real


def _text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInput(field, f"longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(field, "holds control characters")


def _bounded(field: str, value: int, limit: int) -> None:
    if value > limit:
        raise InvalidInput(field, f"{value} is above the limit of {limit}")


def _finite(field: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        bound = f"at least {low:g}" if math.isinf(high) else f"within [{low:g}, {high:g}]"
        raise InvalidInput(field, f"{value!r} must be a finite number {bound}")
