"""Trust boundaries, against a real router (and Envoy, and an internal service) as processes.

No caller can steer admission with the gateway's headers, nor reach the internal services
through the public port; an internal service answers only routers' service tokens.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.utils import InferenceServerException

from inferline.core import headers
from inferline.core.service_auth import AUDIENCE, ISSUER, ROUTER, ServiceTokenSigner
from inferline.internal.v1 import degradation_pb2 as dpb
from inferline.internal.v1 import degradation_pb2_grpc as dpb_grpc
from inferline.stats import Samples, scrape
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.gateway_fixtures import Gateway, start_gateway
from tests.integration.router_fixtures import DEMO_KEY, ROOT, ServerProcess, start_inferline

pytestmark = pytest.mark.requires_triton

AUTH = ("authorization", f"Bearer {DEMO_KEY}")
FORGED = ((headers.INGRESS_TIMEOUT, "99999999S"), (headers.GATEWAY_SECRET, "guessed-secret-guessed"))
FORGED_CALLS = 20
PUBLIC = {
    "inferline.v1.Inference",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _request(traffic_class: str) -> pb.PredictRequest:
    entities = [pb.EntityKey(name="driver_id", int64_value=i) for i in (1001, 1002)]
    return pb.PredictRequest(route="driver_ranking", entities=entities, traffic_class=traffic_class)


def _metrics(router: ServerProcess) -> Samples:
    return scrape(f"http://127.0.0.1:{router.metrics_port}/metrics")


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


@pytest.fixture(scope="module")
def gateway(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with start_gateway({}, router_config, router_server.address, tmp_path_factory.mktemp("trust-gateway")) as gw:
        yield gw


def _assert_served_in_every_class(stub: pb_grpc.InferenceStub) -> None:
    """What the reproduction broke: every class of the demo tenant answered by PRIMARY, none shed."""
    for traffic_class in ("critical", "standard", "batch"):
        for _ in range(5):
            response = stub.Predict(_request(traffic_class), timeout=5, metadata=[AUTH])
            assert response.served_by == pb.SERVED_BY_PRIMARY, (traffic_class, response)


@pytest.mark.parametrize("authenticated", [False, True], ids=["bad-key", "demo-key"])
def test_forged_gateway_headers_from_direct_callers_change_nothing(
    router_server: ServerProcess, authenticated: bool
) -> None:
    before = _metrics(router_server)
    key = AUTH if authenticated else ("authorization", "Bearer not-a-key")
    with grpc.insecure_channel(router_server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(FORGED_CALLS):
            if authenticated:
                response, call = stub.Predict.with_call(_request("critical"), timeout=5, metadata=[key, *FORGED])
                assert response.served_by == pb.SERVED_BY_PRIMARY
                # No overload signal: that is for the gateway's calls only.
                assert headers.OVERLOADED not in dict(call.trailing_metadata() or ())
            else:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Predict(_request("critical"), timeout=5, metadata=[key, *FORGED])
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _assert_served_in_every_class(stub)
    after = _metrics(router_server)
    assert _total(after, "inferline_shed_total") == _total(before, "inferline_shed_total")
    # The reading would have been 99999999 s; ignored, the queue wait stays what the loop alone makes it.
    assert after[("inferline_queue_wait_seconds", ())] < 1.0
    ignored = _total(after, "inferline_untrusted_headers_total", header=headers.INGRESS_TIMEOUT) - _total(
        before, "inferline_untrusted_headers_total", header=headers.INGRESS_TIMEOUT
    )
    # Counted on authenticated calls; an unauthenticated call is refused before any header is read.
    assert ignored == (FORGED_CALLS if authenticated else 0)


def test_through_the_gateway_callers_copies_are_replaced_by_the_gateways(
    router_server: ServerProcess, gateway: Gateway
) -> None:
    before = _metrics(router_server)
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(FORGED_CALLS):
            response, call = stub.Predict.with_call(_request("critical"), timeout=5, metadata=[AUTH, *FORGED])
            assert response.served_by == pb.SERVED_BY_PRIMARY
            # The router took the call for the gateway's (its secret matched): it sent the overload signal.
            assert headers.OVERLOADED in dict(call.trailing_metadata() or ())
        _assert_served_in_every_class(stub)
    after = _metrics(router_server)
    assert _total(after, "inferline_shed_total") == _total(before, "inferline_shed_total")
    assert after[("inferline_queue_wait_seconds", ())] < 1.0
    assert _total(after, "inferline_untrusted_headers_total") == _total(before, "inferline_untrusted_headers_total")


RECORD = "/inferline.internal.v1.Degradation/RecordScores"


def _record(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> dpb.RecordScoresResponse:
    request = dpb.RecordScoresRequest(
        tenant="demo", route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001)], scores=[1]
    )
    return dpb_grpc.DegradationStub(channel).RecordScores(request, timeout=5, metadata=metadata)


@pytest.mark.parametrize("front", ["router", "gateway"])
def test_internal_services_are_not_on_the_public_port(
    router_server: ServerProcess, gateway: Gateway, front: str
) -> None:
    address = router_server.address if front == "router" else gateway.address
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _record(channel, [AUTH])
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        features = channel.unary_unary("/inferline.internal.v1.Features/GetFeatures")
        with pytest.raises(grpc.RpcError) as info:
            features(b"", timeout=5, metadata=[AUTH])
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("path", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
@pytest.mark.parametrize("front", ["router", "gateway"])
def test_reflection_v1_and_v1alpha_list_only_the_public_services(
    router_server: ServerProcess, gateway: Gateway, front: str, path: str
) -> None:
    address = router_server.address if front == "router" else gateway.address
    with grpc.insecure_channel(address) as channel:
        info = channel.stream_stream(
            f"/{path}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        [answer] = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert {s.name for s in answer.list_services_response.service} == PUBLIC


@pytest.fixture(scope="module")
def degradation_service(
    router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """``inferline serve degradation``: the score cache in a process of its own (the suite topology)."""
    log = tmp_path_factory.mktemp("degradation") / "degradation.log"
    server = start_inferline(["serve", "degradation", "--config", str(router_config)], log)
    yield server
    assert server.stop() == 0, server.log_tail()


def _token(role: str, secret: str | None = None, exp_in_s: float = 60) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": role, "iat": now, "exp": now + int(exp_in_s)}
    return jwt.encode(claims, secret or os.environ["INFERLINE_SERVICE_SECRET"], algorithm="HS256")


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        ("none", grpc.StatusCode.UNAUTHENTICATED),
        ("tenant-key", grpc.StatusCode.UNAUTHENTICATED),  # a tenant's key is no service credential
        ("wrong-secret", grpc.StatusCode.UNAUTHENTICATED),
        ("expired", grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-router", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_an_internal_service_refuses_callers_without_a_routers_service_token(
    degradation_service: ServerProcess, credential: str, code: grpc.StatusCode
) -> None:
    tokens = {
        "wrong-secret": _token(ROUTER, secret="x" * 48),
        "expired": _token(ROUTER, exp_in_s=-120),
        "not-a-router": _token("features"),
    }
    metadata = {"none": [], "tenant-key": [AUTH]}.get(credential)
    if metadata is None:
        metadata = [("authorization", f"Bearer {tokens[credential]}")]
    with grpc.insecure_channel(degradation_service.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _record(channel, metadata)
        assert info.value.code() == code, info.value.details()


def test_an_internal_service_answers_a_routers_service_token(degradation_service: ServerProcess) -> None:
    signer = ServiceTokenSigner(os.environ["INFERLINE_SERVICE_SECRET"], ROUTER, lifetime_s=60)
    with grpc.insecure_channel(degradation_service.address) as channel:
        assert _record(channel, [("authorization", f"Bearer {signer.token()}")]) == dpb.RecordScoresResponse()


def test_an_internal_service_without_the_service_secret_does_not_start(router_config: pathlib.Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "INFERLINE_SERVICE_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "serve", "postprocess", "--config", str(router_config)],
        capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "services.secret_env: environment variable INFERLINE_SERVICE_SECRET is not set" in result.stderr
    assert "Traceback" not in result.stderr


class TcpRelay:
    """A TCP relay to ``target`` on a free loopback port, in a thread: ``cut()`` closes it and every
    connection through it, as a network partition from the model server would."""

    def __init__(self, target: str) -> None:
        self._target = target.rsplit(":", 1)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection((self._target[0], int(self._target[1])))
            with self._lock:
                self._sockets += [client, upstream]
                if self._cut:
                    break
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
        self._close_all()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
        # shutdown wakes the thread blocked in accept(); close alone would leave it listening.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()


def test_a_model_server_outage_never_names_its_address(
    triton_server: object, router_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """ModelInfer while Triton is cut off: the caller learns what happened, not where Triton runs."""
    relay = TcpRelay(triton_server.grpc_url)  # type: ignore[attr-defined]
    router = start_inferline(
        ["up", "--no-gateway", "--config", str(router_config), "--triton-url", relay.address], tmp_path / "router.log"
    )
    client = triton_grpc.InferenceServerClient(router.address)
    try:
        rows = np.array([[0.5, 0.8, 500, 3]], np.float32)
        tensor = triton_grpc.InferInput("features", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        auth = {"authorization": AUTH[1]}
        assert client.infer("driver_ranker", [tensor], headers=auth, client_timeout=5).as_numpy("score") is not None
        relay.cut()
        with pytest.raises(InferenceServerException) as info:
            client.infer("driver_ranker", [tensor], headers=auth, client_timeout=5)
    finally:
        client.close()
        assert router.stop() == 0, router.log_tail()
    message = str(info.value.message())
    assert str(info.value.status()) == "StatusCode.UNAVAILABLE", message
    port = relay.address.rsplit(":", 1)[1]
    assert port not in message and "127.0.0.1" not in message and "ipv4:" not in message, message
