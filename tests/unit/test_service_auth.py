"""Service tokens between a router and the internal services: signing, renewal, and each refusal."""

from __future__ import annotations

import grpc
import jwt
import pytest

from inferline.core.config import ConfigError
from inferline.core.service_auth import (
    ROUTER,
    ServiceTokenSigner,
    ServiceTokenVerifier,
    service_secret,
)

SECRET = "k" * 48
RECORD = "/inferline.internal.v1.Degradation/RecordScores"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_a_token_is_reused_until_half_its_lifetime_is_gone() -> None:
    clock = Clock()
    signer = ServiceTokenSigner(SECRET, ROUTER, lifetime_s=300, clock=clock)
    first = signer.token()
    clock.now += 149
    assert signer.token() == first
    clock.now += 2
    renewed = signer.token()
    assert renewed != first
    claims = jwt.decode(renewed, options={"verify_signature": False})  # times are the fake clock's
    assert claims["sub"] == ROUTER and claims["exp"] - claims["iat"] == 300


def test_a_routers_token_may_call_every_internal_method() -> None:
    verifier = ServiceTokenVerifier(SECRET)
    token = ServiceTokenSigner(SECRET, ROUTER, lifetime_s=60).token()
    for method in (RECORD, "/inferline.internal.v1.Degradation/Degrade", "/inferline.internal.v1.Features/GetFeatures"):
        assert verifier.refusal(method, bearer(token)) is None


def credentials(kind: str) -> list[tuple[str, str]]:
    """The call metadata of each kind of caller, made when the test runs (tokens expire)."""
    if kind == "none":
        return []
    if kind == "not-bearer":
        return [("authorization", "Basic abc")]
    if kind == "garbage":
        return bearer("not-a-jwt")
    signers = {
        "other-secret": ServiceTokenSigner("z" * 48, ROUTER, lifetime_s=60),
        "expired": ServiceTokenSigner(SECRET, ROUTER, lifetime_s=60, clock=lambda: 1000.0),
        "other-role": ServiceTokenSigner(SECRET, "stream", lifetime_s=60),
    }
    return bearer(signers[kind].token())


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("none", grpc.StatusCode.UNAUTHENTICATED),
        ("not-bearer", grpc.StatusCode.UNAUTHENTICATED),
        ("garbage", grpc.StatusCode.UNAUTHENTICATED),
        ("other-secret", grpc.StatusCode.UNAUTHENTICATED),
        ("expired", grpc.StatusCode.UNAUTHENTICATED),
        ("other-role", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_each_refusal_has_its_status(kind: str, code: grpc.StatusCode) -> None:
    refusal = ServiceTokenVerifier(SECRET).refusal(RECORD, credentials(kind))
    assert refusal is not None and refusal[0] == code


def test_health_and_reflection_need_no_token() -> None:
    verifier = ServiceTokenVerifier(SECRET)
    assert verifier.refusal("/grpc.health.v1.Health/Check", []) is None
    assert verifier.refusal("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", []) is None


@pytest.mark.parametrize(("environ", "why"), [({}, "is not set"), ({"S": "short"}, "must hold at least 32")])
def test_a_missing_or_weak_secret_fails_the_start_naming_the_key(environ: dict[str, str], why: str) -> None:
    with pytest.raises(ConfigError, match=f"services.secret_env: environment variable S {why}"):
        service_secret("S", environ)
