"""Bearer authentication: ``authorization: Bearer <token>`` metadata → tenant name.

A token is an API key or, when ``jwt`` is configured, a JWT. API keys are stored only as
SHA-256 digests; a check hashes the presented key (about a microsecond) and looks the digest
up in a dict, whatever the number of tenants. JWTs are verified with PyJWT against keys read
once at start-up, so a missing secret or unreadable key file fails the start, not a request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import get_default_algorithms

from inferline.core.config import ConfigError, JwtConfig, JwtKeyConfig, TenantConfig
from inferline.core.errors import Unauthenticated, echo

Metadata = Sequence[tuple[str, str | bytes]] | None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(metadata: Metadata) -> str:
    """The token of the call's ``authorization: Bearer <token>`` metadata.

    Raises:
        Unauthenticated: no ``authorization`` metadata, or not of the Bearer scheme.
    """
    header = None
    for key, value in metadata or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode()
            break
    if header is None:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    # Whitespace around the value and between scheme and token is what HTTP clients commonly
    # send (``-H "authorization: Bearer KEY"`` keeps the space after the colon): accept it.
    # A token never holds whitespace, so anything more is malformed.
    parts = header.split()
    if not parts:
        raise Unauthenticated("authorization metadata must be 'Bearer <token>', got an empty value")
    if parts[0].lower() != "bearer":
        raise Unauthenticated("authorization metadata must be 'Bearer <token>' (the Bearer scheme)")
    if len(parts) != 2:
        raise Unauthenticated("authorization metadata must be 'Bearer <token>' (one token, no spaces in it)")
    return parts[1]


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has the shape of a JWT: three dot-separated segments, the first a JSON header with ``alg``.

    The dot count comes first so that an API key (no dots) costs one scan, not a base64 and
    JSON decode. Only the shape is checked here; ``JwtVerifier`` does the strict parsing.
    """
    if token.count(".") != 2:
        return False
    head = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # bad base64, non-ASCII, bad UTF-8 or JSON
        return False
    return isinstance(header, dict) and "alg" in header


class ApiKeyAuthenticator:
    """Resolves the bearer key of a call to the tenant that owns it."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._tenant_by_digest = {digest: name for name, t in tenants.items() for digest in t.api_key_sha256}

    def tenant_of_key(self, key: str) -> str:
        """Return the tenant owning API key ``key``.

        Raises:
            Unauthenticated: no tenant owns the key.
        """
        tenant = self._tenant_by_digest.get(hash_api_key(key))
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    def authenticate(self, metadata: Metadata) -> str:
        """Return the tenant name for the call's ``authorization`` metadata.

        Raises:
            Unauthenticated: no bearer key, or a key no tenant owns.
        """
        return self.tenant_of_key(bearer_token(metadata))


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    kid: str | None
    algorithm: str
    key: Any
    """Prepared once: HS256 secret bytes or an ``RSAPublicKey``."""


def _load_key(index: int, config: JwtKeyConfig, environ: Mapping[str, str]) -> _VerificationKey:
    """Read and check one configured key; every problem is a ``ConfigError`` naming the key."""
    where = f"jwt.keys[{index}]"
    material: Any
    if config.algorithm == "HS256":
        secret = environ.get(config.secret_env or "")
        if secret is None:
            raise ConfigError(f"{where}.secret_env: environment variable {config.secret_env} is not set")
        try:
            # PyJWT's own check: rejects an empty secret and one that is a PEM/SSH key.
            material = get_default_algorithms()["HS256"].prepare_key(secret)
        except jwt.InvalidKeyError as err:
            raise ConfigError(f"{where}.secret_env: environment variable {config.secret_env}: {err}") from err
    else:
        path = config.public_key_file
        try:
            pem = path.read_bytes() if path is not None else b""
        except OSError as err:
            raise ConfigError(f"{where}.public_key_file: cannot read {path}: {err.strerror}") from err
        try:
            material = load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"{where}.public_key_file: {path} is not a PEM public key") from err
        # Loaded here rather than handed to PyJWT as PEM, which would also accept a private key.
        if not isinstance(material, rsa.RSAPublicKey):
            raise ConfigError(f"{where}.public_key_file: {path} is not an RSA public key")
    # Refuse weak keys at start-up (RFC 7518 §3.2: HS256 secrets of at least 32 bytes; RSA of
    # at least 2048 bits) instead of letting PyJWT warn on every request.
    weak = get_default_algorithms()[config.algorithm].check_key_length(material)
    if weak:
        raise ConfigError(f"{where}: {weak}")
    return _VerificationKey(config.kid, config.algorithm, material)


def _claims_error(err: jwt.PyJWTError) -> Unauthenticated:
    """A verified signature whose claims are refused, as the message the caller gets."""
    if isinstance(err, jwt.ExpiredSignatureError):
        return Unauthenticated("JWT expired")
    if isinstance(err, jwt.ImmatureSignatureError):
        return Unauthenticated(f"JWT not yet valid: {err}")
    if isinstance(err, jwt.InvalidIssuerError):
        return Unauthenticated("JWT issuer invalid")
    if isinstance(err, jwt.InvalidAudienceError):
        return Unauthenticated("JWT audience invalid")
    if isinstance(err, jwt.MissingRequiredClaimError):
        return Unauthenticated(f"JWT lacks the required {err.claim!r} claim")
    return Unauthenticated(f"JWT invalid: {err}")


class JwtVerifier:
    """Verifies a bearer JWT against the configured keys and resolves it to a tenant.

    The algorithms a token may use are exactly those of the configured keys, and each key is
    only ever tried with its own algorithm: a token cannot pick ``none``, nor make an RS256
    public key serve as an HS256 secret (algorithm confusion).
    """

    def __init__(
        self,
        config: JwtConfig,
        tenants: Mapping[str, TenantConfig],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Read every key's secret or public key now, so that a bad one fails the start.

        Raises:
            ConfigError: a secret's variable is unset, a key file unreadable or not an RSA
                public key, a key too weak, a ``kid`` used twice, or a JWT subject given to
                two tenants.
        """
        environ = os.environ if environ is None else environ
        self._config = config
        self._required = ["exp", "iat"] if config.max_lifetime_s is not None else ["exp"]
        self._tenants = frozenset(tenants)
        self._keys_by_alg: dict[str, list[_VerificationKey]] = {}
        self._key_by_kid: dict[str, _VerificationKey] = {}
        for index, key_config in enumerate(config.keys):
            key = _load_key(index, key_config, environ)
            self._keys_by_alg.setdefault(key.algorithm, []).append(key)
            if key.kid is not None:
                if key.kid in self._key_by_kid:
                    raise ConfigError(f"jwt.keys[{index}].kid: {key.kid!r} is used by another key")
                self._key_by_kid[key.kid] = key
        self._tenant_by_subject: dict[str, str] = {}
        for name, tenant in tenants.items():
            for subject in tenant.jwt_subjects:
                owner = self._tenant_by_subject.setdefault(subject, name)
                if owner != name:
                    raise ConfigError(f"tenants.{name}.jwt_subjects: {subject!r} already belongs to tenant {owner!r}")

    def verify(self, token: str) -> str:
        """Return the tenant the valid JWT ``token`` belongs to.

        Raises:
            Unauthenticated: malformed token, algorithm not allowed, unknown ``kid``, bad
                signature, expired or not yet valid, wrong issuer or audience, or no tenant.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise Unauthenticated(f"malformed JWT: {err}") from err
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._keys_by_alg:
            raise Unauthenticated(f"JWT algorithm {echo(alg)} is not allowed")
        if kid is not None:  # PyJWT has checked that a kid is a string
            key = self._key_by_kid.get(kid)
            if key is None:
                raise Unauthenticated(f"JWT names unknown key id {echo(kid)}")
            if key.algorithm != alg:
                raise Unauthenticated(f"JWT algorithm {echo(alg)} does not match key {kid!r} ({key.algorithm})")
            candidates = [key]
        else:
            candidates = self._keys_by_alg[alg]
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    issuer=self._config.issuer,
                    audience=self._config.audience,
                    leeway=self._config.leeway_s,
                    options={"require": self._required},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed with the next key of this algorithm (e.g. during rotation)
            except jwt.PyJWTError as err:
                raise _claims_error(err) from err
            self._check_lifetime(claims)
            return self._tenant_of(claims)
        raise Unauthenticated("JWT signature invalid")

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """Refuse a token living longer than ``jwt.max_lifetime_s`` (PyJWT has checked exp and iat are numbers)."""
        limit = self._config.max_lifetime_s
        if limit is not None and float(claims["exp"]) - float(claims["iat"]) > limit:
            raise Unauthenticated(f"JWT lifetime (exp - iat) exceeds the {limit:g} s allowed")

    def _tenant_of(self, claims: Mapping[str, Any]) -> str:
        claim = self._config.tenant_claim
        named = claims.get(claim)
        if named is not None:
            if not isinstance(named, str) or named not in self._tenants:
                raise Unauthenticated(f"JWT names unknown tenant {echo(named)}")
            return named
        subject = claims.get("sub")
        if subject is None:
            raise Unauthenticated(f"JWT has neither a {claim!r} nor a 'sub' claim")
        tenant = self._tenant_by_subject.get(subject) if isinstance(subject, str) else None
        if tenant is None:
            raise Unauthenticated(f"JWT subject {echo(subject)} belongs to no tenant")
        return tenant


class Authenticator:
    """Resolves a call's bearer token, an API key or a JWT, to its tenant.

    A token shaped like a JWT goes to the JWT verifier when JWTs are configured, and never
    falls back to the API keys: a failed JWT is reported as such. Everything else is an API key.
    """

    def __init__(
        self,
        tenants: Mapping[str, TenantConfig],
        jwt: JwtConfig | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``environ`` (default ``os.environ``) holds the HS256 secrets the JWT keys name.

        Raises:
            ConfigError: as ``JwtVerifier``.
        """
        self._api_keys = ApiKeyAuthenticator(tenants)
        self._jwt = None if jwt is None else JwtVerifier(jwt, tenants, environ)

    def authenticate(self, metadata: Metadata) -> str:
        """Return the tenant name for the call's ``authorization`` metadata.

        Raises:
            Unauthenticated: no bearer token, an unknown API key, or a JWT refused by ``JwtVerifier``.
        """
        token = bearer_token(metadata)
        if self._jwt is not None and looks_like_jwt(token):
            return self._jwt.verify(token)
        return self._api_keys.tenant_of_key(token)
