"""TLS by config: errors name the key, real gRPC servers refuse the wrong clients, Envoy accepts the contexts.

The gRPC tests run a real ``grpc.aio`` server in-process (``start_server``, health service
only) on a free port, with certificates made by ``tests.tls_certs``.
"""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.core import tls
from inferline.core.config import (
    ConfigError,
    InferlineConfig,
    ServerConfig,
    TlsClientConfig,
    TlsServerConfig,
    load_config,
    parse_config,
)
from inferline.core.grpc_server import RunningServer, start_server
from inferline.gateway import ROUTER_CLUSTER, render_envoy
from inferline.triton.launcher import _ssl_flags
from tests.tls_certs import TlsCerts, tls_certs

__all__ = ["tls_certs"]  # the session fixture, re-exported for pytest

DEFAULT = pathlib.Path("deploy/local/inferline.yaml")
ENVOY = pathlib.Path(".venv/bin/envoy")


def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT.read_text())
    return raw


def _parse(raw: dict[str, Any]) -> InferlineConfig:
    return parse_config(raw, DEFAULT.parent)


def _server_tls(certs: TlsCerts, *, mutual: bool) -> TlsServerConfig:
    ca = certs.ca if mutual else None
    return TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=ca)


# --- configuration ---------------------------------------------------------------------------


def test_plain_text_is_the_default() -> None:
    config = load_config(DEFAULT)
    tls_sections = (config.server.tls, config.services.tls, config.triton.tls, config.triton.server_tls)
    assert tls_sections == (None, None, None, None)
    assert (config.gateway.tls, config.gateway.upstream_tls) == (None, None)


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("server", {"cert_file": "s.pem"}, r"server\.tls\.key_file: Field required"),
        ("services", {"ca_file": "ca.pem", "cert_file": "c.pem"}, r"services\.tls\.key_file: .*key_file is needed"),
        ("services", {"ca_file": "ca.pem", "key_file": "k.pem"}, r"services\.tls\.key_file: .*without cert_file"),
        ("gateway", {"key_file": "k.pem"}, r"gateway\.tls\.cert_file: Field required"),
        ("triton", {"cert_file": "s.pem", "key_file": "k.pem", "client_ca": "x"}, r"triton\.tls\.client_ca: Extra"),
    ],
    ids=["server-cert-without-key", "client-cert-without-key", "client-key-without-cert", "gateway", "unknown-key"],
)
def test_a_certificate_without_its_key_is_an_error_naming_the_key(
    section: str, value: dict[str, str], message: str
) -> None:
    raw = _raw()
    raw.setdefault(section, {})["tls"] = value
    with pytest.raises(ConfigError, match=message):
        _parse(raw)


def test_upstream_client_cert_without_key_is_named() -> None:
    raw = _raw()
    raw.setdefault("gateway", {})["upstream_tls"] = {"ca_file": "ca.pem", "cert_file": "c.pem"}
    with pytest.raises(ConfigError, match=r"gateway\.upstream_tls\.key_file"):
        _parse(raw)


def test_bundled_triton_over_tls_needs_the_client_side_too() -> None:
    raw = _raw()
    raw["triton"]["server_tls"] = {"cert_file": "s.pem", "key_file": "k.pem", "client_ca_file": "ca.pem"}
    with pytest.raises(ConfigError, match=r"triton\.server_tls: .*without triton\.tls"):
        _parse(raw)
    raw["triton"]["tls"] = {"ca_file": "ca.pem"}
    with pytest.raises(ConfigError, match=r"triton\.server_tls: .*triton\.tls needs cert_file and key_file"):
        _parse(raw)


def test_relative_paths_are_resolved_from_the_config_folder(tmp_path: pathlib.Path) -> None:
    raw = _raw()
    raw["server"]["tls"] = {"cert_file": "pki/server.pem", "key_file": "pki/server-key.pem", "client_ca_file": "ca.pem"}
    raw["services"] = {"tls": {"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "/abs/c-key.pem"}}
    raw["triton"]["tls"] = {"ca_file": "ca.pem"}
    raw["gateway"] = {"tls": {"cert_file": "g.pem", "key_file": "g-key.pem"}, "upstream_tls": {"ca_file": "ca.pem"}}
    path = tmp_path / "conf" / "inferline.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    base = path.parent.resolve()
    assert config.server.tls is not None and config.services.tls is not None
    assert config.server.tls.cert_file == base / "pki/server.pem"
    assert config.server.tls.client_ca_file == base / "ca.pem"
    assert config.services.tls.key_file == pathlib.Path("/abs/c-key.pem")
    assert config.triton.tls is not None and config.triton.tls.ca_file == base / "ca.pem"
    assert config.gateway.tls is not None and config.gateway.tls.key_file == base / "g-key.pem"
    assert config.gateway.upstream_tls is not None and config.gateway.upstream_tls.ca_file == base / "ca.pem"


def test_unreadable_files_are_named_by_their_key(tls_certs: TlsCerts, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing.pem"
    server = TlsServerConfig(cert_file=missing, key_file=tls_certs.server_key)
    with pytest.raises(ConfigError, match=rf"server\.tls\.cert_file: cannot read {missing}: No such file"):
        tls.server_credentials(server)
    wrong_key = TlsServerConfig(cert_file=tls_certs.server_cert, key_file=tls_certs.client_key)
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: .* is not the key of server\.tls\.cert_file"):
        tls.server_credentials(wrong_key)
    key_as_ca = TlsClientConfig(ca_file=tls_certs.client_key)
    with pytest.raises(ConfigError, match=r"services\.tls\.ca_file: .* holds no PEM CERTIFICATE block"):
        tls.channel_credentials(key_as_ca, "services.tls")
    cert_as_key = TlsClientConfig(ca_file=tls_certs.ca, cert_file=tls_certs.client_cert, key_file=tls_certs.client_cert)
    with pytest.raises(ConfigError, match=r"triton\.tls\.key_file: .* holds no PEM PRIVATE KEY block"):
        tls.channel_credentials(cert_as_key, "triton.tls")


def test_start_checks_the_files_of_the_hops_the_process_uses(tls_certs: TlsCerts, tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "missing.pem")
    raw = _raw()
    client = {"ca_file": str(tls_certs.ca), "cert_file": str(tls_certs.client_cert), "key_file": missing}
    raw["services"] = {"features": "127.0.0.1:1", "tls": client}
    raw["triton"]["tls"] = {**client, "key_file": str(tls_certs.client_key)}
    raw["triton"]["server_tls"] = {"cert_file": str(tls_certs.server_cert), "key_file": str(tls_certs.client_key)}
    config = _parse(raw)
    tls.check_files(config, router=False, triton_client=True, bundled_triton=False)  # services.tls: not used
    with pytest.raises(ConfigError, match=r"^services\.tls\.key_file: cannot read"):
        tls.check_files(config, router=True, triton_client=True, bundled_triton=False)
    with pytest.raises(ConfigError, match=r"^triton\.server_tls\.key_file: .* is not the key of"):
        tls.check_files(config, router=False, triton_client=False, bundled_triton=True, grpc_server=False)


def test_inferline_up_stops_before_starting_anything_on_a_bad_tls_file(tmp_path: pathlib.Path) -> None:
    raw = _raw()
    raw["server"]["tls"] = {"cert_file": "nowhere/server.pem", "key_file": "nowhere/server-key.pem"}
    path = tmp_path / "inferline.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["up", "--config", str(path), "--triton-url", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "server.tls.cert_file: cannot read" in result.output
    assert "Traceback" not in result.output


def test_the_bundled_triton_gets_the_ssl_flags(tls_certs: TlsCerts) -> None:
    assert _ssl_flags(None) == []
    one_way = _ssl_flags(_server_tls(tls_certs, mutual=False))
    assert one_way == [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tls_certs.server_cert}",
        f"--grpc-server-key={tls_certs.server_key}",
    ]
    mutual = _ssl_flags(_server_tls(tls_certs, mutual=True))
    assert mutual == [*one_way, "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tls_certs.ca}"]


# --- a real gRPC server over TLS ----------------------------------------------------------------


async def _serve(server_tls: TlsServerConfig) -> RunningServer:
    return await start_server([], ServerConfig(host="127.0.0.1", port=0, tls=server_tls))


@pytest.fixture
async def tls_server(tls_certs: TlsCerts) -> AsyncIterator[RunningServer]:
    running = await _serve(_server_tls(tls_certs, mutual=False))
    yield running
    await running.server.stop(None)


@pytest.fixture
async def mtls_server(tls_certs: TlsCerts) -> AsyncIterator[RunningServer]:
    running = await _serve(_server_tls(tls_certs, mutual=True))
    yield running
    await running.server.stop(None)


async def _check(port: int, client: TlsClientConfig | None) -> grpc.StatusCode:
    """The health check's outcome through a channel per ``client`` (None: plain text)."""
    async with tls.aio_channel(f"127.0.0.1:{port}", client, "test") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


async def test_a_tls_port_answers_a_client_trusting_its_ca(tls_server: RunningServer, tls_certs: TlsCerts) -> None:
    assert await _check(tls_server.port, TlsClientConfig(ca_file=tls_certs.ca)) == grpc.StatusCode.OK
    by_name = TlsClientConfig(ca_file=tls_certs.ca, server_name="localhost")
    assert await _check(tls_server.port, by_name) == grpc.StatusCode.OK


async def test_a_tls_port_refuses_plain_text_and_the_wrong_ca(tls_server: RunningServer, tls_certs: TlsCerts) -> None:
    assert await _check(tls_server.port, None) == grpc.StatusCode.UNAVAILABLE
    assert await _check(tls_server.port, TlsClientConfig(ca_file=tls_certs.wrong_ca)) == grpc.StatusCode.UNAVAILABLE
    # The right CA, but a name the certificate does not carry.
    other_name = TlsClientConfig(ca_file=tls_certs.ca, server_name="router.example")
    assert await _check(tls_server.port, other_name) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(
    mtls_server: RunningServer, tls_certs: TlsCerts
) -> None:
    signed = TlsClientConfig(ca_file=tls_certs.ca, cert_file=tls_certs.client_cert, key_file=tls_certs.client_key)
    assert await _check(mtls_server.port, signed) == grpc.StatusCode.OK
    assert await _check(mtls_server.port, TlsClientConfig(ca_file=tls_certs.ca)) == grpc.StatusCode.UNAVAILABLE
    wrongly_signed = TlsClientConfig(
        ca_file=tls_certs.ca, cert_file=tls_certs.wrong_client_cert, key_file=tls_certs.wrong_client_key
    )
    assert await _check(mtls_server.port, wrongly_signed) == grpc.StatusCode.UNAVAILABLE
    assert await _check(mtls_server.port, None) == grpc.StatusCode.UNAVAILABLE


# --- the gateway's TLS contexts -----------------------------------------------------------------


def _tls_gateway(certs: TlsCerts, **upstream: Any) -> InferlineConfig:
    raw = _raw()
    raw["gateway"] = {
        "tls": {
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
            "client_ca_file": str(certs.ca),
        },
        "upstream_tls": {
            "ca_file": str(certs.ca),
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
            **upstream,
        },
    }
    return _parse(raw)


def _listener_socket(rendered: dict[str, Any]) -> dict[str, Any]:
    chain: dict[str, Any] = rendered["static_resources"]["listeners"][0]["filter_chains"][0]
    return chain["transport_socket"]  # type: ignore[no-any-return]


def _cluster(rendered: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == ROUTER_CLUSTER]
    return cluster  # type: ignore[no-any-return]


def test_render_without_tls_has_no_transport_sockets() -> None:
    rendered = render_envoy(_parse(_raw()))
    assert "transport_socket" not in rendered["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "transport_socket" not in _cluster(rendered)


def test_render_puts_tls_on_the_listener_and_mutual_tls_to_the_routers(tls_certs: TlsCerts) -> None:
    rendered = render_envoy(_tls_gateway(tls_certs), routers=["127.0.0.1:50051", "127.0.0.1:50052"])
    downstream = _listener_socket(rendered)["typed_config"]
    assert downstream["@type"].endswith("DownstreamTlsContext")
    assert downstream["require_client_certificate"] is True
    common = downstream["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(tls_certs.server_cert)},
            "private_key": {"filename": str(tls_certs.server_key)},
        }
    ]
    assert common["validation_context"] == {"trusted_ca": {"filename": str(tls_certs.ca)}}

    upstream = _cluster(rendered)["transport_socket"]["typed_config"]
    assert upstream["@type"].endswith("UpstreamTlsContext")
    common = upstream["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["tls_certificates"][0]["certificate_chain"] == {"filename": str(tls_certs.client_cert)}
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(tls_certs.ca)}
    # The routers' certificate must name a router host (IP literals: an IP subjectAltName); no SNI for IPs.
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}
    ]
    assert "sni" not in upstream


def test_render_checks_and_sends_the_configured_server_name(tls_certs: TlsCerts) -> None:
    upstream = _cluster(render_envoy(_tls_gateway(tls_certs, server_name="localhost")))["transport_socket"]
    context = upstream["typed_config"]
    assert context["sni"] == "localhost"
    names = context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert names == [{"san_type": "DNS", "matcher": {"exact": "localhost"}}]


@pytest.mark.parametrize("server_name", [None, "localhost"])
def test_real_envoy_validates_the_tls_contexts(
    tls_certs: TlsCerts, tmp_path: pathlib.Path, server_name: str | None
) -> None:
    rendered = render_envoy(_tls_gateway(tls_certs, server_name=server_name), routers=["127.0.0.1:50051"])
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    command = [str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "error"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_envoy_refuses_a_missing_certificate_file(tls_certs: TlsCerts, tmp_path: pathlib.Path) -> None:
    config = _tls_gateway(tls_certs)
    gateway_tls = TlsServerConfig(cert_file=tmp_path / "missing.pem", key_file=tls_certs.server_key)
    config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"tls": gateway_tls})})
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(render_envoy(config), sort_keys=False))
    command = [str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "error"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "missing.pem" in result.stdout + result.stderr
