"""Every hop over TLS, as real processes: client → Envoy → router → features service and → Triton.

One stack per module, every server requiring client certificates signed by the test CA
(mutual TLS): the bundled Triton serving gRPC over SSL (``triton.server_tls``), an
``inferline serve features`` process and an ``inferline serve router`` process
(``server.tls``; the router reaches both with ``services.tls`` / ``triton.tls``), and an
Envoy with a TLS listener and mutual TLS to the router (``gateway.tls`` /
``gateway.upstream_tls``). Certificates come from ``tests.tls_certs``.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferline.bench import harness
from inferline.core import tls
from inferline.core.config import TlsClientConfig, TlsServerConfig, TritonConfig
from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_ports
from inferline.triton.launcher import TritonLauncher
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.gateway_fixtures import Gateway, start_gateway
from tests.integration.router_fixtures import DEMO_KEY, ROOT, write_test_config
from tests.tls_certs import TlsCerts, tls_certs

__all__ = ["tls_certs"]  # the session fixture, re-exported for pytest

pytestmark = pytest.mark.requires_triton

ENVOY = ROOT / ".venv/bin/envoy"
AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
REQUEST = pb.PredictRequest(
    route="driver_ranking",
    entities=[pb.EntityKey(name="driver_id", int64_value=i) for i in (1001, 1002)],
    traffic_class="critical",
)
# The shared secrets a deployment sets alike for every process (service tokens between the
# router and the internal services, the gateway's secret): harmless where unused.
SECRETS = {"INFERLINE_SERVICE_SECRET": "s" * 40, "INFERLINE_GATEWAY_SECRET": "g" * 24}


@dataclass
class TlsStack:
    certs: TlsCerts
    triton: TritonLauncher
    features: harness.ServerProcess
    router: harness.ServerProcess
    config_path: pathlib.Path

    @property
    def client(self) -> TlsClientConfig:
        """What a well-configured caller presents: the CA, and a client certificate it signed."""
        return _client(self.certs)

    @property
    def log_path(self) -> pathlib.Path:
        return self.router.log_path


def _client(certs: TlsCerts, *, ca: pathlib.Path | None = None, cert: str = "client") -> TlsClientConfig:
    """A client config trusting ``ca`` (the test CA), presenting the ``cert`` client certificate ("": none)."""
    files = {"cert_file": getattr(certs, f"{cert}_cert"), "key_file": getattr(certs, f"{cert}_key")} if cert else {}
    return TlsClientConfig(ca_file=ca or certs.ca, **files)


def _start(
    name: str, args: list[str], port: int, log_dir: pathlib.Path, env: Mapping[str, str]
) -> harness.ServerProcess:
    command = [sys.executable, "-m", "inferline.cli", *args, "--port", str(port), "--metrics-port", "0"]
    process = harness.ServerProcess(name, f"127.0.0.1:{port}", command, log_dir / f"{name}.log", env=env, cwd=ROOT)
    process.start()
    return process


def _wait(process: harness.ServerProcess, client: TlsClientConfig, timeout_s: float = 120) -> None:
    try:
        wait_until_serving(process.url, timeout_s, is_alive=process.alive, tls=client)
    except TimeoutError:
        raise AssertionError(f"{process.name} did not become ready over TLS:\n{process.log_tail()}") from None


@pytest.fixture(scope="module")
def tls_stack(
    tls_certs: TlsCerts, triton_config: TritonConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsStack]:
    tmp = tmp_path_factory.mktemp("tls-stack")
    certs = tls_certs
    mutual = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "client_ca_file": str(certs.ca)}
    client = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
    features_port, router_port = free_ports(2)
    config_path = write_test_config(tmp / "inferline.yaml")
    raw = yaml.safe_load(config_path.read_text())
    raw["server"]["tls"] = mutual
    raw["services"] = {"features": f"127.0.0.1:{features_port}", "tls": client}
    raw["triton"]["tls"] = client
    config_path.write_text(yaml.safe_dump(raw))

    env = {**SECRETS}
    features = _start("features", ["serve", "features", "--config", str(config_path)], features_port, tmp, env)
    over_tls = {"tls": TlsClientConfig.model_validate(client), "server_tls": TlsServerConfig.model_validate(mutual)}
    triton = TritonLauncher(triton_config.model_copy(update=over_tls), log_path=tmp / "tritonserver.log")
    router: harness.ServerProcess | None = None
    try:
        triton.start()  # its readiness probe already connects over mutual TLS
        args = ["serve", "router", "--config", str(config_path), "--triton-url", triton.grpc_url]
        router = _start("router", args, router_port, tmp, env)
        _wait(features, _client(certs))
        _wait(router, _client(certs))
        yield TlsStack(certs, triton, features, router, config_path)
    finally:
        if router is not None:
            router.stop()
        features.stop()
        triton.stop()


def _predict(address: str, client: TlsClientConfig | None, timeout: float = 10) -> pb.PredictResponse:
    with tls.channel(address, client, "test") as channel:
        response: pb.PredictResponse = pb_grpc.InferenceStub(channel).Predict(REQUEST, timeout=timeout, metadata=AUTH)
    return response


def _refused(address: str, client: TlsClientConfig | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _predict(address, client, timeout=5)
    return caught.value


def test_predict_over_tls_to_the_router_its_features_service_and_triton(tls_stack: TlsStack) -> None:
    response = _predict(tls_stack.router.url, tls_stack.client)
    assert response.served_by == pb.SERVED_BY_PRIMARY, response
    assert not response.features_degraded  # the features came over mutual TLS from the features process
    assert len(response.predictions) == 2


def test_model_infer_over_tls(tls_stack: TlsStack) -> None:
    creds = tls.channel_credentials(tls_stack.client, "test")
    client = triton_grpc.InferenceServerClient(tls_stack.router.url, creds=creds)
    try:
        tensor = triton_grpc.InferInput("features", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[0.5, 0.7, 480, 6.0]], np.float32))
        result = client.infer("driver_ranker", [tensor], headers=dict(AUTH), client_timeout=10)
    finally:
        client.close()
    scores = result.as_numpy("score")
    assert scores is not None and scores.shape == (1, 1) and 0 <= scores[0, 0] <= 1


@pytest.mark.parametrize(
    "caller",
    ["plain-text", "trusting-the-wrong-ca", "without-a-certificate", "wrongly-signed-certificate"],
)
def test_the_router_refuses_callers_it_cannot_trust(tls_stack: TlsStack, caller: str) -> None:
    certs = tls_stack.certs
    client = {
        "plain-text": None,
        "trusting-the-wrong-ca": _client(certs, ca=certs.wrong_ca),
        "without-a-certificate": _client(certs, cert=""),
        "wrongly-signed-certificate": _client(certs, cert="wrong_client"),
    }[caller]
    error = _refused(tls_stack.router.url, client)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # the handshake failed: no call was made


def _health(address: str, client: TlsClientConfig | None) -> grpc.StatusCode:
    with tls.channel(address, client, "test") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_the_features_service_takes_only_callers_with_a_signed_certificate(tls_stack: TlsStack) -> None:
    certs, address = tls_stack.certs, tls_stack.features.url
    assert _health(address, tls_stack.client) == grpc.StatusCode.OK
    assert _health(address, _client(certs, cert="")) == grpc.StatusCode.UNAVAILABLE
    assert _health(address, _client(certs, cert="wrong_client")) == grpc.StatusCode.UNAVAILABLE
    assert _health(address, None) == grpc.StatusCode.UNAVAILABLE


def test_the_bundled_triton_serves_only_mutual_tls(tls_stack: TlsStack) -> None:
    def live(**kwargs: Any) -> bool:
        client = triton_grpc.InferenceServerClient(tls_stack.triton.grpc_url, **kwargs)
        try:
            return bool(client.is_server_live(client_timeout=5))
        finally:
            client.close()

    assert live(creds=tls.channel_credentials(tls_stack.client, "test"))
    for refused in ({}, {"creds": tls.channel_credentials(_client(tls_stack.certs, cert=""), "test")}):
        with pytest.raises(InferenceServerException) as caught:
            live(**refused)
        assert "UNAVAILABLE" in str(caught.value.status()), caught.value


# --- Envoy: a TLS listener, mutual TLS to the router ---------------------------------------------


@contextlib.contextmanager
def _envoy(stack: TlsStack, tmp_path: pathlib.Path) -> Iterator[Gateway]:
    """Envoy with a TLS listener and mutual TLS to the router; SERVING through it means its TLS
    listener took the check and its health checks of the router over mutual TLS found it healthy."""
    certs = stack.certs
    gateway = {
        "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)},
        "upstream_tls": {
            "ca_file": str(certs.ca),
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
        },
    }
    ready = _client(certs, cert="")
    with start_gateway(gateway, stack.config_path, stack.router.url, tmp_path, ready_tls=ready, env=SECRETS) as gw:
        yield gw


def test_predict_through_envoy_over_tls_to_a_mutual_tls_router(tls_stack: TlsStack, tmp_path: pathlib.Path) -> None:
    certs = tls_stack.certs
    with _envoy(tls_stack, tmp_path) as gateway:
        # The listener does not ask callers for a certificate (gateway.tls has no client_ca_file).
        response = _predict(gateway.address, _client(certs, cert=""))
        assert response.served_by == pb.SERVED_BY_PRIMARY, response
        assert _refused(gateway.address, None).code() == grpc.StatusCode.UNAVAILABLE
        assert _refused(gateway.address, _client(certs, ca=certs.wrong_ca)).code() == grpc.StatusCode.UNAVAILABLE
