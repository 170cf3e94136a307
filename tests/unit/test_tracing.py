"""RequestTracer: the spans written after a Predict call, from the router's own timings."""

from __future__ import annotations

import itertools
import time

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from inferline.core.config import TracingConfig, load_config
from inferline.core.errors import RouteNotFound
from inferline.core.served_by import Reason, ServedBy
from inferline.core.tracing import ROOT_SPAN, RequestTracer, build_tracer
from inferline.router.plan import build_route_plans
from inferline.router.service import LayerTimes, PredictCall, PredictOutcome
from inferline.v1 import inference_pb2 as pb

PLAN = build_route_plans(load_config("deploy/local/inferline.yaml"))["driver_ranking"]
CALL = PredictCall("demo", PLAN, [1001, 1002, 1003], {}, "critical", 0, 0, "req-1")
TIMES = LayerTimes(routing_ms=0.5, features_ms=3.25, model_ms=7.0, post_ms=0.75, total_ms=11.5)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
US = 1_000  # ns


def _outcome(
    times: LayerTimes = TIMES, served_by: ServedBy = ServedBy.PRIMARY, reason: Reason | None = None
) -> PredictOutcome:
    return PredictOutcome([], served_by, "driver_ranker", "1", [[]] * 3, False, reason=reason, timings=times)


def _tracer(sample_ratio: float = 1.0) -> tuple[RequestTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    config = TracingConfig(enabled=True, exporter="console", sample_ratio=sample_ratio)
    return RequestTracer(config, SimpleSpanProcessor(exporter)), exporter


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def _duration_ns(span: ReadableSpan) -> int:
    assert span.start_time is not None and span.end_time is not None
    return span.end_time - span.start_time


def test_answered_call_has_a_root_span_and_one_span_per_layer() -> None:
    tracer, exporter = _tracer()
    started_at = time.perf_counter() - 0.02
    tracer.record(CALL, _outcome(), started_at, (("authorization", "Bearer k"),))
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == sorted([ROOT_SPAN, "routing", "features", "model", "post"])
    root = spans[ROOT_SPAN]
    assert root.kind is SpanKind.SERVER
    assert root.parent is None
    assert root.resource.attributes["service.name"] == "inferline-router"
    # The root starts when the request arrived (perf_counter reading, in epoch ns) and lasts total_ms.
    arrived_ns = time.time_ns() - (time.perf_counter_ns() - round(started_at * 1e9))
    assert root.start_time == pytest.approx(arrived_ns, abs=1_000 * US)
    assert _duration_ns(root) == pytest.approx(11.5e6, abs=US)
    layers = [spans[n] for n in ("routing", "features", "model", "post")]
    for span, ms in zip(layers, (0.5, 3.25, 7.0, 0.75), strict=True):
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        assert _duration_ns(span) == pytest.approx(ms * 1e6, abs=US)
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time  # type: ignore[operator]
    assert layers[0].start_time == root.start_time
    for before, after in itertools.pairwise(layers):
        assert after.start_time == pytest.approx(before.end_time, abs=US)
    assert layers[-1].end_time == root.end_time
    assert dict(root.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "inferline.v1.Inference",
        "rpc.method": "Predict",
        "rpc.grpc.status_code": 0,
        "inferline.route": "driver_ranking",
        "inferline.traffic_class": "critical",
        "inferline.tenant": "demo",
        "inferline.served_by": "PRIMARY",
        "inferline.model": "driver_ranker",
        "inferline.model_version": "1",
        "inferline.entities": 3,
        "inferline.request_id": "req-1",
    }
    assert root.status.status_code is StatusCode.UNSET


def test_degraded_answer_shows_the_degradation_and_skips_layers_never_reached() -> None:
    tracer, exporter = _tracer()
    times = LayerTimes(routing_ms=0.5, features_ms=2.0, model_ms=0.0, post_ms=0.5, total_ms=10.0)
    tracer.record(CALL, _outcome(times, ServedBy.CACHE, Reason.FEATURES_DEGRADED), time.perf_counter(), None)
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == sorted([ROOT_SPAN, "routing", "features", "degradation", "post"])
    root, degradation, post = spans[ROOT_SPAN], spans["degradation"], spans["post"]
    assert root.attributes is not None
    assert root.attributes["inferline.served_by"] == "CACHE"
    assert root.attributes["inferline.degradation_reason"] == "FEATURES_DEGRADED"
    # What no layer timing counts (the degradation service's answer) sits between features and post.
    assert degradation.start_time == spans["features"].end_time
    assert _duration_ns(degradation) == pytest.approx(7.0e6, abs=US)
    assert degradation.end_time == post.start_time and post.end_time == root.end_time


def test_failed_call_has_an_error_root_span() -> None:
    tracer, exporter = _tracer()
    request = pb.PredictRequest(route="nope", traffic_class="batch", request_id="req-2")
    started_at = time.perf_counter()
    tracer.record_error(request, RouteNotFound("nope"), started_at, None)
    (span,) = exporter.get_finished_spans()
    assert span.name == ROOT_SPAN and span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "unknown route 'nope'"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert span.attributes["inferline.error.reason"] == "ROUTE_NOT_FOUND"
    assert span.attributes["inferline.route"] == "nope"
    assert span.attributes["inferline.request_id"] == "req-2"
    assert 0 <= _duration_ns(span) < 100_000 * US


def test_traceparent_makes_the_root_a_child_of_the_callers_span() -> None:
    tracer, exporter = _tracer()
    metadata = (("authorization", "Bearer k"), ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"))
    tracer.record(CALL, _outcome(), time.perf_counter(), metadata)
    spans = _by_name(exporter.get_finished_spans())
    root = spans[ROOT_SPAN]
    assert root.context.trace_id == int(TRACE_ID, 16)
    assert root.parent is not None and root.parent.is_remote
    assert root.parent.span_id == int(PARENT_ID, 16)
    assert {s.context.trace_id for s in spans.values()} == {int(TRACE_ID, 16)}


def test_invalid_traceparent_starts_a_new_trace() -> None:
    tracer, exporter = _tracer()
    tracer.record(CALL, _outcome(), time.perf_counter(), (("traceparent", "garbage"),))
    root = _by_name(exporter.get_finished_spans())[ROOT_SPAN]
    assert root.parent is None


def test_sample_ratio_zero_records_nothing_unless_the_caller_sampled() -> None:
    tracer, exporter = _tracer(sample_ratio=0.0)
    tracer.record(CALL, _outcome(), time.perf_counter(), None)
    tracer.record_error(pb.PredictRequest(route="x"), RouteNotFound("x"), time.perf_counter(), None)
    assert exporter.get_finished_spans() == ()
    # Parent-based: the caller's sampled flag wins.
    tracer.record(CALL, _outcome(), time.perf_counter(), (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    assert len(exporter.get_finished_spans()) == 5


def test_build_tracer_is_none_when_tracing_is_off() -> None:
    assert build_tracer(TracingConfig()) is None
    tracer = build_tracer(TracingConfig(enabled=True, exporter="console"))
    assert isinstance(tracer, RequestTracer)
    tracer.shutdown()


async def test_close_exports_the_queued_spans() -> None:
    exporter = InMemorySpanExporter()
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    tracer = RequestTracer(TracingConfig(enabled=True), processor)
    tracer.record(CALL, _outcome(), time.perf_counter(), None)
    assert exporter.get_finished_spans() == ()
    await tracer.close()
    assert len(exporter.get_finished_spans()) == 5


def test_tracer_leaves_the_global_provider_alone() -> None:
    from opentelemetry import trace

    before = trace.get_tracer_provider()
    _tracer()
    assert trace.get_tracer_provider() is before
