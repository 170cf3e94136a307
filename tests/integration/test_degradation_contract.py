"""One contract suite for both DegradationClient implementations, on the real default config.

``local`` calls DegradationService in-process; ``grpc`` goes through a real grpc.aio server
on an ephemeral port running DegradationServicer. Both use the in-memory cache and the
in-process ONNX light model that ``deploy/local/inferline.yaml`` configures.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from inferline.core.config import InferlineConfig, load_config
from inferline.core.deadline import Deadline
from inferline.core.entities import EntityId
from inferline.core.errors import InferlineError, InvalidInput, RouteNotFound
from inferline.core.ports import free_port
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation import (
    DegradationClient,
    DegradationService,
    DegradedAnswer,
    GrpcDegradationClient,
    LocalDegradationClient,
    build_degradation_service,
)
from inferline.degradation.servicer import DegradationServicer
from inferline.features.vector import FeatureVector
from inferline.internal.v1 import degradation_pb2_grpc
from tests.waiting import WITHIN_S

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUTE = "driver_ranking"
TENANT = "demo"
NAMES = ("conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km")


@pytest.fixture(scope="module")
def config() -> InferlineConfig:
    return load_config(ROOT / "deploy/local/inferline.yaml")


@pytest.fixture
async def service(config: InferlineConfig) -> AsyncIterator[DegradationService]:
    svc = build_degradation_service(config, None)
    yield svc
    await svc.close()


@pytest.fixture(params=["local", "grpc"])
async def client(
    request: pytest.FixtureRequest, service: DegradationService, config: InferlineConfig
) -> AsyncIterator[DegradationClient]:
    if request.param == "local":
        yield LocalDegradationClient(service)
        return
    server = grpc.aio.server()
    degradation_pb2_grpc.add_DegradationServicer_to_server(DegradationServicer(service, config.routes), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc_client = GrpcDegradationClient(channel, config.routes)
            yield grpc_client
            await grpc_client.close()
    finally:
        await server.stop(None)


def deadline() -> Deadline:
    return Deadline.after(5.0)


def vector(rows: list[list[float]], names: Sequence[str] = NAMES) -> FeatureVector:
    values = np.array(rows, dtype=np.float32)
    return FeatureVector(tuple(names), values, np.zeros(values.shape, np.bool_), False)


async def degrade(
    client: DegradationClient,
    ids: Sequence[EntityId],
    features: FeatureVector | None = None,
    reason: Reason = Reason.DEADLINE,
    tenant: str = TENANT,
) -> DegradedAnswer:
    return await client.degrade(tenant, ROUTE, ids, features, reason, deadline=deadline())


async def eventually_cached(client: DegradationClient, ids: Sequence[EntityId], tenant: str = TENANT) -> DegradedAnswer:
    """``record`` is fire and forget: poll until the write has landed (``WITHIN_S`` at most: a hang, not slowness)."""
    deadline = time.monotonic() + WITHIN_S
    while (answer := await degrade(client, ids, tenant=tenant)).served_by is not ServedBy.CACHE:
        assert time.monotonic() < deadline, f"recorded scores never served from cache; last answer {answer}"
        await asyncio.sleep(0.01)
    return answer


def assert_status(err: InferlineError, code: grpc.StatusCode) -> None:
    """The domain error carries ``code``; over gRPC it also came back with that status."""
    assert err.code == code
    if isinstance(err.__cause__, grpc.aio.AioRpcError):
        assert err.__cause__.code() == code


async def test_recorded_scores_come_back_from_cache(client: DegradationClient) -> None:
    client.record(TENANT, ROUTE, [1001, 1002], np.array([0.875, 0.125], np.float32))
    answer = await eventually_cached(client, [1002, 1001])
    assert answer.scores.dtype == np.float32
    assert answer.scores.tolist() == [0.125, 0.875]
    assert answer.model_name == ""
    assert 0 <= answer.cache_age_ms < 5000


async def test_recorded_scores_stay_with_their_tenant(client: DegradationClient) -> None:
    client.record(TENANT, ROUTE, [2001], [0.9])
    await eventually_cached(client, [2001])
    answer = await degrade(client, [2001], tenant="another")
    assert answer.served_by is ServedBy.BASELINE


async def test_unknown_entity_with_features_is_scored_by_light_model(
    client: DegradationClient, config: InferlineConfig
) -> None:
    features = vector([[0.1, 0.9, 300.0, 2.0], [0.8, 0.4, 900.0, 12.0]])
    answer = await degrade(client, [99, 98], features)
    light = config.routes[ROUTE].light
    assert light is not None
    assert (answer.served_by, answer.model_name) == (ServedBy.LIGHT, light.model)
    path = config.triton.model_repository / light.model / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = features.select(light.features).values
    direct = session.run(None, {session.get_inputs()[0].name: inputs})[0].reshape(-1)
    np.testing.assert_array_equal(answer.scores, direct)


async def test_features_degraded_prefers_light_model_over_cache(client: DegradationClient) -> None:
    client.record(TENANT, ROUTE, [3001], [0.5])
    await eventually_cached(client, [3001])
    answer = await degrade(client, [3001], vector([[0.1, 0.9, 300.0, 2.0]]), Reason.FEATURES_DEGRADED)
    assert answer.served_by is ServedBy.LIGHT


async def test_no_features_and_no_cache_gives_constant_baseline(client: DegradationClient) -> None:
    answer = await degrade(client, [41, 42])
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.6, 0.6])  # baseline.score
    assert (answer.model_name, answer.cache_age_ms) == ("", 0.0)


async def test_segment_feature_only_gives_baseline_per_segment(client: DegradationClient) -> None:
    only_segment = vector([[0.1], [0.3], [0.5], [0.9]], names=["conv_rate"])  # not enough for the light model
    answer = await degrade(client, [51, 52, 53, 54], only_segment)
    assert answer.served_by is ServedBy.BASELINE
    np.testing.assert_allclose(answer.scores, [0.25, 0.45, 0.45, 0.6])  # below 0.3, below 0.6, else


async def test_unknown_route_is_not_found(client: DegradationClient) -> None:
    with pytest.raises(RouteNotFound) as err:
        await client.degrade(TENANT, "no_such_route", [1], None, Reason.DEADLINE, deadline=deadline())
    assert_status(err.value, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(RouteNotFound):
        client.record(TENANT, "no_such_route", [1], [0.5])


async def test_bad_requests_are_invalid_argument(client: DegradationClient) -> None:
    with pytest.raises(InvalidInput) as err:
        await degrade(client, [1, 2], vector([[0.1, 0.9, 300.0, 2.0]]))  # one feature row, two entities
    assert_status(err.value, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidInput) as err:
        await degrade(client, ["1001"])  # the route's key is int64
    assert_status(err.value, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidInput):
        client.record(TENANT, ROUTE, [1, 2], [0.5])


async def test_grpc_record_to_unreachable_service_is_counted_not_raised(config: InferlineConfig) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:  # nothing listens there
        client = GrpcDegradationClient(channel, config.routes)
        client.record(TENANT, ROUTE, [1], [0.5])
        await client.close()  # waits for the background call
        assert (client.record_errors, client.records_dropped) == (1, 0)
        with pytest.raises(InferlineError) as err:
            await degrade(client, [1])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE  # DependencyUnavailable: the caller degrades locally
