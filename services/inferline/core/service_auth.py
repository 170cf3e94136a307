"""Service credentials between a router and the internal services (suite topology).

The internal services (Features, Postprocess, Degradation) read raw features and write the
score cache that is served back as CACHE answers: a caller that reaches them could read
any tenant's features or poison its answers. In the embedded default they are not served
at all (the router calls them in-process); in the suite they listen on their own port and
answer only calls that carry a service token: a short-lived JWT (HS256, PyJWT) signed with a
per-deployment secret (``services.secret_env``), naming the caller's role in ``sub``.
Each method lists the roles it accepts (``ALLOWED_ROLES``): only routers write the score
cache or ask for degraded answers.

Signed tokens rather than only mTLS peer identity: they work over plain-text networks
inside a cluster and through any TLS termination, and carry the role, which a certificate
would need a naming convention for. TLS (``core.tls``) still encrypts the hop when
configured. The tenant of a request is set by the router from the caller's own
authentication; the score cache is keyed by it, so a tenant never reads another's scores.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import jwt

from inferline.core.config import ConfigError

logger = logging.getLogger(__name__)

AUDIENCE = "inferline.internal"
ISSUER = "inferline"
ALGORITHM = "HS256"
MIN_SECRET_CHARS = 32
"""RFC 7518 §3.2: an HS256 key of at least 256 bits."""
ROUTER = "router"
ALLOWED_ROLES: Mapping[str, frozenset[str]] = {
    "/inferline.internal.v1.Features/": frozenset({ROUTER}),
    "/inferline.internal.v1.Postprocess/": frozenset({ROUTER}),
    "/inferline.internal.v1.Degradation/": frozenset({ROUTER}),
}
"""Method prefix → roles whose tokens it accepts. A method under no prefix here (health,
reflection) needs no token: probes and discovery carry no data."""
LEEWAY_S = 5.0
"""Clock skew tolerated between the signing router and the verifying service."""


def service_secret(variable: str, environ: Mapping[str, str] | None = None) -> str:
    """The deployment's service secret from ``variable``.

    Raises:
        ConfigError: unset, or shorter than ``MIN_SECRET_CHARS``.
    """
    secret = (os.environ if environ is None else environ).get(variable)
    if not secret:
        raise ConfigError(
            f"services.secret_env: environment variable {variable} is not set; internal services and the "
            "routers calling them need the same service secret"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"services.secret_env: environment variable {variable} must hold at least {MIN_SECRET_CHARS} characters"
        )
    return secret


class ServiceTokenSigner:
    """Signs this process's service token, and signs anew when half its lifetime is gone."""

    def __init__(
        self, secret: str, role: str, lifetime_s: float, clock: Callable[[], float] = time.time
    ) -> None:  # wall clock: JWT times (iat, exp) are Unix seconds
        self._secret = secret
        self._role = role
        self._lifetime_s = lifetime_s
        self._clock = clock
        self._token = ""
        self._renew_at = 0.0

    def token(self) -> str:
        now = self._clock()
        if now >= self._renew_at:
            claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": self._role, "iat": int(now)}
            claims["exp"] = int(now + self._lifetime_s)
            self._token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
            self._renew_at = now + self._lifetime_s / 2
        return self._token


class ServiceTokenVerifier:
    """Checks a call's service token against the roles its method accepts."""

    def __init__(self, secret: str, allowed: Mapping[str, frozenset[str]] = ALLOWED_ROLES) -> None:
        self._secret = secret
        self._allowed = allowed

    def refusal(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on; otherwise the status and message to refuse it with."""
        roles = next((r for prefix, r in self._allowed.items() if method.startswith(prefix)), None)
        if roles is None:
            return None
        token = _bearer(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "internal service: a service token is required"
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            return grpc.StatusCode.UNAUTHENTICATED, "internal service: service token expired"
        except jwt.PyJWTError:
            return grpc.StatusCode.UNAUTHENTICATED, "internal service: service token invalid"
        if claims.get("sub") not in roles:
            return grpc.StatusCode.PERMISSION_DENIED, "internal service: this role may not call this method"
        return None


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode(errors="replace")
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor


class ServiceAuthInterceptor(_ServerInterceptor):
    """Refuses calls to internal methods without a valid token of an allowed role, before any handler runs."""

    def __init__(self, verifier: ServiceTokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        refusal = self._verifier.refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        if refusal is None:
            return await continuation(handler_call_details)
        code, message = refusal

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(code, message)

        # The request is never decoded: a refused caller costs no parsing.
        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None)


class ServiceCredentials(_ClientInterceptor):
    """Adds this process's service token to every call on a channel to an internal service."""

    def __init__(self, signer: ServiceTokenSigner) -> None:
        self._signer = signer

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        metadata["authorization"] = f"Bearer {self._signer.token()}"
        d = client_call_details
        details = grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)
        return await continuation(details, request)
