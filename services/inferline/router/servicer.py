"""Thin gRPC adapter of ``RouterService``: authenticate, validate, translate, delegate."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Mapping
from typing import Any

import grpc

from inferline.core.config import InferlineConfig
from inferline.core.deadline import Deadline, deadline_passed
from inferline.core.entities import parse_entity_ids
from inferline.core.errors import InferlineError, InvalidInput, PermissionDenied, RouteNotFound, rpc_method
from inferline.core.metrics import ServingMetrics
from inferline.core.served_by import Reason, ServedBy
from inferline.core.tracing import RequestTracer
from inferline.router.admission import Verdict
from inferline.router.gate import Entry, RequestGate, TenantRules
from inferline.router.plan import RoutePlan
from inferline.router.service import PredictCall, PredictOutcome, RouterService
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc

# Generated request ids: a random per-process prefix and a counter (unique, and far cheaper
# than a uuid4 per request).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)
_SERVED_BY = {s.value: pb.ServedBy.Value(f"SERVED_BY_{s.value}") for s in ServedBy}
_REASONS: dict[Reason | None, pb.DegradationReason.ValueType] = {
    r: pb.DegradationReason.Value(f"DEGRADATION_REASON_{r.value}") for r in Reason
}
_REASONS[None] = pb.DEGRADATION_REASON_UNSPECIFIED


# Degradation reasons that mean the main path had no capacity: admission counts them as drops.
_DROPPED = frozenset({Reason.DEADLINE, Reason.OVERLOAD})
# Reasons decided before any model work, whose latency says nothing of the path's capacity.
_NOT_SAMPLED = frozenset({Reason.CIRCUIT_OPEN, Reason.MODEL_UNAVAILABLE})


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        service: RouterService,
        config: InferlineConfig,
        plans: Mapping[str, RoutePlan],
        metrics: ServingMetrics,
        gate: RequestGate,
        tracer: RequestTracer | None = None,
    ) -> None:
        self._service = service
        self._tracer = tracer
        self._metrics = metrics
        self._gate = gate
        self._plans = plans
        self._classes = config.traffic_classes

    @rpc_method
    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        started_at = time.perf_counter()
        remaining_s = context.time_remaining()  # first: a gateway call's wait is read off it
        try:
            tenant, rules, traffic_class, plan = self._authorize(request, context)
            waited = self._gate.waited(context.invocation_metadata(), remaining_s)  # type: ignore[arg-type]
            if waited is not None:
                self._gate.signal_overload(context, plan.name)
            slack = None if remaining_s is None else remaining_s - plan.idle_need_s
            entry = await self._gate.admit(tenant, plan.name, traffic_class, waited, slack_s=slack)
        except InferlineError as err:
            self._failed(request, err, started_at, context)
            raise
        permit = entry.permit
        outcome: PredictOutcome | None = None
        missed = False  # no answer in time: counts against the protected classes (admission)
        try:
            call = self._call(request, tenant, rules, plan, entry)
            deadline = Deadline.from_context(context, entry.class_config.default_deadline_ms / 1000)
            outcome = await self._service.predict(
                call, deadline, started_at, overloaded=permit.verdict is Verdict.DEGRADE
            )
        except InferlineError as err:
            missed = err.code is grpc.StatusCode.DEADLINE_EXCEEDED  # too late on arrival, or no answer in time
            self._failed(request, err, started_at, context)
            raise
        except asyncio.CancelledError:
            missed = deadline_passed(context)  # gRPC cancels a call whose deadline went first
            raise
        finally:
            reason = outcome.reason if outcome is not None else None
            dropped = reason in _DROPPED
            sample = outcome is not None and reason not in _NOT_SAMPLED
            permit.release(dropped=dropped, sample=sample, missed=missed)
        t = outcome.timings
        self._metrics.observe_success(
            call.route.name,
            call.traffic_class,
            outcome.served_by.value,
            outcome.reason.value if outcome.reason else "",
            {
                "routing": t.routing_ms,
                "features": t.features_ms,
                "model": t.model_ms,
                "post": t.post_ms,
                "total": t.total_ms,
            },
        )
        self._metrics.observe_model_answer(call.route.name, outcome.model_name, len(call.ids))
        if self._tracer is not None:  # next loop turn: the response goes to gRPC first, and waits on no span
            metadata = context.invocation_metadata()
            asyncio.get_running_loop().call_soon(self._tracer.record, call, outcome, started_at, metadata)
        return self._response(request, call, outcome)

    def _failed(
        self,
        request: pb.PredictRequest,
        err: InferlineError,
        started_at: float,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Count (and trace) a request that ends in ``err``; labels only from known routes and classes."""
        route = request.route if request.route in self._plans else "unknown"
        traffic_class = request.traffic_class if request.traffic_class in self._classes else "unknown"
        self._metrics.observe_failure(route, traffic_class, err)
        if self._tracer is not None:
            self._tracer.record_error(request, err, started_at, context.invocation_metadata())

    def _authorize(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[str, TenantRules, str, RoutePlan]:
        """(tenant, its rules, traffic class, route plan) of an authenticated caller allowed to make this call."""
        tenant, rules = self._gate.authenticate(context.invocation_metadata())  # type: ignore[arg-type]
        plan = self._plans.get(request.route)
        if plan is None:
            raise RouteNotFound(request.route)
        if request.route not in rules.routes:
            raise PermissionDenied(f"tenant {tenant!r} may not call route {request.route!r}")
        metadata = context.invocation_metadata()
        requested = self._gate.requested_class(request.traffic_class, metadata, "traffic_class")  # type: ignore[arg-type]
        return tenant, rules, self._gate.traffic_class(tenant, rules, requested), plan

    def _call(
        self, request: pb.PredictRequest, tenant: str, rules: TenantRules, plan: RoutePlan, entry: Entry
    ) -> PredictCall:
        for name in request.request_features:
            if name not in plan.request_feature_names:
                raise InvalidInput(f"request_features[{name}]", "not a request-time feature of this route")
        return PredictCall(
            tenant=tenant,
            route=plan,
            ids=parse_entity_ids(plan.config, request.entities),
            request_features=request.request_features,
            traffic_class=entry.traffic_class,
            priority=entry.class_config.priority,
            top_k=request.top_k,
            request_id=request.request_id or f"{_ID_PREFIX}-{next(_ID_COUNTER)}",
            pin=rules.pins.get(plan.name),
            canary=rules.canaries.get(plan.name),
            prefer_cheapest=entry.class_config.prefer_cheapest,
        )

    @staticmethod
    def _response(request: pb.PredictRequest, call: PredictCall, outcome: PredictOutcome) -> pb.PredictResponse:
        entities = request.entities
        t = outcome.timings
        return pb.PredictResponse(
            request_id=call.request_id,
            route=call.route.name,
            predictions=[
                pb.Prediction(
                    entity=entities[r.entity_index],
                    score=r.score,
                    decision=r.decision,
                    rank=r.rank,
                    defaulted_features=outcome.defaulted[r.entity_index],
                )
                for r in outcome.ranked
            ],
            served_by=_SERVED_BY[outcome.served_by.value],
            degradation_reason=_REASONS[outcome.reason],
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            timings=pb.LayerTimings(
                routing_ms=t.routing_ms,
                features_ms=t.features_ms,
                model_ms=t.model_ms,
                post_ms=t.post_ms,
                total_ms=t.total_ms,
            ),
            features_degraded=outcome.features_degraded,
            traffic_class=call.traffic_class,
            cache_age_ms=outcome.cache_age_ms,
        )
