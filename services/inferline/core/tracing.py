"""Optional OpenTelemetry spans for Predict: one per request and one per layer; off by default.

Spans are written *after* the request has been answered, from the timings the router
already measures (``started_at`` and the per-layer ``LayerTimes``), not with context
managers around each layer. Two reasons:

- the hot path stays as it is: no span objects, context managers or contextvars while the
  request runs; with tracing off the servicer pays one ``if tracer is not None``;
- the spans carry exactly the times that the metrics and the response's ``timings`` report.

The servicer schedules ``record`` with ``loop.call_soon``, so the response is handed to gRPC
before the span work (tens of µs for a sampled request) runs; a fault in it is logged by the
loop and cannot fail the call.

The root span ``inferline.predict`` (kind SERVER) starts when the request arrived and lasts
``total_ms``. Its children ``routing``, ``features`` and ``model`` are laid end to end from
its start, and ``post`` ends with it; on a degraded answer the time between ``model`` and
``post`` (the degradation service's answer, which no layer timing counts) is a
``degradation`` span. A layer the request never reached (0 ms) has no span. A request that
failed with an ``InferlineError`` gets a root span alone, with status ERROR and
``rpc.grpc.status_code``.

A W3C ``traceparent`` (and ``tracestate``) in the call's metadata makes the root span a
child of the caller's span. Sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))``:
a caller's sampling decision is followed, other requests are sampled by trace id.

The tracer has its own ``TracerProvider``: the process-wide (global) provider is the
application's to set, and is left alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sized
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from inferline.core.config import TracingConfig
from inferline.core.errors import InferlineError
from inferline.core.served_by import Reason, ServedBy

ROOT_SPAN = "inferline.predict"
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
_RPC_ATTRIBUTES: dict[str, AttributeValue] = {
    "rpc.system": "grpc",
    "rpc.service": "inferline.v1.Inference",
    "rpc.method": "Predict",
}

Metadata = Iterable[tuple[str, str | bytes]] | None
"""A call's invocation metadata (``grpc.aio.ServicerContext.invocation_metadata()``)."""


# What the tracer reads of the router's types (``PredictCall``, ``PredictOutcome``, ``LayerTimes``,
# ``PredictRequest``), as protocols so that ``core`` does not depend on the router.
class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Call(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def route(self) -> _Named: ...
    @property
    def ids(self) -> Sized: ...
    @property
    def traffic_class(self) -> str: ...
    @property
    def request_id(self) -> str: ...


class _Timings(Protocol):
    @property
    def routing_ms(self) -> float: ...
    @property
    def features_ms(self) -> float: ...
    @property
    def model_ms(self) -> float: ...
    @property
    def post_ms(self) -> float: ...
    @property
    def total_ms(self) -> float: ...


class _Outcome(Protocol):
    @property
    def served_by(self) -> ServedBy: ...
    @property
    def reason(self) -> Reason | None: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def timings(self) -> _Timings: ...


class _Request(Protocol):
    @property
    def route(self) -> str: ...
    @property
    def traffic_class(self) -> str: ...
    @property
    def request_id(self) -> str: ...


def _ns(ms: float) -> int:
    return round(ms * 1_000_000)


class RequestTracer:
    """Writes the spans of answered and failed Predict calls; built by ``build_tracer``.

    ``processor`` replaces the configured exporter (tests pass a ``SimpleSpanProcessor``
    over an ``InMemorySpanExporter``); otherwise a ``BatchSpanProcessor`` exports from a
    background thread, so recording a span only queues it.
    """

    def __init__(self, config: TracingConfig, processor: SpanProcessor | None = None) -> None:
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource.create({SERVICE_NAME: config.service_name}),
            shutdown_on_exit=False,  # the app's closers call shutdown()
        )
        self._provider.add_span_processor(processor or BatchSpanProcessor(_exporter(config)))
        self._tracer = self._provider.get_tracer("inferline")
        self._propagator = TraceContextTextMapPropagator()
        # perf_counter() readings to epoch nanoseconds, with one offset taken once.
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()

    def record(self, call: _Call, outcome: _Outcome, started_at: float, metadata: Metadata) -> None:
        """Spans of an answered call that arrived at ``started_at`` (``time.perf_counter()``)."""
        t = outcome.timings
        attributes: dict[str, AttributeValue] = {
            **_RPC_ATTRIBUTES,
            "rpc.grpc.status_code": 0,
            "inferline.route": call.route.name,
            "inferline.traffic_class": call.traffic_class,
            "inferline.tenant": call.tenant,
            "inferline.served_by": outcome.served_by.value,
            "inferline.model": outcome.model_name,
            "inferline.model_version": outcome.model_version,
            "inferline.entities": len(call.ids),
            "inferline.request_id": call.request_id,
        }
        if outcome.reason is not None:
            attributes["inferline.degradation_reason"] = outcome.reason.value
        start = self._epoch_ns(started_at)
        end = start + _ns(t.total_ms)
        root = self._tracer.start_span(ROOT_SPAN, self._parent(metadata), SpanKind.SERVER, attributes, start_time=start)
        if not root.is_recording():  # not sampled: no children either
            return
        parent = trace.set_span_in_context(root)
        at = start
        for name, ms in (("routing", t.routing_ms), ("features", t.features_ms), ("model", t.model_ms)):
            layer_end = min(at + _ns(ms), end)
            if ms > 0:
                self._tracer.start_span(name, parent, start_time=at).end(end_time=layer_end)
            at = layer_end
        post_start = max(at, end - _ns(t.post_ms))
        if outcome.reason is not None and post_start > at:
            self._tracer.start_span("degradation", parent, start_time=at).end(end_time=post_start)
        if t.post_ms > 0:
            self._tracer.start_span("post", parent, start_time=post_start).end(end_time=end)
        root.end(end_time=end)

    def record_error(self, request: _Request, err: InferlineError, started_at: float, metadata: Metadata) -> None:
        """The root span, status ERROR, of a call that failed with ``err`` (now)."""
        attributes: dict[str, AttributeValue] = {
            **_RPC_ATTRIBUTES,
            "rpc.grpc.status_code": err.code.value[0],
            "inferline.route": request.route,
            "inferline.traffic_class": request.traffic_class,
            "inferline.error.reason": err.reason,
        }
        if request.request_id:
            attributes["inferline.request_id"] = request.request_id
        end = time.perf_counter_ns() + self._epoch_offset_ns
        root = self._tracer.start_span(
            ROOT_SPAN, self._parent(metadata), SpanKind.SERVER, attributes, start_time=self._epoch_ns(started_at)
        )
        if root.is_recording():
            root.set_status(Status(StatusCode.ERROR, err.message))
            root.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter (blocks; bounded by the exporter's timeout)."""
        self._provider.shutdown()

    async def close(self) -> None:
        """``shutdown`` off the event loop (for ``App.closers``)."""
        await asyncio.to_thread(self.shutdown)

    def _epoch_ns(self, perf_counter_s: float) -> int:
        return round(perf_counter_s * 1e9) + self._epoch_offset_ns

    def _parent(self, metadata: Metadata) -> Context | None:
        """The caller's span context from W3C trace-context metadata, if it sent any."""
        if not metadata:
            return None
        carrier = {key: value for key, value in metadata if key in _TRACE_KEYS and isinstance(value, str)}
        return self._propagator.extract(carrier) if carrier else None


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    # Imported only when used: the OTLP exporter pulls in its protobuf modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, insecure=True)


def build_tracer(config: TracingConfig) -> RequestTracer | None:
    """The request tracer ``config`` asks for; ``None`` when tracing is off."""
    return RequestTracer(config) if config.enabled else None
