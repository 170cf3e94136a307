"""KServe v2 / Triton gRPC front door (``inference.GRPCInferenceService``): translate and delegate.

It serves the models of the routes (to the tenants of those routes) and the KServe-only
models of the ``models`` section (to the tenants that list them; the entry sets the
model's traffic classes, default deadline, per-tenant quota and admission). Unmodified
``tritonclient.grpc`` code pointed at the router gets the same gate as
``Predict`` — authentication, tenant rules, quotas, admission (shedding), traffic-class
priorities and deadlines — before its request reaches Triton through ``TritonExecutor``,
which never cancels a call in flight (docs/triton.md, "Never cancel a call in flight"). Raw tensors have no
degraded answer, so an overloaded model sheds its sheddable classes (RESOURCE_EXHAUSTED),
and runs a class that may not be shed over the admission limit rather than refuse it.

Served: ServerLive, ServerReady (no auth: health probes), ServerMetadata, ModelReady,
ModelMetadata, ModelConfig and ModelInfer. ModelStreamInfer is answered UNIMPLEMENTED
with the reason (``STREAM_NOT_SERVED``). Everything else of the service (statistics,
repository load/unload, shared memory, trace and log settings) is answered UNIMPLEMENTED:
callers may not change or inspect the model server through the router.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.core.config import InferlineConfig, KServeModelConfig, TenantConfig
from inferline.core.deadline import Deadline, deadline_passed
from inferline.core.errors import (
    DeadlineExceeded,
    InferlineError,
    InvalidInput,
    ModelNotFound,
    PermissionDenied,
    QuotaExceeded,
    Shed,
    echo,
    rpc_method,
)
from inferline.core.metrics import ServingMetrics, front_door_route
from inferline.router.gate import Entry, RequestGate, TenantRules
from inferline.router.plan import IDLE_MODEL_NEED_S
from inferline.router.quota import LocalRateLimiter, RateLimiter, RedisRateLimiter
from inferline.triton.executor import ModelBudgetExceeded, ModelOverloaded, ModelUnavailable, TritonExecutor
from inferline.triton.tensor_coalescer import TensorCoalescer

Context = grpc.aio.ServicerContext[Any, Any]

TRAFFIC_CLASS_PARAMETER = "traffic_class"
# Retry hint of a request shed because its model is overloaded (no degraded answer for raw tensors).
OVERLOAD_RETRY_AFTER_S = 0.05
# Kept back from the caller's deadline so that our own answer (even DEADLINE_EXCEEDED) leaves in time.
RESPONSE_RESERVE_S = 0.001
IDLE_NEED_S = RESPONSE_RESERVE_S + IDLE_MODEL_NEED_S
"""The least time a call needs on an idle router: the answer's reserve and the smallest model
call worth making. A critical call arriving with less misses by its own deadline, and its miss
does not count against the lower classes (``AdmissionController``)."""
STREAM_NOT_SERVED = (
    "ModelStreamInfer is not served by the inferline router: a stream (decoupled models) answers "
    "any number of requests with any number of responses, which the router's gate cannot hold to one "
    "deadline, one admission permit and one quota token per request; call ModelInfer (one request, "
    "one response), or Triton itself for decoupled models"
)


def _version() -> str:
    try:
        return importlib.metadata.version("inferline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class KServeFrontDoor(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The router's KServe v2 servicer: the gate, then ``TritonExecutor.forward``."""

    def __init__(
        self,
        config: InferlineConfig,
        gate: RequestGate,
        executor: TritonExecutor,
        metrics: ServingMetrics,
        model_quota: RateLimiter | None = None,
        forwarder: TensorCoalescer | None = None,
    ) -> None:
        """``model_quota``: the per-tenant buckets of ``models`` entries with a quota (``build_model_quota``);
        ``forwarder``: what runs ``ModelInfer`` on Triton (merging calls under load), else ``executor`` itself."""
        self._gate = gate
        self._executor = executor
        self._forwarder: TensorCoalescer | TritonExecutor = forwarder if forwarder is not None else executor
        self._metrics = metrics
        self._classes = frozenset(config.traffic_classes)
        self._models = frozenset(config.served_models)
        self._entries = config.models
        self._model_quota = model_quota
        self._metadata = service_pb2.ServerMetadataResponse(name="inferline", version=_version(), extensions=[])

    @rpc_method
    async def ServerLive(self, request: Any, context: Context) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    @rpc_method
    async def ServerReady(self, request: Any, context: Context) -> Any:
        try:
            ready = await self._executor.server_ready()
        except ModelUnavailable:
            ready = False
        return service_pb2.ServerReadyResponse(ready=ready)

    @rpc_method
    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        return self._metadata

    @rpc_method
    async def ModelReady(self, request: Any, context: Context) -> Any:
        self._authorize(request.name, context)
        check_version("version", request.version)
        try:
            ready = await self._executor.model_ready(request.name, request.version)
        except ModelUnavailable:
            ready = False  # a readiness question: "no" is the answer while Triton is away
        return service_pb2.ModelReadyResponse(ready=ready)

    @rpc_method
    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        self._authorize(request.name, context)
        check_version("version", request.version)
        return await self._executor.model_metadata(request.name, request.version)

    @rpc_method
    async def ModelConfig(self, request: Any, context: Context) -> Any:
        self._authorize(request.name, context)
        check_version("version", request.version)
        return await self._executor.model_config(request.name, request.version)

    @rpc_method
    async def ModelInfer(self, request: Any, context: Context) -> Any:
        started = time.perf_counter()
        model: str = request.model_name
        route = front_door_route(model) if model in self._models else "unknown"
        traffic_class = ""
        remaining_s = context.time_remaining()  # first: a gateway call's wait is read off it
        try:
            tenant, rules = self._authorize(model, context)
            waited = self._gate.waited(context.invocation_metadata(), remaining_s)  # type: ignore[arg-type]
            if waited is not None:
                self._gate.signal_overload(context, route)
            traffic_class = self._traffic_class(model, tenant, rules, self._requested_class(request, context))
            check_request(request)
            await self._check_model_quota(tenant, model)
            slack = None if remaining_s is None else remaining_s - IDLE_NEED_S
            entry = await self._gate.admit(tenant, route, traffic_class, waited, degradable=False, slack_s=slack)
            response = await self._forward(request, entry, context)
        except InferlineError as err:
            self._metrics.observe_failure(route, traffic_class if traffic_class in self._classes else "unknown", err)
            raise
        total_ms = (time.perf_counter() - started) * 1000
        self._metrics.observe_success(route, traffic_class, "PRIMARY", "", {"total": total_ms})
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        self._metrics.observe_model_answer(route, response.model_name, int(rows))  # its share of the model's cost
        return response

    async def _forward(self, request: Any, entry: Entry, context: Context) -> Any:
        """Run an admitted request; release its permit exactly once, telling admission how it went."""
        permit = entry.permit
        dropped = sample = missed = False
        try:
            cls = entry.class_config
            model_entry = self._entries.get(request.model_name)
            default_ms = cls.default_deadline_ms
            if model_entry is not None and model_entry.deadline_ms is not None:
                default_ms = model_entry.deadline_ms
            deadline = Deadline.from_context(context, default_ms / 1000).split(RESPONSE_RESERVE_S)
            try:
                response = await self._forwarder.forward(request, deadline=deadline, priority=cls.priority)
            except asyncio.CancelledError:
                missed = deadline_passed(context)  # gRPC cancels a call whose deadline went first
                raise
            except ModelBudgetExceeded as err:
                dropped = sample = True
                raise DeadlineExceeded(f"no answer from model {request.model_name!r} within the deadline") from err
            except ModelOverloaded as err:
                dropped = sample = True
                raise Shed(err.message, OVERLOAD_RETRY_AFTER_S) from err
            sample = True
            return response
        finally:
            permit.release(dropped=dropped, sample=sample, missed=missed)

    def _authorize(self, model: str, context: Context) -> tuple[str, TenantRules]:
        """(tenant, its rules) of an authenticated caller that may use ``model``.

        Raises:
            Unauthenticated: no or a bad bearer token (checked first: no model names leak).
            ModelNotFound: no route calls the model and no ``models`` entry names it.
            PermissionDenied: none of the tenant's routes calls it, nor do its ``models`` name it.
        """
        tenant, rules = self._gate.authenticate(context.invocation_metadata())  # type: ignore[arg-type]
        if model not in self._models:
            raise ModelNotFound(model)
        if model not in rules.models:
            raise PermissionDenied(f"tenant {tenant!r} may not call model {model!r}")
        return tenant, rules

    def _traffic_class(self, model: str, tenant: str, rules: TenantRules, requested: str) -> str:
        """The class a call of ``model`` runs in: the gate's rules, and a ``models`` entry's own.

        Raises:
            InvalidInput: no such class.
            PermissionDenied: the tenant may not use it, or the model's entry does not take it.
        """
        entry = self._entries.get(model)
        if entry is None:
            return self._gate.traffic_class(tenant, rules, requested)
        traffic_class = self._gate.traffic_class(tenant, rules, requested or entry.default_traffic_class or "")
        if entry.traffic_classes is not None and traffic_class not in entry.traffic_classes:
            allowed = ", ".join(entry.traffic_classes)
            raise PermissionDenied(
                f"model {model!r} does not take traffic class {traffic_class!r} (it takes: {allowed})"
            )
        return traffic_class

    async def _check_model_quota(self, tenant: str, model: str) -> None:
        """The tenant's own bucket for ``model`` (a ``models`` entry's ``quota``). Raises ``QuotaExceeded``."""
        entry = self._entries.get(model)
        if entry is None or entry.quota is None or self._model_quota is None:
            return
        decision = await self._model_quota.check(model_quota_key(tenant, model))
        if not decision.allowed:
            self._metrics.quota_exceeded.labels(tenant).inc()
            raise QuotaExceeded(f"tenant {tenant!r} is over its quota for model {model!r}", decision.retry_after_s)

    def _requested_class(self, request: Any, context: Context) -> str:
        """The traffic class asked for: request parameter first, then call metadata ("" = the tenant's default)."""
        field = f"parameters[{TRAFFIC_CLASS_PARAMETER}]"
        parameter = request.parameters.get(TRAFFIC_CLASS_PARAMETER)
        in_request = ""
        if parameter is not None:
            if parameter.WhichOneof("parameter_choice") != "string_param":
                raise InvalidInput(field, "must be a string")
            in_request = str(parameter.string_param)
        return self._gate.requested_class(in_request, context.invocation_metadata(), field)  # type: ignore[arg-type]

    @rpc_method
    async def _not_served(self, request: Any, context: Context) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "not served by the inferline router (inference and metadata only)"
        )

    @rpc_method
    async def ModelStreamInfer(self, request_iterator: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, STREAM_NOT_SERVED)

    ModelStatistics = _not_served
    RepositoryIndex = _not_served
    RepositoryModelLoad = _not_served
    RepositoryModelUnload = _not_served
    SystemSharedMemoryStatus = _not_served
    SystemSharedMemoryRegister = _not_served
    SystemSharedMemoryUnregister = _not_served
    CudaSharedMemoryStatus = _not_served
    CudaSharedMemoryRegister = _not_served
    CudaSharedMemoryUnregister = _not_served
    TraceSetting = _not_served
    LogSettings = _not_served


def model_quota_key(tenant: str, model: str) -> str:
    """The bucket of ``tenant``'s calls of the KServe model ``model`` (apart from the tenant's own, ``tenant``)."""
    return f"{tenant}/{front_door_route(model)}"


def build_model_quota(config: InferlineConfig) -> RateLimiter | None:
    """Every tenant's bucket for every ``models`` entry with a ``quota``, on ``rate_limit.backend``
    (Redis: shared by the replicas, as tenants' quotas are); None when no entry has a quota."""
    quotas: dict[str, KServeModelConfig] = {m: e for m, e in config.models.items() if e.quota is not None}
    buckets = {
        model_quota_key(tenant, model): TenantConfig(quota=entry.quota)
        for model, entry in quotas.items()
        for tenant in config.tenants
    }
    if not buckets:
        return None
    if config.rate_limit.backend == "redis":
        return RedisRateLimiter(buckets, config.rate_limit)
    return LocalRateLimiter(buckets)


MAX_NAME_CHARS = 256
"""Longest tensor name, parameter key or request id passed on to Triton."""
MAX_PARAMETER_CHARS = 1024
"""Longest string parameter passed on to Triton."""
_VERSION_DIGITS = 19
"""A model version is an int64 (Triton's), at most 19 decimal digits."""


def check_request(request: Any) -> None:
    """Refuse what Triton must not see, before it costs a call.

    Shared-memory tensors: regions live on the model server's host, and a caller must not
    read or write regions registered there by others. Oversized strings: Triton echoes
    names, ids and versions in its errors, and an error whose trailers pass gRPC's 16 KiB
    metadata limit arrives as "Stream removed", which reads as an outage, not the caller's
    mistake.
    """
    check_version("model_version", request.model_version)
    if len(request.id) > MAX_NAME_CHARS:
        raise InvalidInput("id", f"longer than {MAX_NAME_CHARS} characters")
    _check_parameters("parameters", request.parameters)
    for kind, tensors in (("inputs", request.inputs), ("outputs", request.outputs)):
        for i, tensor in enumerate(tensors):
            if len(tensor.name) > MAX_NAME_CHARS:
                raise InvalidInput(f"{kind}[{i}].name", f"longer than {MAX_NAME_CHARS} characters")
            if "shared_memory_region" in tensor.parameters:
                raise InvalidInput(
                    f"{kind}[{tensor.name}]", "shared memory is not served by the router: send the tensor contents"
                )
            _check_parameters(f"{kind}[{i}].parameters", tensor.parameters)


def check_version(field: str, version: str) -> None:
    """A model version is empty (the model's policy picks) or an int64 in decimal."""
    if version and not (version.isdigit() and len(version) <= _VERSION_DIGITS):
        raise InvalidInput(field, f"must be empty or a version number, got {echo(version)}")


def _check_parameters(field: str, parameters: Any) -> None:
    for key, value in parameters.items():
        if len(key) > MAX_NAME_CHARS:
            raise InvalidInput(field, f"a key is longer than {MAX_NAME_CHARS} characters")
        if value.WhichOneof("parameter_choice") == "string_param" and len(value.string_param) > MAX_PARAMETER_CHARS:
            raise InvalidInput(f"{field}[{echo(key)}]", f"longer than {MAX_PARAMETER_CHARS} characters")
