"""TLS credentials for every gRPC hop, built from the config's ``tls`` sections.

Why a module of its own: gRPC's, tritonclient's and the server's TLS settings all take the
same few PEM files, and each mistake in them (a missing file, a key that belongs to another
certificate, a CA file holding a key) surfaces from gRPC core much later and obscurely — a
failed handshake logged by the peer, or ``add_secure_port`` refusing with no reason. So the
files are read and checked here, once, when a process starts, and every error names the
config key (``server.tls.key_file: ...``) as a bad value in the YAML does.

The hops and their keys:

* ``server.tls`` — every inferline gRPC port (router, and internal services in the suite);
  ``client_ca_file`` set: mutual TLS, a client without a certificate signed by it fails the
  handshake.
* ``services.tls`` — the router's channels to remote features / postprocess / degradation.
* ``triton.tls`` — the router's channel to Triton, and the bundled server's readiness probe
  (``triton.server_tls`` turns on TLS in the bundled server itself, ``triton.launcher``).
* ``gateway.tls`` / ``gateway.upstream_tls`` — read by Envoy, not here
  (``gateway.tls_contexts``).

``None`` everywhere means plain text, as before: the helpers then return insecure channels
and ports.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from inferline.core.config import ConfigError, InferlineConfig, TlsClientConfig, TlsServerConfig

ChannelOptions = Sequence[tuple[str, Any]]

_CERTIFICATE = "CERTIFICATE"
_PRIVATE_KEY = "PRIVATE KEY"  # also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY" blocks


def read_pem(path: pathlib.Path, key: str, kind: str) -> bytes:
    """The bytes of the PEM file at ``path``, which must hold a ``kind`` block.

    Raises:
        ConfigError: naming ``key``: the file is missing, unreadable or holds no such block.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror or err}") from err
    if f"{kind}-----".encode() not in data or b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path} holds no PEM {kind} block")
    return data


def _certificate(path: pathlib.Path, key: str) -> tuple[bytes, x509.Certificate]:
    data = read_pem(path, key, _CERTIFICATE)
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise ConfigError(f"{key}: {path} is not a valid PEM certificate: {err}") from err


def _key_pair(cert_file: pathlib.Path, key_file: pathlib.Path, prefix: str) -> tuple[bytes, bytes]:
    """(private key, certificate chain) PEM bytes, checked to belong together."""
    chain, certificate = _certificate(cert_file, f"{prefix}.cert_file")
    private = read_pem(key_file, f"{prefix}.key_file", _PRIVATE_KEY)
    try:
        loaded = serialization.load_pem_private_key(private, password=None)
    except (ValueError, TypeError) as err:  # TypeError: an encrypted key
        raise ConfigError(f"{prefix}.key_file: {key_file} is not an unencrypted PEM private key: {err}") from err
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if loaded.public_key().public_bytes(*raw) != certificate.public_key().public_bytes(*raw):
        raise ConfigError(f"{prefix}.key_file: {key_file} is not the key of {prefix}.cert_file {cert_file}")
    return private, chain


def server_credentials(tls: TlsServerConfig, prefix: str = "server.tls") -> grpc.ServerCredentials:
    """Server credentials for ``tls``; with ``client_ca_file``, clients must present a
    certificate it signed (gRPC's ``require_client_auth``)."""
    private, chain = _key_pair(tls.cert_file, tls.key_file, prefix)
    roots = None if tls.client_ca_file is None else _certificate(tls.client_ca_file, f"{prefix}.client_ca_file")[0]
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def channel_credentials(tls: TlsClientConfig, prefix: str) -> grpc.ChannelCredentials:
    """Channel credentials trusting only ``ca_file``, presenting the client certificate if set."""
    roots = _certificate(tls.ca_file, f"{prefix}.ca_file")[0]
    if tls.cert_file is None or tls.key_file is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    private, chain = _key_pair(tls.cert_file, tls.key_file, prefix)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private, certificate_chain=chain)


def channel_options(tls: TlsClientConfig | None) -> list[tuple[str, Any]]:
    """The channel arguments ``tls`` adds: the name to check the server's certificate against.

    gRPC checks the host of the target by default; ``server_name`` overrides it (the
    certificate of a server reached by IP, or through a name it does not carry).
    """
    if tls is None or tls.server_name is None:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]


def aio_channel(
    address: str,
    tls: TlsClientConfig | None,
    prefix: str,
    options: ChannelOptions = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: over TLS per ``tls``, plain text when it is None.

    ``interceptors``: e.g. the service credentials every call to an internal service carries.
    """
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    credentials = channel_credentials(tls, prefix)
    return grpc.aio.secure_channel(
        address, credentials, options=[*options, *channel_options(tls)], interceptors=interceptors
    )


def channel(address: str, tls: TlsClientConfig | None, prefix: str, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to ``address`` (command line, readiness waits), as ``aio_channel``."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls, prefix), options=[*options, *channel_options(tls)])


def add_port(server: grpc.aio.Server, address: str, tls: TlsServerConfig | None, prefix: str = "server.tls") -> int:
    """Bind ``address`` on ``server``, over TLS per ``tls`` (plain text when None); the bound port, 0 on failure."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls, prefix))


def tritonclient_kwargs(tls: TlsClientConfig | None, prefix: str = "triton.tls") -> dict[str, Any]:
    """Keyword arguments for ``tritonclient.grpc.InferenceServerClient``: ``creds`` when ``tls``
    is set (its ``ssl=True`` path reads the files itself, with no checks and no name override)."""
    return {} if tls is None else {"creds": channel_credentials(tls, prefix)}


def check_files(
    config: InferlineConfig, *, router: bool, triton_client: bool, bundled_triton: bool, grpc_server: bool = True
) -> None:
    """Read and check every TLS file this process will use, before anything starts.

    ``router``: the process calls remote services (``services.tls``); ``triton_client``: it
    calls Triton (``triton.tls``); ``bundled_triton``: it starts the bundled server
    (``triton.server_tls``); ``grpc_server``: it serves inferline gRPC (``server.tls``; all
    but ``inferline triton``). The gateway's files are Envoy's and are not checked.

    Raises:
        ConfigError: naming the key of the first bad file.
    """
    if grpc_server and config.server.tls is not None:
        server_credentials(config.server.tls, "server.tls")
    remote = any((config.services.features, config.services.postprocess, config.services.degradation))
    if router and remote and config.services.tls is not None:
        channel_credentials(config.services.tls, "services.tls")
    if (triton_client or bundled_triton) and config.triton.tls is not None:
        channel_credentials(config.triton.tls, "triton.tls")
    if bundled_triton and config.triton.server_tls is not None:
        server_credentials(config.triton.server_tls, "triton.server_tls")
