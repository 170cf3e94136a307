"""Certificates for the TLS tests, made with ``cryptography`` (no openssl, no files in the repository).

``make_tls_certs`` writes, as PEM: a test CA; a server certificate it signed for
``localhost`` and ``127.0.0.1``; a client certificate it signed (``inferline-router``);
and a second, unrelated CA with a client certificate of its own, for "wrongly signed".
EC P-256 keys: generated in milliseconds, accepted by gRPC, Triton and Envoy alike.

Test modules use the session fixture by importing it (and listing it in ``__all__``):
``from tests.tls_certs import tls_certs``.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1")
"""The subjectAltNames of the server certificate."""
CLIENT_NAME = "inferline-router"
_VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsCerts:
    """Paths of the PEM files (``*_key``: unencrypted PKCS#8)."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    wrong_ca: pathlib.Path
    """A CA that signed none of the above."""
    wrong_client_cert: pathlib.Path
    """A client certificate signed by ``wrong_ca``."""
    wrong_client_key: pathlib.Path

    @staticmethod
    def read(path: pathlib.Path) -> bytes:
        return path.read_bytes()


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca(common_name: str) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common_name, _name(common_name), key.public_key())
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = builder.add_extension(usage, critical=True)
    return _Issued(builder.sign(key, hashes.SHA256()), key)


def _leaf(ca: _Issued, common_name: str, *, server: bool, names: tuple[str, ...] = ()) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common_name, ca.cert.subject, key.public_key())
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write_cert(path: pathlib.Path, issued: _Issued) -> pathlib.Path:
    path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: pathlib.Path, issued: _Issued) -> pathlib.Path:
    pem = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def make_tls_certs(directory: pathlib.Path) -> TlsCerts:
    """Write the CAs, the server and the client certificates and keys into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("inferline test CA")
    server = _leaf(ca, "inferline test server", server=True, names=SERVER_NAMES)
    client = _leaf(ca, CLIENT_NAME, server=False)
    wrong_ca = _ca("unrelated CA")
    wrong_client = _leaf(wrong_ca, CLIENT_NAME, server=False)
    return TlsCerts(
        ca=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server-key.pem", server),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client-key.pem", client),
        wrong_ca=_write_cert(directory / "wrong-ca.pem", wrong_ca),
        wrong_client_cert=_write_cert(directory / "wrong-client.pem", wrong_client),
        wrong_client_key=_write_key(directory / "wrong-client-key.pem", wrong_client),
    )


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    """A fresh test PKI for the session (see ``make_tls_certs``)."""
    return make_tls_certs(tmp_path_factory.mktemp("tls"))
