"""Predict through a real router process, real Feast SQLite store and the real bundled Triton."""

from __future__ import annotations

import os
import pathlib

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from feast import FeatureStore
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inferline.stats import delta, scrape, total
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.router_fixtures import DEMO_KEY, LIMITED_KEY, ROOT, ServerProcess

pytestmark = pytest.mark.requires_triton

AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)


def _request(*ids: int, **kwargs: object) -> pb.PredictRequest:
    return pb.PredictRequest(
        route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=i) for i in ids], **kwargs
    )


@pytest.fixture
def stub(router_server: ServerProcess) -> pb_grpc.InferenceStub:
    channel = grpc.insecure_channel(router_server.address)
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def _expected_scores(ids: list[int], trip_distance_km: float) -> np.ndarray:
    """Independent reference: Feast online store + onnxruntime on the committed model."""
    store = FeatureStore(repo_path=str(ROOT / "deploy/feast/feature_repo"))
    rows = store.get_online_features(
        features=[f"driver_hourly_stats:{f}" for f in ("conv_rate", "acc_rate", "avg_daily_trips")],
        entity_rows=[{"driver_id": i} for i in ids],
    ).to_dict()
    x = np.array(
        [
            [rows["conv_rate"][k], rows["acc_rate"][k], rows["avg_daily_trips"][k], trip_distance_km]
            for k in range(len(ids))
        ],
        np.float32,
    )
    session = ort.InferenceSession(str(ROOT / "triton_models/driver_ranker/1/model.onnx"))
    return session.run(None, {"features": x})[0][:, 0]


def test_predict_is_served_by_the_primary_model(stub: pb_grpc.InferenceStub) -> None:
    ids = [1001, 1002, 1003, 1004]
    response = stub.Predict(
        _request(*ids, request_features={"trip_distance_km": 3.0}, traffic_class="critical"), timeout=5, metadata=AUTH
    )
    assert response.served_by == pb.SERVED_BY_PRIMARY
    assert response.degradation_reason == pb.DEGRADATION_REASON_UNSPECIFIED
    assert (response.model_name, response.model_version) == ("driver_ranker", "1")
    assert response.traffic_class == "critical"
    assert response.request_id
    expected = _expected_scores(ids, 3.0)
    by_id = {p.entity.int64_value: p for p in response.predictions}
    assert sorted(by_id) == ids
    for k, i in enumerate(ids):
        assert by_id[i].score == pytest.approx(float(expected[k]), abs=1e-5)
        assert by_id[i].decision == ("accept" if expected[k] >= 0.5 else "reject")
        assert list(by_id[i].defaulted_features) == []
    ranked = [p.score for p in response.predictions]
    assert ranked == sorted(ranked, reverse=True)
    assert [p.rank for p in response.predictions] == [1, 2, 3, 4]
    t = response.timings
    assert 0 < t.features_ms < t.total_ms and 0 < t.model_ms < t.total_ms and t.post_ms > 0


def test_missing_entity_and_request_feature_are_defaulted(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Predict(_request(1001, 999_999, request_id="abc"), timeout=5, metadata=AUTH)
    assert response.request_id == "abc"
    by_id = {p.entity.int64_value: p for p in response.predictions}
    assert set(by_id[999_999].defaulted_features) == {"conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km"}
    assert list(by_id[1001].defaulted_features) == ["trip_distance_km"]
    assert by_id[1001].score == pytest.approx(float(_expected_scores([1001], 6.0)[0]), abs=1e-5)


def test_top_k_limits_predictions(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Predict(_request(*range(1001, 1021), top_k=3), timeout=5, metadata=AUTH)
    assert [p.rank for p in response.predictions] == [1, 2, 3]
    full = stub.Predict(_request(*range(1001, 1021), top_k=20), timeout=5, metadata=AUTH)
    assert [p.entity for p in response.predictions] == [p.entity for p in full.predictions[:3]]


def _error(stub: pb_grpc.InferenceStub, request: pb.PredictRequest, metadata: object = AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=5, metadata=metadata)
    return info.value


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (
            pb.PredictRequest(route="nope", entities=[pb.EntityKey(name="driver_id", int64_value=1)]),
            "NOT_FOUND",
            "ROUTE_NOT_FOUND",
        ),
        (_request(), "INVALID_ARGUMENT", "INVALID_INPUT"),
        (
            pb.PredictRequest(route="driver_ranking", entities=[pb.EntityKey(name="driver_id", string_value="x")]),
            "INVALID_ARGUMENT",
            "INVALID_INPUT",
        ),
        (_request(*range(1001, 1102)), "INVALID_ARGUMENT", "INVALID_INPUT"),
        (_request(1001, request_features={"conv_rate": 1.0}), "INVALID_ARGUMENT", "INVALID_INPUT"),
        (_request(1001, traffic_class="platinum"), "INVALID_ARGUMENT", "INVALID_INPUT"),
    ],
)
def test_bad_input_gets_a_clear_status(
    stub: pb_grpc.InferenceStub, request_: pb.PredictRequest, code: str, reason: str
) -> None:
    err = _error(stub, request_)
    assert err.code().name == code
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert (info.reason, info.domain) == (reason, "inferline.v1")
    assert err.details()


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), "UNAUTHENTICATED"),
        ((("authorization", "Bearer not-a-key"),), "UNAUTHENTICATED"),
        ((("authorization", f"Bearer {LIMITED_KEY}"),), "PERMISSION_DENIED"),
    ],
)
def test_credentials_are_checked(stub: pb_grpc.InferenceStub, metadata: tuple[tuple[str, str], ...], code: str) -> None:
    assert _error(stub, _request(1001), metadata).code().name == code


def test_oversized_message_is_refused_and_server_lives_on(stub: pb_grpc.InferenceStub) -> None:
    err = _error(stub, _request(1001, request_id="x" * 100_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Predict(_request(1001), timeout=5, metadata=AUTH).served_by == pb.SERVED_BY_PRIMARY


def test_health_reflection_and_metrics_are_served(router_server: ServerProcess, stub: pb_grpc.InferenceStub) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(router_server.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            iter(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        )
        names = {s.name for s in reply.list_services_response.service}
    # Only the public surface: the internal services are called in-process, never served.
    assert names == {
        "inferline.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    # Every series exists at zero from start-up: what counts is that these calls moved them.
    url = f"http://127.0.0.1:{router_server.metrics_port}/metrics"
    before = scrape(url)
    stub.Predict(_request(1005), timeout=5, metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        stub.Predict(pb.PredictRequest(route="no_such_route"), timeout=5, metadata=AUTH)
    moved = delta(scrape(url), before)
    ok = {"code": "OK", "route": "driver_ranking", "served_by": "PRIMARY", "traffic_class": "standard"}
    assert total(moved, "inferline_requests_total", **ok) == 1
    assert total(moved, "inferline_requests_total", code="NOT_FOUND") == 1
    model_latency = {"layer": "model", "route": "driver_ranking", "traffic_class": "standard"}
    assert total(moved, "inferline_layer_latency_seconds_count", **model_latency) == 1


def test_cli_predict_prints_json_and_fails_on_error(router_server: ServerProcess, tmp_path: pathlib.Path) -> None:
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "inferline.cli", "predict", "--target", router_server.address, "--route"]
    ok = subprocess.run(
        [
            *base,
            "driver_ranking",
            "--entity",
            "driver_id=1001",
            "--entity",
            "driver_id=1002",
            "--deadline-ms",
            "2000",
            "--class",
            "critical",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["served_by"] == "SERVED_BY_PRIMARY" and len(body["predictions"]) == 2
    bad = subprocess.run([*base, "ghost", "--entity", "driver_id=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert json.loads(bad.stderr.strip().splitlines()[-1])["code"] == "NOT_FOUND"


def test_cli_stats_shows_the_traffic_of_its_window(router_server: ServerProcess, stub: pb_grpc.InferenceStub) -> None:
    """``stats --once`` measures one window from its first scrape (said on stderr): requests sent from then on,
    until it exits, are counted; those before are not; ``--json`` gives the same figures to scripts."""
    import json
    import subprocess
    import sys

    url = f"http://127.0.0.1:{router_server.metrics_port}/metrics"

    def measure(*options: str) -> tuple[str, int]:
        """(stdout, Predicts answered) of a ``stats --once`` run with Predicts sent all through its window."""
        command = [sys.executable, "-m", "inferline.cli", "stats", "--once", "--url", url, "--window", "3", *options]
        env = {**os.environ, "COLUMNS": "200"}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
            assert process.stderr is not None and process.stdout is not None
            assert "measuring for 3 s" in process.stderr.readline()  # its first scrape is taken
            sent = 0
            while process.poll() is None:
                request = pb.PredictRequest(
                    route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001 + sent % 5)]
                )
                stub.Predict(request, timeout=2.0, metadata=AUTH)
                sent += 1
            assert process.returncode == 0, process.stderr.read()
            return process.stdout.read(), sent

    stub.Predict(  # before any window: never counted
        pb.PredictRequest(route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001)]),
        timeout=2.0,
        metadata=AUTH,
    )
    shown, _ = measure()
    assert "driver_ranking" in shown and "PRIMARY" in shown and "total" in shown
    document, sent = measure("--json")
    figures = json.loads(document)["routes"]["driver_ranking"]
    assert 1 <= figures["requests"] <= sent
    assert figures["served_by"]["PRIMARY"] > 0
    unreachable = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "stats", "--once", "--url", "http://127.0.0.1:9/metrics"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot read" in unreachable.stderr


CLASS_HEADER = "x-inferline-traffic-class"


def test_the_class_header_stands_in_for_an_empty_class_and_must_agree_with_a_set_one(
    stub: pb_grpc.InferenceStub,
) -> None:
    # The gateway sheds and limits by the header; the router serves by the class it resolves.
    agreeing = stub.Predict(_request(1001, traffic_class="batch"), timeout=5, metadata=(*AUTH, (CLASS_HEADER, "batch")))
    assert agreeing.served_by == pb.SERVED_BY_PRIMARY
    header_only = _error(stub, _request(1001), (*AUTH, (CLASS_HEADER, "platinum")))
    assert header_only.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown traffic class 'platinum'" in header_only.details()
    differing = _error(stub, _request(1001, traffic_class="critical"), (*AUTH, (CLASS_HEADER, "batch")))
    assert differing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'critical' differs from the x-inferline-traffic-class header 'batch'" in differing.details()
