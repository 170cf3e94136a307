"""Tracing on in a real router process: the console exporter's spans, flushed at SIGTERM."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import grpc
import pytest

from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.router_fixtures import (
    DEMO_KEY,
    FUNCTIONAL_ADMISSION,
    FUNCTIONAL_BUDGETS,
    FUNCTIONAL_QUEUE_WAIT_MS,
    start_inferline,
    write_test_config,
)

pytestmark = pytest.mark.requires_triton

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_IDS = ("00f067aa0ba902b7", "00f067aa0ba902b8")
ENV = {"INFERLINE_TRACING__ENABLED": "true", "INFERLINE_TRACING__EXPORTER": "console"}


def _metadata(parent_id: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {DEMO_KEY}"), ("traceparent", f"00-{TRACE_ID}-{parent_id}-01"))


def _console_spans(log: str) -> list[dict[str, Any]]:
    """The JSON objects ``ConsoleSpanExporter`` printed (each starts with a line ``{``)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(log, m.start())[0] for m in re.finditer(r"^\{$", log, re.MULTILINE)]


def test_router_exports_a_span_tree_per_request_under_the_callers_trace(
    triton_server: object, tmp_path: pathlib.Path
) -> None:
    config = write_test_config(
        tmp_path / "inferline.yaml",
        budgets=FUNCTIONAL_BUDGETS,
        queue_wait_target_ms=FUNCTIONAL_QUEUE_WAIT_MS,
        admission=FUNCTIONAL_ADMISSION,
    )
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    server = start_inferline(
        ["up", "--no-gateway", "--config", str(config), "--triton-url", url], tmp_path / "router.log", env=ENV
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.PredictRequest(
                route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=i) for i in (1001, 1002)]
            )
            responses = [stub.Predict(request, timeout=5, metadata=_metadata(p)) for p in PARENT_IDS]
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(pb.PredictRequest(route="nope"), timeout=5, metadata=_metadata(PARENT_IDS[0]))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        code = server.stop()
    log = server.log_path.read_text()
    assert code == 0, server.log_tail()
    spans = _console_spans(log)
    roots = [s for s in spans if s["name"] == "inferline.predict"]
    assert len(roots) == 3, log[-4000:]
    assert {s["context"]["trace_id"] for s in spans} == {f"0x{TRACE_ID}"}
    answered = [r for r in roots if r["attributes"].get("rpc.grpc.status_code") == 0]
    assert sorted(r["parent_id"] for r in answered) == [f"0x{p}" for p in PARENT_IDS]
    assert sorted(r["attributes"]["inferline.request_id"] for r in answered) == sorted(r.request_id for r in responses)
    for root in answered:
        assert root["kind"] == "SpanKind.SERVER"
        assert root["resource"]["attributes"]["service.name"] == "inferline-router"
        assert root["attributes"]["inferline.served_by"] == "PRIMARY"
        assert root["attributes"]["inferline.route"] == "driver_ranking"
        assert root["attributes"]["inferline.entities"] == 2
        children = [s for s in spans if s["parent_id"] == root["context"]["span_id"]]
        assert sorted(c["name"] for c in children) == ["features", "model", "post", "routing"]
    (failed,) = [r for r in roots if r not in answered]
    assert failed["status"]["status_code"] == "ERROR"
    assert failed["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed["attributes"]["inferline.error.reason"] == "ROUTE_NOT_FOUND"
