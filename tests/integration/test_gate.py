"""The router's ``RequestGate`` through real router processes: quotas, JWT and API-key auth, tenant rules.

Three ``inferline up`` processes against the session's real Triton: one with in-memory
quotas and a ``jwt:`` section (HS256 secret from the environment, RS256 public key file
with a ``kid``), and two replicas sharing their quotas through the session's real
``redis-server``. Tokens are signed here with PyJWT, or by hand where PyJWT refuses to
(``alg: none`` is PyJWT's; an HS256 token signed with the RSA public key is ours).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import jwt
import pytest
import redis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.redis_fixtures import RedisServer
from tests.integration.router_fixtures import (
    DEMO_KEY,
    FUNCTIONAL_ADMISSION,
    FUNCTIONAL_BUDGETS,
    FUNCTIONAL_QUEUE_WAIT_MS,
    ServerProcess,
    start_inferline,
    write_test_config,
)

pytestmark = pytest.mark.requires_triton

ROUTE = "driver_ranking"
OTHER_ROUTE = "driver_ranking_copy"
"""A copy of ``driver_ranking`` under another name that ``jwt_tenant`` may not call."""

KEY_A = "gate-test-key-quota-a"
KEY_B = "gate-test-key-quota-b"
KEY_SHARED = "gate-test-key-shared"
RATE = 1.0
"""One request a second: a refusal is expected while the calls before it took less than a
second together, which holds for a few sequential calls on any machine that is up."""
BURST = 3
FULL_BUCKET_S = BURST / RATE
"""Time in which an empty bucket of ``quota_a`` / ``quota_b`` fills up again."""
SHARED_RATE = 0.5
"""One request per 2 s: nothing refills while the shared-quota test runs."""
SHARED_BURST = 4
PUSHBACK_SLACK_S = 0.02
"""Added to the retry hint (whole ms, rounded down) before retrying."""

SECRET_ENV = "GATE_TEST_JWT_SECRET"
SECRET = "gate-test-hs256-secret-of-at-least-32-bytes!"
FORGED_SECRET = "another-hs256-secret-of-at-least-32-bytes!!"
ISSUER = "https://issuer.gate.test"
AUDIENCE = "inferline-gate-test"
RS_KID = "rs-1"
SUBJECT = "svc-ranker@gate.test"
JWT_TENANT = "jwt_tenant"
JWT_CLASSES = ["standard", "batch"]
"""``jwt_tenant`` may not use ``critical``."""
DEMO_AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
M = TypeVar("M", bound=Message)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _tenant(key: str | None, routes: list[str], quota: tuple[float, int] | None = None, **extra: Any) -> dict:
    tenant: dict[str, Any] = {"routes": routes, **extra}
    if key is not None:
        tenant["api_key_sha256"] = [_digest(key)]
    if quota is not None:
        tenant["quota"] = {"rate_per_s": quota[0], "burst": quota[1]}
    return tenant


def _write_config(path: pathlib.Path, public_key: pathlib.Path, **top: Any) -> pathlib.Path:
    """The test config plus this module's tenants, a second route, a ``jwt:`` section and ``top`` sections."""
    raw = yaml.safe_load(
        write_test_config(
            path,
            budgets=FUNCTIONAL_BUDGETS,
            queue_wait_target_ms=FUNCTIONAL_QUEUE_WAIT_MS,
            admission=FUNCTIONAL_ADMISSION,
        ).read_text()
    )
    raw["routes"][OTHER_ROUTE] = raw["routes"][ROUTE]
    raw["tenants"]["demo"]["routes"] = [ROUTE, OTHER_ROUTE]  # the copy route works: a refusal is the gate's
    raw["tenants"]["quota_a"] = _tenant(KEY_A, [ROUTE], (RATE, BURST))
    raw["tenants"]["quota_b"] = _tenant(KEY_B, [ROUTE], (RATE, BURST))
    raw["tenants"]["shared"] = _tenant(KEY_SHARED, [ROUTE], (SHARED_RATE, SHARED_BURST))
    raw["tenants"][JWT_TENANT] = _tenant(
        None, [ROUTE], jwt_subjects=[SUBJECT], traffic_classes=JWT_CLASSES, default_traffic_class="standard"
    )
    raw["jwt"] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "keys": [
            {"algorithm": "HS256", "secret_env": SECRET_ENV},  # no kid: tried for every HS256 token
            {"kid": RS_KID, "algorithm": "RS256", "public_key_file": str(public_key)},
        ],
    }
    raw.update(top)
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass(frozen=True)
class Keys:
    private: rsa.RSAPrivateKey
    forged: rsa.RSAPrivateKey
    """Another RSA key: signs tokens that claim to be ``RS_KID``'s."""
    public_pem: bytes
    public_path: pathlib.Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("gate-keys") / "rs-1.pub.pem"
    path.write_bytes(pem)
    return Keys(private, forged, pem, path)


def _start(config: pathlib.Path, triton_url: str, log: pathlib.Path) -> ServerProcess:
    server = start_inferline(
        ["up", "--no-gateway", "--config", str(config), "--triton-url", triton_url], log, env={SECRET_ENV: SECRET}
    )
    with grpc.insecure_channel(server.address) as channel:  # load features and model before timing anything
        pb_grpc.InferenceStub(channel).Predict(_request(), timeout=30, metadata=DEMO_AUTH)
    return server


def _stop(*servers: ServerProcess) -> None:
    codes = [(server, server.stop()) for server in servers]
    for server, code in codes:
        assert code == 0, f"router exited with {code}:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def gate_router(triton_server: Any, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One router with in-memory quotas and JWTs."""
    folder = tmp_path_factory.mktemp("gate-router")
    config = _write_config(folder / "inferline.yaml", keys.public_path)
    server = _start(config, triton_server.grpc_url, folder / "router.log")
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def redis_routers(
    triton_server: Any, redis_server: RedisServer, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two router replicas on one config whose quotas live in the session's Redis."""
    folder = tmp_path_factory.mktemp("gate-redis-routers")
    rate_limit = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "key_prefix": "gate-test-quota",  # not the other Redis tests' prefixes
        "timeout_ms": 2000,  # a slow shared machine must not decide a check locally
    }
    config = _write_config(folder / "inferline.yaml", keys.public_path, rate_limit=rate_limit)
    first = _start(config, triton_server.grpc_url, folder / "router-1.log")
    try:
        second = _start(config, triton_server.grpc_url, folder / "router-2.log")
    except BaseException:
        _stop(first)
        raise
    yield first, second
    _stop(first, second)


@pytest.fixture(scope="module")
def stub(gate_router: ServerProcess) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(gate_router.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def _request(route: str = ROUTE, traffic_class: str = "standard") -> pb.PredictRequest:
    return pb.PredictRequest(
        route=route, entities=[pb.EntityKey(name="driver_id", int64_value=1001)], traffic_class=traffic_class
    )


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _predict(stub: pb_grpc.InferenceStub, metadata: tuple[tuple[str, str], ...], **request: str) -> pb.PredictResponse:
    return stub.Predict(_request(**request), timeout=10, metadata=metadata)


def _refused(stub: pb_grpc.InferenceStub, metadata: tuple[tuple[str, str], ...], **request: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _predict(stub, metadata, **request)
    return caught.value


def _detail(err: grpc.RpcError, kind: type[M]) -> M:
    """The first ``kind`` detail of the call's rich status; fails the test when there is none."""
    status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no grpc-status-details-bin on {err.code()}: {err.details()}"
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.full_name} in {status}")


def _assert_refused(err: grpc.RpcError, code: grpc.StatusCode, reason: str, message: str) -> None:
    assert (err.code(), _detail(err, error_details_pb2.ErrorInfo).reason) == (code, reason), err.details()
    assert message in err.details()


def _assert_critical_denied(stub: pb_grpc.InferenceStub, token: str) -> None:
    """jwt_tenant's token may not use the critical class (PERMISSION_DENIED naming the tenant)."""
    err = _refused(stub, _auth(token), traffic_class="critical")
    _assert_refused(
        err,
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        f"tenant {JWT_TENANT!r} may not use traffic class 'critical'",
    )


def _pushback_ms(err: grpc.RpcError) -> int:
    values = [v for k, v in err.trailing_metadata() or () if k == "grpc-retry-pushback-ms"]
    assert len(values) == 1, f"grpc-retry-pushback-ms in trailing metadata {err.trailing_metadata()}"
    return int(values[0])


def _assert_quota_exceeded(err: grpc.RpcError, tenant: str, rate_per_s: float) -> int:
    """Check a quota refusal of ``tenant`` and return its pushback in ms, at most one interval."""
    _assert_refused(
        err, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", f"tenant {tenant!r} is over its request quota"
    )
    retry_ns = _detail(err, error_details_pb2.RetryInfo).retry_delay.ToNanoseconds()
    assert 0 < retry_ns <= 1e9 / rate_per_s
    pushback_ms = _pushback_ms(err)
    assert 0 < pushback_ms <= 1000 / rate_per_s
    assert abs(pushback_ms - retry_ns / 1e6) <= 1  # the same hint, twice
    return pushback_ms


def test_over_quota_is_refused_with_a_retry_hint_that_is_honoured(stub: pb_grpc.InferenceStub) -> None:
    time.sleep(FULL_BUCKET_S)  # a full bucket, whatever ran before
    for _ in range(BURST):
        _predict(stub, _auth(KEY_A))
    pushback_ms = _assert_quota_exceeded(_refused(stub, _auth(KEY_A)), "quota_a", RATE)
    assert 0 < pushback_ms <= 1000
    time.sleep(pushback_ms / 1000 + PUSHBACK_SLACK_S)
    _predict(stub, _auth(KEY_A))
    _assert_quota_exceeded(_refused(stub, _auth(KEY_A)), "quota_a", RATE)  # one let through, not a new burst


def test_a_tenant_cannot_exhaust_another_tenants_quota(stub: pb_grpc.InferenceStub) -> None:
    for _ in range(BURST + 2):  # whatever is left of A's bucket, then a refusal
        try:
            _predict(stub, _auth(KEY_A))
        except grpc.RpcError as err:
            _assert_quota_exceeded(err, "quota_a", RATE)
            break
    else:
        pytest.fail("quota_a was never refused")
    for _ in range(BURST):
        _predict(stub, _auth(KEY_B))
    _assert_quota_exceeded(_refused(stub, _auth(KEY_B)), "quota_b", RATE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "tenant": JWT_TENANT, **override}
    return {k: v for k, v in claims.items() if v is not None}


def _hs256_signed_with_public_key(keys: Keys, kid: str | None) -> str:
    """Algorithm confusion: an HS256 token whose secret is the RS256 public key (PyJWT refuses to sign it)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    signature = hmac.new(keys.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


TokenFactory = Callable[[Keys], str]

VALID_TOKENS: dict[str, TokenFactory] = {
    "hs256-tenant-claim": lambda k: jwt.encode(_claims(), SECRET, algorithm="HS256"),
    "rs256-kid": lambda k: jwt.encode(_claims(), k.private, algorithm="RS256", headers={"kid": RS_KID}),
    "sub-mapped": lambda k: jwt.encode(_claims(tenant=None, sub=SUBJECT), SECRET, algorithm="HS256"),
    "expired-within-leeway": lambda k: jwt.encode(_claims(exp=int(time.time()) - 1), SECRET, algorithm="HS256"),
}

INVALID_TOKENS: dict[str, tuple[TokenFactory, str]] = {
    "hs256-forged": (lambda k: jwt.encode(_claims(), FORGED_SECRET, algorithm="HS256"), "JWT signature invalid"),
    "rs256-forged": (
        lambda k: jwt.encode(_claims(), k.forged, algorithm="RS256", headers={"kid": RS_KID}),
        "JWT signature invalid",
    ),
    "expired": (
        lambda k: jwt.encode(_claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"),
        "JWT expired",
    ),
    "not-yet-valid": (
        lambda k: jwt.encode(_claims(nbf=int(time.time()) + 60), SECRET, algorithm="HS256"),
        "JWT not yet valid",
    ),
    "wrong-issuer": (
        lambda k: jwt.encode(_claims(iss="https://evil.test"), SECRET, algorithm="HS256"),
        "JWT issuer invalid",
    ),
    "wrong-audience": (
        lambda k: jwt.encode(_claims(aud="someone-else"), SECRET, algorithm="HS256"),
        "JWT audience invalid",
    ),
    "no-audience": (
        lambda k: jwt.encode(_claims(aud=None), SECRET, algorithm="HS256"),
        "JWT lacks the required 'aud' claim",
    ),
    "no-expiry": (
        lambda k: jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"),
        "JWT lacks the required 'exp' claim",
    ),
    "alg-none": (lambda k: jwt.encode(_claims(), None, algorithm="none"), "JWT algorithm 'none' is not allowed"),
    "unknown-kid": (
        lambda k: jwt.encode(_claims(), k.private, algorithm="RS256", headers={"kid": "rs-2"}),
        "JWT names unknown key id 'rs-2'",
    ),
    "hs256-with-rs256-kid": (
        lambda k: _hs256_signed_with_public_key(k, RS_KID),
        f"JWT algorithm 'HS256' does not match key {RS_KID!r}",
    ),
    "hs256-signed-with-public-key": (
        lambda k: _hs256_signed_with_public_key(k, None),
        "JWT signature invalid",
    ),
    "unknown-tenant": (
        lambda k: jwt.encode(_claims(tenant="nobody"), SECRET, algorithm="HS256"),
        "JWT names unknown tenant 'nobody'",
    ),
    "unknown-subject": (
        lambda k: jwt.encode(_claims(tenant=None, sub="stranger"), SECRET, algorithm="HS256"),
        "JWT subject 'stranger' belongs to no tenant",
    ),
    "malformed": (lambda k: "eyJhbGciOiJIUzI1NiJ9.not-base64!.sig", "malformed JWT"),
}


@pytest.mark.parametrize("name", VALID_TOKENS)
def test_valid_jwt_resolves_to_its_tenant(stub: pb_grpc.InferenceStub, keys: Keys, name: str) -> None:
    token = VALID_TOKENS[name](keys)
    assert _predict(stub, _auth(token)).predictions
    # It is jwt_tenant's (and no other tenant's) token: only jwt_tenant may not use critical.
    _assert_critical_denied(stub, token)


@pytest.mark.parametrize("name", INVALID_TOKENS)
def test_invalid_jwt_is_unauthenticated(stub: pb_grpc.InferenceStub, keys: Keys, name: str) -> None:
    factory, message = INVALID_TOKENS[name]
    err = _refused(stub, _auth(factory(keys)))
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param(_auth("no-such-key"), "unknown API key", id="unknown-api-key"),
        pytest.param((), "missing 'authorization: Bearer <token>' metadata", id="no-metadata"),
        pytest.param((("authorization", f"Basic {KEY_A}"),), "must be 'Bearer <token>'", id="not-bearer"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    stub: pb_grpc.InferenceStub, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    err = _refused(stub, metadata)
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message)


def test_jwt_tenant_is_denied_routes_and_classes_it_may_not_use(stub: pb_grpc.InferenceStub) -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert _predict(stub, DEMO_AUTH, route=OTHER_ROUTE).predictions  # the route itself serves
    assert _predict(stub, _auth(token), traffic_class="batch").traffic_class == "batch"
    err = _refused(stub, _auth(token), route=OTHER_ROUTE)
    _assert_refused(
        err,
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        f"tenant {JWT_TENANT!r} may not call route {OTHER_ROUTE!r}",
    )
    _assert_critical_denied(stub, token)


@pytest.mark.requires_redis
def test_redis_quota_is_shared_by_router_replicas(
    redis_routers: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    with grpc.insecure_channel(redis_routers[0].address) as one, grpc.insecure_channel(redis_routers[1].address) as two:
        stubs = [pb_grpc.InferenceStub(one), pb_grpc.InferenceStub(two)]
        outcomes: list[tuple[int, str]] = []
        for i in range(2 * SHARED_BURST):
            try:
                _predict(stubs[i % 2], _auth(KEY_SHARED))
                outcomes.append((i % 2, "OK"))
            except grpc.RpcError as err:
                _assert_quota_exceeded(err, "shared", SHARED_RATE)
                outcomes.append((i % 2, "QUOTA_EXCEEDED"))
    # SHARED_BURST in all, both replicas serving and both refusing; per-replica buckets would pass all.
    assert outcomes == [(i % 2, "OK" if i < SHARED_BURST else "QUOTA_EXCEEDED") for i in range(2 * SHARED_BURST)]
    for router in redis_routers:
        assert "rate limit store" not in router.log_tail(100_000), "a check was decided locally"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.pttl("gate-test-quota:shared") > 0  # the bucket lives in Redis
