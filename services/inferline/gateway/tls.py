"""Envoy's TLS transport sockets for the gateway: its listener (``gateway.tls``) and its
connections to the routers (``gateway.upstream_tls``).

Envoy reads the PEM files itself when it starts (paths are written as they are in the
config, resolved from its folder), so nothing is read here; ``envoy --mode validate``
loads them and refuses a missing or mismatched file.

Why each setting:

* Listener: ALPN ``h2`` and ``http/1.1``: gRPC clients need ``h2`` negotiated by ALPN
  (gRPC refuses a TLS connection without it), REST tooling may speak HTTP/1.1 (the
  connection manager's codec is AUTO). With ``client_ca_file`` a client certificate
  signed by it is required (mutual TLS).
* Upstream: ALPN ``h2`` for the same reason, the client certificate when the routers
  require one, and the routers' certificate checked against ``ca_file`` *and* a name:
  Envoy checks no name unless told to, so without a subjectAltName matcher any certificate
  the CA ever signed would pass. The name is ``server_name``, or else any of the hosts in
  ``gateway.routers``; the gateway's gRPC health checks use the same transport socket.
"""

from __future__ import annotations

import ipaddress
import pathlib
from typing import Any

from inferline.core.config import TlsClientConfig, TlsServerConfig

_TLS_SOCKET = "envoy.transport_sockets.tls"
_DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _certificate(cert_file: pathlib.Path, key_file: pathlib.Path) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(cert_file)}, "private_key": {"filename": str(key_file)}}


def downstream_transport_socket(tls: TlsServerConfig | None) -> dict[str, Any]:
    """``{"transport_socket": ...}`` for the listener's filter chain, or ``{}`` for plain text."""
    if tls is None:
        return {}
    common: dict[str, Any] = {
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificates": [_certificate(tls.cert_file, tls.key_file)],
    }
    context: dict[str, Any] = {"@type": _DOWNSTREAM, "common_tls_context": common}
    if tls.client_ca_file is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(tls.client_ca_file)}}
        context["require_client_certificate"] = True
    return {"transport_socket": {"name": _TLS_SOCKET, "typed_config": context}}


def upstream_transport_socket(tls: TlsClientConfig | None, router_hosts: list[str]) -> dict[str, Any]:
    """``{"transport_socket": ...}`` for the router cluster, or ``{}`` for plain text.

    ``router_hosts``: the hosts of ``gateway.routers``, the names accepted in the routers'
    certificates when ``server_name`` is not set.
    """
    if tls is None:
        return {}
    names = [tls.server_name] if tls.server_name is not None else list(dict.fromkeys(router_hosts))
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.ca_file)},
            "match_typed_subject_alt_names": [_san_matcher(name) for name in names],
        },
    }
    if tls.cert_file is not None and tls.key_file is not None:
        common["tls_certificates"] = [_certificate(tls.cert_file, tls.key_file)]
    context: dict[str, Any] = {"@type": _UPSTREAM, "common_tls_context": common}
    sni = [name for name in names if not is_ip(name)]
    if len(names) == 1 and sni:  # SNI carries a DNS name only, and one for all replicas
        context["sni"] = sni[0]
    return {"transport_socket": {"name": _TLS_SOCKET, "typed_config": context}}


def _san_matcher(name: str) -> dict[str, Any]:
    san_type = "IP_ADDRESS" if is_ip(name) else "DNS"
    return {"san_type": san_type, "matcher": {"exact": name}}


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal (not a DNS name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
