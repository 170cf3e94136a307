"""Predict through a real Envoy (``inferline gateway render``) in front of a real router and Triton."""

from __future__ import annotations

import datetime
import pathlib
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferline.bench.gateway_log import read_access_log
from inferline.core import headers
from inferline.gateway import SHED_MESSAGE, STAT_PREFIX, TRAFFIC_CLASS_HEADER
from inferline.gateway.render import (
    ADAPTIVE_SHED_MESSAGE,
    IN_FLIGHT_SHED_MESSAGE,
    KSERVE_CLUSTER,
    ROUTER_CLUSTER,
    SIGNAL_SHED_MESSAGE,
)
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.gateway_fixtures import Gateway, start_gateway
from tests.integration.router_fixtures import (
    DEMO_KEY,
    FUNCTIONAL_BUDGETS,
    FUNCTIONAL_QUEUE_WAIT_MS,
    ServerProcess,
    start_router,
    write_test_config,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.requires_triton

AUTH = ("authorization", f"Bearer {DEMO_KEY}")
REJECTED = f"http.{STAT_PREFIX}.admission_control.rq_rejected"
SIGNAL_SHED = {"shed_by": "signal", "shed": {"batch": {}, "standard": {}}}
"""Gateway settings: shed batch and standard on the routers' overload signal."""


@pytest.fixture(scope="module")
def gateway(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``router_server``, shedding ``batch`` on its success rate over a 2 s window."""
    shed = {"shed_by": "success_rate", "shed": {"batch": {"window_s": 2.0, "aggression": 1.0}}}
    with start_gateway(shed, router_config, router_server.address, tmp_path_factory.mktemp("gateway")) as gateway:
        yield gateway


@pytest.fixture
def stub(gateway: Gateway) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(gateway.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def _request(traffic_class: str = "") -> pb.PredictRequest:
    entity = pb.EntityKey(name="driver_id", int64_value=1001)
    return pb.PredictRequest(route="driver_ranking", entities=[entity], traffic_class=traffic_class)


def _metadata(traffic_class: str) -> tuple[tuple[str, str], ...]:
    return (AUTH, (TRAFFIC_CLASS_HEADER, traffic_class))


def _outcomes(stub: pb_grpc.InferenceStub, traffic_class: str, n: int) -> Counter[str]:
    """``n`` calls of ``traffic_class``, counted as "OK" or "CODE: details"."""
    codes = Counter[str]()
    for _ in range(n):
        try:
            stub.Predict(_request(traffic_class), metadata=_metadata(traffic_class), timeout=2)
            codes["OK"] += 1
        except grpc.RpcError as err:
            codes[f"{err.code().name}: {err.details()}"] += 1
    return codes


def test_predict_through_envoy_is_answered_by_the_primary(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=2)
    assert response.served_by == pb.SERVED_BY_PRIMARY


def test_requests_without_a_class_header_take_the_default_route(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Predict(_request(), metadata=(AUTH,), timeout=2)
    assert response.served_by == pb.SERVED_BY_PRIMARY


def test_short_deadline_through_envoy_degrades_or_expires(stub: pb_grpc.InferenceStub) -> None:
    codes = Counter[str]()
    for _ in range(10):
        try:
            response = stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=0.012)
            codes[pb.ServedBy.Name(response.served_by).removeprefix("SERVED_BY_")] += 1
        except grpc.RpcError as err:
            codes[err.code().name] += 1
    assert set(codes) <= {"PRIMARY", "LIGHT", "CACHE", "BASELINE", "DEADLINE_EXCEEDED"}, codes


def test_auth_errors_pass_through(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(_request("critical"), metadata=((TRAFFIC_CLASS_HEADER, "critical"),), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_failing_batch_is_shed_by_envoy_while_critical_is_served(gateway: Gateway, stub: pb_grpc.InferenceStub) -> None:
    # 4 ms is under the route's 5 ms fallback reserve: the router refuses at once with
    # DEADLINE_EXCEEDED, a failure in batch's success rate; Envoy soon sheds some of these.
    failing = Counter[str]()
    for _ in range(40):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(_request("batch"), metadata=_metadata("batch"), timeout=0.004)
        failing[caught.value.code().name] += 1
    assert set(failing) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, failing
    rejected_before = gateway.stat(REJECTED)
    codes = _outcomes(stub, "batch", 20)
    # Envoy rejects most (P ≤ max_rejection_probability) and says so as RESOURCE_EXHAUSTED.
    assert codes[f"RESOURCE_EXHAUSTED: {SHED_MESSAGE}"] >= 5, codes
    assert set(codes) <= {"OK", f"RESOURCE_EXHAUSTED: {SHED_MESSAGE}"}, codes
    assert gateway.stat(REJECTED) - rejected_before == codes[f"RESOURCE_EXHAUSTED: {SHED_MESSAGE}"]
    for _ in range(5):  # another class's window is untouched
        response = stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=2)
        assert response.served_by == pb.SERVED_BY_PRIMARY


# --- REST callers ------------------------------------------------------------------------


PREDICT_PATH = "/inferline.v1.Inference/Predict"
REST_PREDICT = {"route": "driver_ranking", "entities": [{"name": "driver_id", "int64Value": "1001"}]}


def test_rest_callers_post_json_and_get_the_same_answer_as_grpc(gateway: Gateway, stub: pb_grpc.InferenceStub) -> None:
    status, answer = gateway.post_json(PREDICT_PATH, REST_PREDICT, authorization=AUTH[1])
    assert status == 200, answer
    assert answer["servedBy"] == "SERVED_BY_PRIMARY"
    grpc_answer = stub.Predict(_request(), metadata=(AUTH,), timeout=5)
    assert [p["entity"]["int64Value"] for p in answer["predictions"]] == ["1001"]
    assert answer["predictions"][0]["score"] == pytest.approx(grpc_answer.predictions[0].score)


def test_rest_errors_carry_the_grpc_status_and_its_details(gateway: Gateway) -> None:
    status, answer = gateway.post_json(PREDICT_PATH, REST_PREDICT)  # no key
    assert status == 401 and answer["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0], answer
    status, answer = gateway.post_json(PREDICT_PATH, {**REST_PREDICT, "route": "no_such_route"}, authorization=AUTH[1])
    assert status == 404 and answer["code"] == grpc.StatusCode.NOT_FOUND.value[0], answer
    assert any(d.get("reason") == "ROUTE_NOT_FOUND" for d in answer.get("details", [])), answer


def test_rest_reaches_only_the_public_api(gateway: Gateway) -> None:
    # The internal services are neither transcoded nor routed: a JSON POST to one is refused
    # by Envoy itself, never forwarded (no upstream time on the answer), and as an unknown
    # path (404) whatever this module's earlier tests did: their batch failures spend the
    # success-rate window, but no shed filter runs on a path that is not ours.
    request = urllib.request.Request(
        f"http://{gateway.address}/inferline.internal.v1.Features/GetFeatures",
        data=b"{}",
        headers={"content-type": "application/json", "authorization": AUTH[1]},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    with refused.value:
        assert refused.value.code == 404, refused.value.code
        assert refused.value.headers.get("x-envoy-upstream-service-time") is None  # no router answered


# --- shedding on the router's own overload signal -----------------------------------------


@pytest.fixture(scope="module")
def overloaded_router(
    triton_server: object, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A router whose admission always refuses ``batch``: its queue-wait target is 1 µs, under any loop lag."""
    env = {"INFERLINE_TRAFFIC_CLASSES__BATCH__QUEUE_WAIT_TARGET_MS": "0.001"}
    server = start_router(triton_server, router_config, tmp_path_factory.mktemp("overloaded-router"), env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def signal_gateway(
    overloaded_router: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``overloaded_router``, shedding batch and standard on the router's
    signal, with its access log of its own answers (``_access_log``)."""
    tmp_path = tmp_path_factory.mktemp("signal-gateway")
    settings = {**SIGNAL_SHED, "access_log": {"path": str(tmp_path / ACCESS_LOG)}}
    with start_gateway(settings, router_config, overloaded_router.address, tmp_path) as gateway:
        yield gateway


ACCESS_LOG = "access.log"


def _access_log(gateway: Gateway) -> list[dict[str, Any]]:
    """The lines of a gateway's access log (``gateway.access_log``), beside its Envoy log; a
    line Envoy is still writing is left for the next read."""
    return read_access_log(gateway.log_path.parent / ACCESS_LOG)


def _metrics_text(server: ServerProcess) -> str:
    """The router's Prometheus exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _overloaded_trailer(call: grpc.Call) -> str | bytes | None:
    return dict(call.trailing_metadata() or ()).get(headers.OVERLOADED)


def test_router_answers_through_the_gateway_carry_its_overload_signal(
    signal_gateway: Gateway, overloaded_router: ServerProcess
) -> None:
    with grpc.insecure_channel(signal_gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        response, call = stub.Predict.with_call(_request("critical"), metadata=_metadata("critical"), timeout=2)
        with pytest.raises(grpc.RpcError) as unauthenticated:
            stub.Predict(_request("critical"), metadata=((TRAFFIC_CLASS_HEADER, "critical"),), timeout=2)
    assert response.served_by == pb.SERVED_BY_PRIMARY
    # The router read the gateway's copy of the grpc-timeout (or it would send no signal).
    assert _overloaded_trailer(call) == "batch"
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _overloaded_trailer(unauthenticated.value) is None  # type: ignore[arg-type]  # not for strangers
    with grpc.insecure_channel(overloaded_router.address) as channel:  # a direct caller gets no signal
        _, direct = pb_grpc.InferenceStub(channel).Predict.with_call(
            _request("critical"), metadata=_metadata("critical"), timeout=2
        )
    assert _overloaded_trailer(direct) is None


@pytest.fixture(scope="module")
def protecting_router(triton_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A router with the default ``admission.protected_miss_rate`` (the functional config turns it off)."""
    tmp_path = tmp_path_factory.mktemp("protecting-router")
    config = write_test_config(
        tmp_path / "inferline.yaml", budgets=FUNCTIONAL_BUDGETS, queue_wait_target_ms=FUNCTIONAL_QUEUE_WAIT_MS
    )
    server = start_router(triton_server, config, tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def protecting_gateway(
    protecting_router: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``protecting_router``, shedding batch and standard on the router's signal."""
    tmp_path = tmp_path_factory.mktemp("protecting-gateway")
    with start_gateway(SIGNAL_SHED, router_config, protecting_router.address, tmp_path) as gateway:
        yield gateway


def test_critical_calls_with_deadlines_too_short_for_any_router_never_make_it_shed_the_lower_classes(
    protecting_gateway: Gateway, protecting_router: ServerProcess
) -> None:
    # What the demo does, and what any tenant allowed critical could do on purpose: deadlines
    # the main path cannot meet on an idle router. Every one misses; none is the lower classes'
    # doing (nothing queued), so no other tenant's standard or batch call may be shed for them.
    # (AdmissionController's own tests count misses that queueing explains.)
    with grpc.insecure_channel(protecting_router.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        # 4 ms: less than the route's fallback reserve (5 ms), so not even a degraded answer comes.
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as late:
                stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=0.004)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Predict(_request("standard"), metadata=_metadata("standard"), timeout=2).predictions
    with grpc.insecure_channel(protecting_gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        # And through the gateway: 10 ms, answered from the cache for the deadline, or late when
        # the machine is busy (a full CI run saw DEADLINE_EXCEEDED): either way a miss.
        outcomes = Counter[str]()
        for _ in range(20):
            try:
                stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=0.010)
                outcomes["answered"] += 1
            except grpc.RpcError as err:
                outcomes[err.code().name] += 1
        assert set(outcomes) <= {"answered", "DEADLINE_EXCEEDED"}, outcomes
        _, after = stub.Predict.with_call(_request("critical"), metadata=_metadata("critical"), timeout=2)
        assert stub.Predict(_request("batch"), metadata=_metadata("batch"), timeout=2).predictions
    assert _overloaded_trailer(after) == ""  # the gateway is told to shed nothing
    rates = [
        float(line.rsplit(" ", 1)[1])
        for line in _metrics_text(protecting_router).splitlines()
        if line.startswith('inferline_protected_miss_rate{route="driver_ranking"}')
    ]
    assert rates == [0.0]


def test_kserve_critical_calls_with_deadlines_too_short_for_any_router_never_make_it_shed_the_lower_classes(
    protecting_router: ServerProcess,
) -> None:
    rows = np.array([[0.5, 0.8, 500, 3]], np.float32)

    def infer(traffic_class: str, timeout_s: float) -> Any:
        tensor = triton_grpc.InferInput("features", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        headers = {"authorization": f"Bearer {DEMO_KEY}", TRAFFIC_CLASS_HEADER: traffic_class}
        return client.infer("driver_ranker", [tensor], headers=headers, client_timeout=timeout_s)

    client = triton_grpc.InferenceServerClient(protecting_router.address)
    try:
        # 1 ms: no more than the front door keeps for its answer, so no model call fits.
        for _ in range(20):
            with pytest.raises(InferenceServerException) as late:
                infer("critical", 0.001)
            assert str(late.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
        assert infer("standard", 5).as_numpy("score").shape == (1, 1)
        assert infer("batch", 5).as_numpy("score").shape == (1, 1)
    finally:
        client.close()


def test_gateway_sheds_the_class_the_router_names_and_forwards_the_others(
    signal_gateway: Gateway, overloaded_router: ServerProcess
) -> None:
    aborts = f"http.{STAT_PREFIX}.fault.batch.aborts_injected"
    with grpc.insecure_channel(signal_gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(30):  # each answer names batch: Envoy's batch shed probability climbs to its cap
            stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=2)
        before = signal_gateway.stat(aborts)
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(milliseconds=1)  # Envoy logs whole ms
        batch = _outcomes(stub, "batch", 50)
        standard = Counter[str]()
        for _ in range(20):
            response = stub.Predict(_request("standard"), metadata=_metadata("standard"), timeout=2)
            standard[pb.ServedBy.Name(response.served_by)] += 1
    by_gateway = batch[f"RESOURCE_EXHAUSTED: {SIGNAL_SHED_MESSAGE}"]
    # P = 0.99 once capped: nearly every batch call is turned away by Envoy. The few it lets
    # through are answered: the gateway bounds batch in flight, so the router leaves batch's
    # queue wait (over its 1 µs target) to the gateway rather than shed calls that waited.
    assert by_gateway >= 40, batch
    assert set(batch) <= {f"RESOURCE_EXHAUSTED: {SIGNAL_SHED_MESSAGE}", "OK"}, batch
    assert signal_gateway.stat(aborts) - before == by_gateway  # counted per class in Envoy's stats
    assert standard == {"SERVED_BY_PRIMARY": 20}  # the router never named standard
    # Each shed is in the access log (Envoy writes it out within seconds): its class, why, how long
    # Envoy took; the calls the router answered are not.
    wait_until(lambda: len(_sheds(signal_gateway, since)) >= by_gateway, f"{by_gateway} sheds in the access log", 10)
    sheds = _sheds(signal_gateway, since)
    assert len(sheds) == by_gateway
    assert {(s["traffic_class"], s["grpc_status"], s["path"]) for s in sheds} == {
        ("batch", 8, "/inferline.v1.Inference/Predict")
    }
    assert all(isinstance(s["duration_ms"], int) and s["duration_ms"] < 1000 for s in sheds)
    assert not [line for line in _access_log(signal_gateway) if line["details"] == "via_upstream"]
    with grpc.insecure_channel(overloaded_router.address) as channel:  # a direct call has no gateway to bound it
        direct = _outcomes(pb_grpc.InferenceStub(channel), "batch", 3)
    assert all(k.startswith("RESOURCE_EXHAUSTED: route 'driver_ranking' is overloaded") for k in direct), direct


def _sheds(gateway: Gateway, since: datetime.datetime) -> list[dict[str, Any]]:
    """The gateway's sheds on the routers' signal logged from ``since`` on."""
    return [
        line
        for line in _access_log(gateway)
        if line["details"] == "fault_filter_abort" and datetime.datetime.fromisoformat(line["start_time"]) >= since
    ]


def _infer(client: triton_grpc.InferenceServerClient, model: str, width: int, traffic_class: str) -> str:
    """One KServe ModelInfer call of ``model`` (``width`` features) in ``traffic_class``: "OK" or "CODE: message"."""
    tensor = triton_grpc.InferInput("features", [1, width], "FP32")
    tensor.set_data_from_numpy(np.full((1, width), 0.5, np.float32))
    metadata = {AUTH[0]: AUTH[1], TRAFFIC_CLASS_HEADER: traffic_class}
    try:
        client.infer(model, [tensor], headers=metadata, client_timeout=5)
    except InferenceServerException as err:
        return f"{str(err.status()).removeprefix('StatusCode.')}: {err.message()}"
    return "OK"


def test_gateway_sheds_the_kserve_model_the_router_names_and_not_another_model(signal_gateway: Gateway) -> None:
    # The routers admit KServe calls per model, and the gateway keys its shedding by the model
    # it reads off the request body: one model's signal must not shed another model's calls.
    client = triton_grpc.InferenceServerClient(signal_gateway.address)
    try:
        for _ in range(30):  # each answer names batch for driver_ranker's admission: its probability climbs
            assert _infer(client, "driver_ranker", 4, "critical") == "OK"
        ranker = Counter(_infer(client, "driver_ranker", 4, "batch") for _ in range(50))
        # The same channel, so the same Envoy worker (the shed state is per worker): the light
        # model has had no answer yet, so its probability is exactly 0 and nothing is shed.
        light = _infer(client, "driver_ranker_light", 2, "batch")
    finally:
        client.close()
    assert ranker[f"RESOURCE_EXHAUSTED: {SIGNAL_SHED_MESSAGE}"] >= 40, ranker
    assert set(ranker) <= {f"RESOURCE_EXHAUSTED: {SIGNAL_SHED_MESSAGE}", "OK"}, ranker
    assert light == "OK"


# --- the in-flight bound --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_gateway(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``router_server`` holding at most one batch request at the router (fixed cap)."""
    bounded = {"shed_by": "signal", "shed": {"batch": {}}, "in_flight": {"adaptive": False, "max_per_router": 1}}
    with start_gateway(bounded, router_config, router_server.address, tmp_path_factory.mktemp("bounded")) as gateway:
        yield gateway


def _burst(stub: pb_grpc.InferenceStub, traffic_class: str, n: int, *, header: bool = True) -> Counter[str]:
    """``n`` calls of ``traffic_class`` (with the class header, or without), all in flight at once,
    counted as "OK" or "CODE: details"."""
    metadata = _metadata(traffic_class) if header else (AUTH,)
    return _settle([stub.Predict.future(_request(traffic_class), metadata=metadata, timeout=5) for _ in range(n)])


def _settle(calls: list[Any]) -> Counter[str]:
    """Wait for every call (grpc futures): each counted as "OK" or "CODE: details"."""
    codes = Counter[str]()
    for call in calls:
        try:
            call.result()
            codes["OK"] += 1
        except grpc.RpcError as err:
            codes[f"{err.code().name}: {err.details()}"] += 1
    return codes


@pytest.fixture(scope="module")
def adaptive_gateway(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``router_server`` with the adaptive in-flight limit on batch (the default).

    A fresh gradient controller first measures the router's unloaded latency, holding batch
    to ``min_concurrency`` (2 here) until ``min_rtt_requests`` (200) answers came back.
    """
    in_flight = {"min_concurrency": 2, "min_rtt_requests": 200}
    adaptive = {"shed_by": "signal", "shed": {"batch": {}}, "in_flight": in_flight}
    with start_gateway(adaptive, router_config, router_server.address, tmp_path_factory.mktemp("adaptive")) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("gateway_fixture", "counter", "message", "slots"),
    [
        ("bounded_gateway", "cluster.inferline_router.upstream_rq_active_overflow", IN_FLIGHT_SHED_MESSAGE, 1),
        (
            "adaptive_gateway",
            f"http.{STAT_PREFIX}.adaptive_concurrency.gradient_controller.rq_blocked",
            ADAPTIVE_SHED_MESSAGE,
            2,
        ),
    ],
    ids=["fixed_cap", "adaptive"],
)
def test_in_flight_limit_refuses_a_burst_of_a_shed_class_but_never_the_others(
    request: pytest.FixtureRequest, gateway_fixture: str, counter: str, message: str, slots: int
) -> None:
    gateway: Gateway = request.getfixturevalue(gateway_fixture)
    refused = f"RESOURCE_EXHAUSTED: {message}"
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert _outcomes(stub, "batch", 3) == {"OK": 3}  # one at a time fits under any limit
        before = gateway.stat(counter)
        batch = _burst(stub, "batch", 30)
        critical = _burst(stub, "critical", 30)
        unnamed = _burst(stub, "batch", 30, header=False)
    for burst in (batch, unnamed):
        assert set(burst) <= {"OK", refused}, burst
        assert burst["OK"] >= slots and burst[refused] >= 10, burst  # 30 at once against a limit of `slots`
    # Calls without the class header are limited as the shed classes are: leaving it out buys nothing.
    assert gateway.stat(counter) - before == batch[refused] + unnamed[refused]
    # Named critical: HIGH priority, its route has the adaptive limit off; never held.
    assert critical == {"OK": 30}


@pytest.fixture(scope="module", params=["predict", "kserve"])
def one_door_capped(
    request: pytest.FixtureRequest,
    router_server: ServerProcess,
    router_config: pathlib.Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Gateway]]:
    """Envoy in front of ``router_server`` with a fixed cap of 1 on one front door ("predict" or
    "kserve", the param) and 1,000 on the other."""
    caps = (1, 1000) if request.param == "predict" else (1000, 1)
    in_flight = {"adaptive": False, "max_per_router": caps[0], "kserve_max_per_router": caps[1]}
    settings = {"shed_by": "signal", "shed": {"batch": {}}, "in_flight": in_flight}
    with start_gateway(settings, router_config, router_server.address, tmp_path_factory.mktemp("capped")) as gateway:
        yield request.param, gateway


def _kserve_burst(channel: grpc.Channel, traffic_class: str, n: int) -> Counter[str]:
    """``n`` KServe ModelInfer calls of ``driver_ranker`` in ``traffic_class``, all in flight at once."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[1, 4])
    request = service_pb2.ModelInferRequest(
        model_name="driver_ranker", inputs=[tensor], raw_input_contents=[np.full((1, 4), 0.5, np.float32).tobytes()]
    )
    return _settle([stub.ModelInfer.future(request, metadata=_metadata(traffic_class), timeout=5) for _ in range(n)])


def test_each_front_door_has_an_in_flight_cap_of_its_own(one_door_capped: tuple[str, Gateway]) -> None:
    # KServe calls reach the routers through a cluster of their own: a burst on one front door
    # is held by its own cap only, and never uses up the other's.
    capped, gateway = one_door_capped
    overflow = {
        "predict": f"cluster.{ROUTER_CLUSTER}.upstream_rq_active_overflow",
        "kserve": f"cluster.{KSERVE_CLUSTER}.upstream_rq_active_overflow",
    }
    before = {door: gateway.stat(counter) for door, counter in overflow.items()}
    with grpc.insecure_channel(gateway.address) as channel:
        bursts = {
            "predict": _burst(pb_grpc.InferenceStub(channel), "batch", 30),
            "kserve": _kserve_burst(channel, "batch", 30),
        }
        critical = _kserve_burst(channel, "critical", 30)
    refused = f"RESOURCE_EXHAUSTED: {IN_FLIGHT_SHED_MESSAGE}"
    [uncapped] = set(bursts) - {capped}
    assert bursts[capped]["OK"] >= 1 and bursts[capped][refused] >= 10, bursts
    assert refused not in bursts[uncapped], bursts
    assert gateway.stat(overflow[capped]) - before[capped] == bursts[capped][refused]
    assert gateway.stat(overflow[uncapped]) == before[uncapped]
    assert critical == {"OK": 30}  # HIGH priority: never held on either front door


@pytest.fixture(scope="module")
def kserve_protected_capped(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Envoy in front of ``router_server`` holding at most one critical KServe call at the router."""
    in_flight = {"adaptive": False, "kserve_protected_max_per_router": 1}
    settings = {"shed_by": "signal", "shed": {"batch": {}}, "in_flight": in_flight}
    path = tmp_path_factory.mktemp("protected")
    with start_gateway(settings, router_config, router_server.address, path) as gateway:
        yield gateway


def test_critical_kserve_calls_over_their_cap_are_refused_at_once_and_predict_is_not(
    kserve_protected_capped: Gateway,
) -> None:
    # A tensor call has no degraded answer: past the cap, a critical one is refused by the
    # gateway rather than left to wait in the router's transport; Predict's critical calls,
    # which degrade instead, stay unbounded.
    gateway = kserve_protected_capped
    counter = f"cluster.{KSERVE_CLUSTER}.upstream_rq_active_overflow"
    before = gateway.stat(counter)
    with grpc.insecure_channel(gateway.address) as channel:
        kserve = _kserve_burst(channel, "critical", 30)
        predict = _burst(pb_grpc.InferenceStub(channel), "critical", 30)
    refused = f"RESOURCE_EXHAUSTED: {IN_FLIGHT_SHED_MESSAGE}"
    assert set(kserve) <= {"OK", refused} and kserve["OK"] >= 1 and kserve[refused] >= 10, kserve
    assert gateway.stat(counter) - before == kserve[refused]
    assert predict == {"OK": 30}


# --- several router replicas, one of them restarted -------------------------------------

DRAIN_S = 10.0


@pytest.fixture(scope="module")
def second_router(
    triton_server: object, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Another ``inferline up`` replica on the session's Triton, draining up to 10 s (the test stops it)."""
    env = {"INFERLINE_SERVER__DRAIN_S": str(DRAIN_S)}
    server = start_router(triton_server, router_config, tmp_path_factory.mktemp("second-router"), env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair_gateway(
    router_server: ServerProcess,
    second_router: ServerProcess,
    router_config: pathlib.Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """Envoy balancing over ``router_server`` and ``second_router``."""
    routers = [router_server.address, second_router.address]
    with start_gateway({}, router_config, routers, tmp_path_factory.mktemp("pair")) as gateway:
        yield gateway


def _predictions_served(server: ServerProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in _metrics_text(server).splitlines()
        if line.startswith("inferline_requests_total{") and 'route="driver_ranking"' in line and 'code="OK"' in line
    )


def test_a_router_replica_stopping_behind_the_gateway_loses_no_call(
    pair_gateway: Gateway, router_server: ServerProcess, second_router: ServerProcess
) -> None:
    before = [_predictions_served(router_server), _predictions_served(second_router)]
    with grpc.insecure_channel(pair_gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert _outcomes(stub, "critical", 20) == {"OK": 20}
        # Requests, not connections, are balanced: both replicas answered some.
        assert _predictions_served(router_server) > before[0]
        assert _predictions_served(second_router) > before[1]

        outcomes = Counter[str]()
        stopping = threading.Event()

        def call_until_stopped() -> None:
            while not stopping.is_set():
                outcomes.update(_outcomes(stub, "critical", 1))

        callers = [threading.Thread(target=call_until_stopped) for _ in range(4)]
        for caller in callers:
            caller.start()
        try:
            time.sleep(1.0)
            # SIGTERM: NOT_SERVING; the gateway's health checks take the replica out of rotation;
            # once no call came for drain_quiet_s (1 s), it stops, with grace for calls in flight.
            stop_started = time.monotonic()
            code = second_router.stop(timeout_s=DRAIN_S + 10)
            stopped_in_s = time.monotonic() - stop_started
            served_while_stopping = outcomes["OK"]
            time.sleep(1.5)  # the gateway keeps answering from the replica left
        finally:
            stopping.set()
            for caller in callers:
                caller.join()
    assert code == 0, second_router.log_tail()
    assert set(outcomes) == {"OK"}, outcomes  # no call failed while a replica went away
    assert 1.0 < stopped_in_s < DRAIN_S - 2, second_router.log_tail()  # quiet soon after the gateway noticed
    assert outcomes["OK"] > served_while_stopping > 0


def test_connections_past_the_gateways_limit_are_refused_and_the_open_ones_keep_working(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """``gateway.max_connections``: a flood of connections cannot take what the open ones need."""
    with start_gateway({"max_connections": 2}, router_config, router_server.address, tmp_path) as gateway:
        # Each channel its own connection (a local subchannel pool), none waiting for a ready one.
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(gateway.address, options=own_connection) for _ in range(3)]
        try:
            stubs = [pb_grpc.InferenceStub(channel) for channel in channels]

            def predict(stub: pb_grpc.InferenceStub) -> int:
                return int(stub.Predict(_request("critical"), metadata=_metadata("critical"), timeout=5).served_by)

            assert [predict(stubs[0]), predict(stubs[1])] == [pb.SERVED_BY_PRIMARY] * 2
            with pytest.raises(grpc.RpcError) as refused:
                predict(stubs[2])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            port = gateway.address.rsplit(":", 1)[1]  # the listener binds 0.0.0.0 (render_envoy's default host)
            overflow = gateway.stat(f"listener.0.0.0.0_{port}.downstream_global_cx_overflow")
            assert overflow >= 1  # refused at accept by the limit, not by anything else
            assert [predict(stubs[0]), predict(stubs[1])] == [pb.SERVED_BY_PRIMARY] * 2
        finally:
            for channel in channels:
                channel.close()
        assert "no configured limit to the number of allowed active downstream connections" not in (
            gateway.log_path.read_text()
        )
