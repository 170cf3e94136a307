"""The router's KServe v2 front door, called with unmodified tritonclient code (real router, real Triton)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferline.stats import delta, scrape, total
from tests.integration.router_fixtures import DEMO_KEY, LIMITED_KEY, ServerProcess

pytestmark = pytest.mark.requires_triton

MODEL = "driver_ranker"
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
ROWS = np.array([[0.5, 0.8, 500, 3], [0.1, 0.2, 100, 20]], np.float32)


@pytest.fixture
def client(router_server: ServerProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(router_server.address)
    yield client
    client.close()


def _inputs(rows: np.ndarray = ROWS, name: str = "features", datatype: str = "FP32") -> list[triton_grpc.InferInput]:
    tensor = triton_grpc.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return [tensor]


def _status(call: Any, *args: Any, **kwargs: Any) -> str:
    """The status of a call that must fail, as tritonclient reports it (``"StatusCode.X"``)."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return str(info.value.status())


def test_infer_answers_as_triton_does(client: triton_grpc.InferenceServerClient, triton_server: Any) -> None:
    result = client.infer(MODEL, _inputs(), headers=AUTH, client_timeout=5)
    scores = result.as_numpy("score")
    assert scores.shape == (2, 1)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))
    direct = triton_grpc.InferenceServerClient(triton_server.grpc_url)
    try:
        expected = direct.infer(MODEL, _inputs(), client_timeout=5).as_numpy("score")
    finally:
        direct.close()
    assert np.allclose(scores, expected)
    assert result.get_response().model_name == MODEL


async def test_aio_client_is_served(router_server: ServerProcess) -> None:
    client = triton_aio.InferenceServerClient(router_server.address)
    try:
        assert await client.is_server_live()
        assert await client.is_model_ready(MODEL, headers=AUTH)
        inputs = [triton_aio.InferInput("features", list(ROWS.shape), "FP32")]
        inputs[0].set_data_from_numpy(ROWS)
        result = await client.infer(
            MODEL, inputs, headers=AUTH, parameters={"traffic_class": "critical"}, client_timeout=5
        )
        assert result.as_numpy("score").shape == (2, 1)
    finally:
        await client.close()


def test_health_and_metadata(client: triton_grpc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=AUTH)
    assert client.get_server_metadata().name == "inferline"
    metadata = client.get_model_metadata(MODEL, headers=AUTH)
    assert metadata.name == MODEL
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 4])]
    assert [t.name for t in metadata.outputs] == ["score"]
    config = client.get_model_config(MODEL, headers=AUTH).config
    assert config.name == MODEL and config.max_batch_size > 0


def test_kserve_service_is_listed_by_reflection(router_server: ServerProcess) -> None:
    with grpc.insecure_channel(router_server.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(reflect.ServerReflectionInfo(iter([request]))))
    assert "inference.GRPCInferenceService" in {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize(
    "headers",
    [None, {"authorization": "Bearer wrong-key"}, {"authorization": DEMO_KEY}],
    ids=["no-key", "wrong-key", "no-scheme"],
)
def test_callers_are_authenticated(client: triton_grpc.InferenceServerClient, headers: dict[str, str] | None) -> None:
    assert _status(client.infer, MODEL, _inputs(), headers=headers) == "StatusCode.UNAUTHENTICATED"
    assert _status(client.get_model_metadata, MODEL, headers=headers) == "StatusCode.UNAUTHENTICATED"
    assert _status(client.is_model_ready, MODEL, headers=headers) == "StatusCode.UNAUTHENTICATED"


def test_tenant_without_the_model_is_denied(client: triton_grpc.InferenceServerClient) -> None:
    limited = {"authorization": f"Bearer {LIMITED_KEY}"}
    assert _status(client.infer, MODEL, _inputs(), headers=limited) == "StatusCode.PERMISSION_DENIED"
    assert _status(client.get_model_config, MODEL, headers=limited) == "StatusCode.PERMISSION_DENIED"


def test_unknown_model_is_not_found(client: triton_grpc.InferenceServerClient) -> None:
    assert _status(client.infer, "no_such_model", _inputs(), headers=AUTH) == "StatusCode.NOT_FOUND"
    assert _status(client.get_model_metadata, "no_such_model", headers=AUTH) == "StatusCode.NOT_FOUND"
    assert _status(client.infer, MODEL, _inputs(), model_version="7", headers=AUTH) == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    "inputs",
    [
        _inputs(np.zeros((2, 3), np.float32)),
        _inputs(name="wrong_name"),
        _inputs(ROWS.astype(np.int32), datatype="INT32"),
        _inputs(np.zeros((200, 4), np.float32)),
    ],
    ids=["shape", "name", "datatype", "batch-too-big"],
)
def test_bad_tensors_are_invalid_argument(
    client: triton_grpc.InferenceServerClient, inputs: list[triton_grpc.InferInput]
) -> None:
    assert _status(client.infer, MODEL, inputs, headers=AUTH, client_timeout=5) == "StatusCode.INVALID_ARGUMENT"


def test_shared_memory_tensors_are_refused(client: triton_grpc.InferenceServerClient) -> None:
    tensor = triton_grpc.InferInput("features", [2, 4], "FP32")
    tensor.set_shared_memory("someone_elses_region", ROWS.nbytes)
    assert _status(client.infer, MODEL, [tensor], headers=AUTH, client_timeout=5) == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("parameters", "headers"),
    [
        ({"traffic_class": "platinum"}, AUTH),
        ({"traffic_class": 3}, AUTH),
        (None, {**AUTH, "x-inferline-traffic-class": "platinum"}),
        ({"traffic_class": "critical"}, {**AUTH, "x-inferline-traffic-class": "batch"}),
    ],
    ids=["unknown-parameter", "not-a-string", "unknown-metadata", "parameter-and-metadata-differ"],
)
def test_bad_traffic_class_is_invalid_argument(
    client: triton_grpc.InferenceServerClient, parameters: dict[str, Any] | None, headers: dict[str, str]
) -> None:
    status = _status(client.infer, MODEL, _inputs(), headers=headers, parameters=parameters, client_timeout=5)
    assert status == "StatusCode.INVALID_ARGUMENT"


def test_traffic_class_from_metadata_is_served(client: triton_grpc.InferenceServerClient) -> None:
    headers = {**AUTH, "x-inferline-traffic-class": "batch"}
    assert client.infer(MODEL, _inputs(), headers=headers, client_timeout=5).as_numpy("score").shape == (2, 1)
    both = client.infer(MODEL, _inputs(), headers=headers, parameters={"traffic_class": "batch"}, client_timeout=5)
    assert both.as_numpy("score").shape == (2, 1)


@pytest.mark.parametrize("client_timeout", [0.0005, 0.002, 0.01])
def test_short_deadline_gets_an_answer_or_deadline_exceeded(
    client: triton_grpc.InferenceServerClient, client_timeout: float
) -> None:
    for _ in range(5):
        try:
            result = client.infer(MODEL, _inputs(), headers=AUTH, client_timeout=client_timeout)
        except InferenceServerException as err:
            assert err.status() == "StatusCode.DEADLINE_EXCEEDED", err
        else:
            assert result.as_numpy("score").shape == (2, 1)
    # Nothing was left broken: the next call with time to spare is answered.
    assert client.infer(MODEL, _inputs(), headers=AUTH, client_timeout=5).as_numpy("score").shape == (2, 1)


def test_model_repository_cannot_be_changed(client: triton_grpc.InferenceServerClient) -> None:
    assert _status(client.unload_model, MODEL, headers=AUTH) == "StatusCode.UNIMPLEMENTED"
    assert _status(client.load_model, MODEL, headers=AUTH) == "StatusCode.UNIMPLEMENTED"
    assert client.is_model_ready(MODEL, headers=AUTH)


def test_front_door_requests_are_counted(
    router_server: ServerProcess, client: triton_grpc.InferenceServerClient
) -> None:
    # Every series exists at zero from start-up: what counts is that these calls moved them.
    url = f"http://127.0.0.1:{router_server.metrics_port}/metrics"
    before = scrape(url)
    client.infer(MODEL, _inputs(), headers=AUTH, client_timeout=5)
    _status(client.infer, "no_such_model", _inputs(), headers=AUTH)
    moved = delta(scrape(url), before)
    ok = {"code": "OK", "route": "kserve:driver_ranker", "served_by": "PRIMARY", "traffic_class": "standard"}
    assert total(moved, "inferline_requests_total", **ok) == 1
    assert total(moved, "inferline_requests_total", code="NOT_FOUND", route="unknown") == 1


async def test_concurrent_calls_merge_and_each_gets_its_own_rows(
    router_server: ServerProcess, triton_server: Any
) -> None:
    """Calls that queue behind one in flight go to Triton as one call; each caller still gets
    exactly what Triton answers for its own rows (compared with Triton called directly)."""
    url = f"http://127.0.0.1:{router_server.metrics_port}/metrics"
    rng = np.random.default_rng(5)
    batches = [rng.uniform(0, 1, (int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(48)]
    direct = triton_grpc.InferenceServerClient(triton_server.grpc_url)
    try:
        expected = [direct.infer(MODEL, _inputs(b), client_timeout=5).as_numpy("score") for b in batches]
    finally:
        direct.close()
    client = triton_aio.InferenceServerClient(router_server.address)

    async def call(i: int) -> Any:
        inputs = [triton_aio.InferInput("features", list(batches[i].shape), "FP32")]
        inputs[0].set_data_from_numpy(batches[i])
        # critical: a burst of 48 is over admission's share for the sheddable classes
        critical = {"traffic_class": "critical"}
        return await client.infer(
            MODEL, inputs, headers=AUTH, request_id=f"call-{i}", parameters=critical, client_timeout=30
        )

    before = scrape(url)
    try:
        for _ in range(10):  # a burst that happens to find the lane free every time merges nothing: again
            results = await asyncio.gather(*(call(i) for i in range(len(batches))))
            for i, result in enumerate(results):
                assert result.get_response().id == f"call-{i}"
                assert np.allclose(result.as_numpy("score"), expected[i], atol=1e-6), i
            if total(delta(scrape(url), before), "inferline_merged_requests_total", model=MODEL) > 0:
                break
        else:
            pytest.fail("48 concurrent calls, ten times over, were never merged")
    finally:
        await client.close()
