import base64
import hashlib
import hmac
import json
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from inferline.core.auth import ApiKeyAuthenticator, Authenticator, JwtVerifier, hash_api_key, looks_like_jwt
from inferline.core.config import ConfigError, JwtConfig, JwtKeyConfig, TenantConfig
from inferline.core.errors import Unauthenticated


@pytest.fixture
def auth() -> ApiKeyAuthenticator:
    tenants = {
        "a": TenantConfig(api_key_sha256=[hash_api_key("key-a")], routes=[]),
        "b": TenantConfig(api_key_sha256=[hash_api_key("key-b1"), hash_api_key("key-b2")], routes=[]),
    }
    return ApiKeyAuthenticator(tenants)


def test_keys_resolve_to_their_tenant(auth: ApiKeyAuthenticator) -> None:
    assert auth.authenticate([("authorization", "Bearer key-a")]) == "a"
    assert auth.authenticate([("x-other", "1"), ("authorization", "Bearer key-b2")]) == "b"


@pytest.mark.parametrize("value", [" Bearer key-a", "Bearer  key-a", "bearer key-a ", "\tBEARER key-a"])
def test_whitespace_clients_commonly_send_around_the_token_is_accepted(auth: ApiKeyAuthenticator, value: str) -> None:
    # perf_analyzer's -H "authorization: Bearer KEY" keeps the space after the colon.
    assert auth.authenticate([("authorization", value)]) == "a"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing"),
        ([("authorization", "key-a")], "must be 'Bearer"),
        ([("authorization", "Basic key-a")], "must be 'Bearer"),
        ([("authorization", "Bearer ")], "must be 'Bearer"),
        ([("authorization", "   ")], "must be 'Bearer"),
        ([("authorization", "Bearer key-a extra")], "must be 'Bearer"),
        ([("authorization", "Bearer wrong")], "unknown API key"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    auth: ApiKeyAuthenticator, metadata: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        auth.authenticate(metadata)


# --- JWT ---------------------------------------------------------------------------------

SECRET = "hs256-secret-for-tests-0123456789abcdef"
OTHER_SECRET = "another-secret-nobody-configured-0123456789"
SECRET_ENV = "TEST_JWT_SECRET"
ISSUER = "https://issuer.test"
AUDIENCE = "inferline"

TENANTS = {
    "acme": TenantConfig(api_key_sha256=[hash_api_key("key-acme")], jwt_subjects=["svc-acme"], routes=[]),
    "beta": TenantConfig(jwt_subjects=["svc-beta"], routes=[]),
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def public_pem(tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey) -> pathlib.Path:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(
        rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@pytest.fixture
def jwt_config(public_pem: pathlib.Path) -> JwtConfig:
    return JwtConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        keys=[
            JwtKeyConfig(kid="hs", algorithm="HS256", secret_env=SECRET_ENV),
            JwtKeyConfig(kid="rs", algorithm="RS256", public_key_file=public_pem),
        ],
    )


@pytest.fixture
def verifier(jwt_config: JwtConfig) -> JwtVerifier:
    return JwtVerifier(jwt_config, TENANTS, environ={SECRET_ENV: SECRET})


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for ``jwt_config``; an override of None drops the claim."""
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60, "tenant": "beta"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET, kid: str | None = "hs") -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=None if kid is None else {"kid": kid})


def raw_token(header: dict[str, Any], payload: Any, hmac_key: bytes) -> str:
    """A token built by hand (PyJWT refuses to sign some of the attacks), HMAC-SHA256 signed with ``hmac_key``."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_hs256_token_resolves_the_tenant_claim(verifier: JwtVerifier) -> None:
    assert verifier.verify(hs256(claims(tenant="beta"))) == "beta"
    assert verifier.verify(hs256(claims(tenant="acme", sub="svc-beta"))) == "acme"  # the claim wins over sub


def test_hs256_token_without_tenant_claim_resolves_sub(verifier: JwtVerifier) -> None:
    assert verifier.verify(hs256(claims(tenant=None, sub="svc-acme"))) == "acme"
    assert verifier.verify(hs256(claims(tenant=None, sub="svc-beta"))) == "beta"


def test_custom_tenant_claim(public_pem: pathlib.Path) -> None:
    config = JwtConfig(tenant_claim="org", keys=[JwtKeyConfig(algorithm="HS256", secret_env=SECRET_ENV)])
    verifier = JwtVerifier(config, TENANTS, environ={SECRET_ENV: SECRET})
    assert verifier.verify(hs256({"exp": int(time.time()) + 60, "org": "acme"}, kid=None)) == "acme"
    with pytest.raises(Unauthenticated, match="neither a 'org' nor a 'sub' claim"):
        verifier.verify(hs256({"exp": int(time.time()) + 60, "tenant": "acme"}, kid=None))


def test_rs256_token(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rs"})) == "beta"
    assert verifier.verify(jwt.encode(claims(tenant="acme"), rsa_key, algorithm="RS256")) == "acme"


def test_rs256_token_signed_by_another_key_is_rejected(verifier: JwtVerifier) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rs"}))


def test_forged_signature_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(hs256(claims(), secret=OTHER_SECRET))
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(hs256(claims(), secret=OTHER_SECRET, kid=None))


def test_tampered_payload_is_rejected(verifier: JwtVerifier) -> None:
    header, _, signature = hs256(claims(tenant="beta")).split(".")
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims(tenant="acme")).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(f"{header}.{forged_payload}.{signature}")


def test_expiry_with_leeway(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="JWT expired"):
        verifier.verify(hs256(claims(exp=int(time.time()) - 60)))
    # leeway_s defaults to 5: a token expired 2 s ago still passes
    assert verifier.verify(hs256(claims(exp=int(time.time()) - 2))) == "beta"


def test_exp_is_required(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="required 'exp' claim"):
        verifier.verify(hs256(claims(exp=None)))


def test_not_yet_valid_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="not yet valid"):
        verifier.verify(hs256(claims(nbf=int(time.time()) + 60)))


def test_wrong_issuer_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="JWT issuer invalid"):
        verifier.verify(hs256(claims(iss="https://evil.test")))
    with pytest.raises(Unauthenticated, match="required 'iss' claim"):
        verifier.verify(hs256(claims(iss=None)))


def test_wrong_audience_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="JWT audience invalid"):
        verifier.verify(hs256(claims(aud="someone-else")))
    with pytest.raises(Unauthenticated, match="required 'aud' claim"):
        verifier.verify(hs256(claims(aud=None)))


def test_unconfigured_issuer_and_audience() -> None:
    config = JwtConfig(keys=[JwtKeyConfig(algorithm="HS256", secret_env=SECRET_ENV)])
    verifier = JwtVerifier(config, TENANTS, environ={SECRET_ENV: SECRET})
    assert verifier.verify(hs256(claims(iss="anyone", aud=None), kid=None)) == "beta"
    # no audience configured: a token meant for some audience is not for us
    with pytest.raises(Unauthenticated, match="JWT audience invalid"):
        verifier.verify(hs256(claims(), kid=None))


def test_alg_none_is_rejected(verifier: JwtVerifier) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "none", "kid": "hs"}):
        unsigned = raw_token(header, claims(), b"").rsplit(".", 1)[0] + "."  # empty signature segment
        with pytest.raises(Unauthenticated, match="algorithm 'none' is not allowed"):
            verifier.verify(unsigned)


def test_algorithm_not_configured_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="algorithm 'HS512' is not allowed"):
        verifier.verify(jwt.encode(claims(), SECRET + SECRET, algorithm="HS512"))


def test_rs256_public_key_as_hs256_secret_is_rejected(verifier: JwtVerifier, public_pem: pathlib.Path) -> None:
    """Algorithm confusion: an attacker signs HS256 with the (public) RSA key as the HMAC secret."""
    pem = public_pem.read_bytes()
    with pytest.raises(Unauthenticated, match="'HS256' does not match key 'rs'"):
        verifier.verify(raw_token({"alg": "HS256", "typ": "JWT", "kid": "rs"}, claims(), pem))
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(raw_token({"alg": "HS256", "typ": "JWT"}, claims(), pem))
    rs_only = JwtVerifier(JwtConfig(keys=[JwtKeyConfig(algorithm="RS256", public_key_file=public_pem)]), TENANTS)
    with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not allowed"):
        rs_only.verify(raw_token({"alg": "HS256", "typ": "JWT"}, claims(aud=None), pem))


def test_unknown_tenant_or_subject_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthenticated, match="JWT names unknown tenant 'nope'"):
        verifier.verify(hs256(claims(tenant="nope")))
    with pytest.raises(Unauthenticated, match="JWT names unknown tenant 5"):
        verifier.verify(hs256(claims(tenant=5)))
    with pytest.raises(Unauthenticated, match="JWT subject 'svc-nobody' belongs to no tenant"):
        verifier.verify(hs256(claims(tenant=None, sub="svc-nobody")))
    with pytest.raises(Unauthenticated, match="neither a 'tenant' nor a 'sub' claim"):
        verifier.verify(hs256(claims(tenant=None)))


def test_kid_selects_the_key(public_pem: pathlib.Path) -> None:
    config = JwtConfig(
        keys=[
            JwtKeyConfig(kid="k1", algorithm="HS256", secret_env="K1"),
            JwtKeyConfig(kid="k2", algorithm="HS256", secret_env="K2"),
        ]
    )
    verifier = JwtVerifier(config, TENANTS, environ={"K1": SECRET, "K2": OTHER_SECRET})
    signed_by_k2 = claims(iss=None, aud=None)
    assert verifier.verify(hs256(signed_by_k2, secret=OTHER_SECRET, kid="k2")) == "beta"
    # no kid: every HS256 key is tried (key rotation)
    assert verifier.verify(hs256(signed_by_k2, secret=OTHER_SECRET, kid=None)) == "beta"
    # a kid restricts the check to that key alone
    with pytest.raises(Unauthenticated, match="JWT signature invalid"):
        verifier.verify(hs256(signed_by_k2, secret=OTHER_SECRET, kid="k1"))
    with pytest.raises(Unauthenticated, match="unknown key id 'k3'"):
        verifier.verify(hs256(signed_by_k2, secret=OTHER_SECRET, kid="k3"))


@pytest.mark.parametrize(
    ("header", "make_payload", "message"),
    [
        ({"alg": ["HS256"]}, lambda: claims(), r"algorithm \['HS256'\] is not allowed"),
        ({"kid": "hs"}, lambda: claims(), "algorithm None is not allowed"),
        ({"alg": "HS256", "kid": 5}, lambda: claims(), "malformed JWT"),
        ({"alg": "HS256"}, lambda: claims(exp="soon"), "JWT invalid"),
        ({"alg": "HS256"}, lambda: claims(exp=[1]), "JWT invalid"),
        ({"alg": "HS256"}, lambda: claims(tenant=None, sub={"id": 1}), "JWT invalid"),
        ({"alg": "HS256"}, lambda: claims(aud=[AUDIENCE, 5]), "JWT audience invalid"),
        ({"alg": "HS256"}, lambda: ["not", "an", "object"], "JWT invalid"),
    ],
)
def test_odd_tokens_are_only_ever_unauthenticated(
    verifier: JwtVerifier, header: dict[str, Any], make_payload: Callable[[], Any], message: str
) -> None:
    """Payloads are made when the test runs, not when it is collected: ``exp`` must not pass in between."""
    with pytest.raises(Unauthenticated, match=message):
        verifier.verify(raw_token(header, make_payload(), SECRET.encode()))


@pytest.mark.parametrize("token", ["", "a.b.c", "not a jwt", "eyJhbGciOiJIUzI1NiJ9.!!!.x", "...", "é.é.é"])
def test_malformed_tokens_are_unauthenticated(verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated, match="malformed JWT"):
        verifier.verify(token)


def test_missing_secret_env_names_the_key(jwt_config: JwtConfig) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"jwt.keys[0].secret_env: environment variable {SECRET_ENV}")):
        JwtVerifier(jwt_config, TENANTS, environ={})


def test_weak_or_empty_secret_is_a_config_error(jwt_config: JwtConfig) -> None:
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[0]: The HMAC key is 5 bytes long")):
        JwtVerifier(jwt_config, TENANTS, environ={SECRET_ENV: "short"})
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[0].secret_env")):
        JwtVerifier(jwt_config, TENANTS, environ={SECRET_ENV: ""})


def test_bad_public_key_file_names_the_key(tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey) -> None:
    def verifier_for(path: pathlib.Path) -> JwtVerifier:
        keys = [
            JwtKeyConfig(algorithm="HS256", secret_env=SECRET_ENV),
            JwtKeyConfig(algorithm="RS256", public_key_file=path),
        ]
        return JwtVerifier(JwtConfig(keys=keys), TENANTS, environ={SECRET_ENV: SECRET})

    with pytest.raises(ConfigError, match=re.escape("jwt.keys[1].public_key_file: cannot read")):
        verifier_for(tmp_path / "missing.pem")
    private = tmp_path / "private.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[1].public_key_file: ") + ".* not a PEM public key"):
        verifier_for(private)
    ec_public = tmp_path / "ec.pem"
    ec_public.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[1].public_key_file: ") + ".* not an RSA public key"):
        verifier_for(ec_public)


def test_duplicate_kid_or_subject_is_a_config_error(public_pem: pathlib.Path) -> None:
    keys = [JwtKeyConfig(kid="k", algorithm="HS256", secret_env=SECRET_ENV)] * 2
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[1].kid: 'k' is used by another key")):
        JwtVerifier(JwtConfig(keys=keys), TENANTS, environ={SECRET_ENV: SECRET})
    tenants = {**TENANTS, "gamma": TenantConfig(jwt_subjects=["svc-acme"], routes=[])}
    with pytest.raises(ConfigError, match="'svc-acme' already belongs to tenant 'acme'"):
        JwtVerifier(JwtConfig(keys=keys[:1]), tenants, environ={SECRET_ENV: SECRET})


# --- Authenticator: API keys and JWTs side by side --------------------------------------------


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def authenticator(jwt_config: JwtConfig) -> Authenticator:
    return Authenticator(TENANTS, jwt_config, environ={SECRET_ENV: SECRET})


def test_authenticator_accepts_api_keys_and_jwts(authenticator: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert authenticator.authenticate(bearer("key-acme")) == "acme"
    assert authenticator.authenticate([("authorization", b"Bearer key-acme")]) == "acme"
    assert authenticator.authenticate(bearer(hs256(claims()))) == "beta"
    assert authenticator.authenticate(bearer(jwt.encode(claims(), rsa_key, algorithm="RS256"))) == "beta"


def test_authenticator_reports_jwt_failures_as_such(authenticator: Authenticator) -> None:
    with pytest.raises(Unauthenticated, match="JWT expired"):
        authenticator.authenticate(bearer(hs256(claims(exp=int(time.time()) - 60))))
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticator.authenticate(bearer("key-unknown"))
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticator.authenticate(bearer("dotted.api.key"))  # three segments, but no JWT header
    with pytest.raises(Unauthenticated, match="missing"):
        authenticator.authenticate(None)


def test_authenticator_without_jwt_treats_tokens_as_api_keys() -> None:
    authenticator = Authenticator(TENANTS, None)
    assert authenticator.authenticate(bearer("key-acme")) == "acme"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticator.authenticate(bearer(hs256(claims())))


def test_authenticator_fails_at_construction_on_a_missing_secret(jwt_config: JwtConfig) -> None:
    with pytest.raises(ConfigError, match=re.escape("jwt.keys[0].secret_env")):
        Authenticator(TENANTS, jwt_config, environ={})


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(hs256(claims()))
    for token in ["key-acme", "a.b.c", "a.b", "e30.e30.x", "eyJhbGciOiJIUzI1NiJ9.x", "é.é.é", "[[[[.x.y"]:
        assert not looks_like_jwt(token), token


def test_a_maximum_lifetime_refuses_long_lived_tokens_and_requires_iat(jwt_config: JwtConfig) -> None:
    limited = JwtVerifier(jwt_config.model_copy(update={"max_lifetime_s": 3600}), TENANTS, {SECRET_ENV: SECRET})
    now = int(time.time())
    assert limited.verify(hs256(claims(iat=now, exp=now + 3600))) == "beta"
    with pytest.raises(Unauthenticated, match=r"lifetime \(exp - iat\) exceeds the 3600 s allowed"):
        limited.verify(hs256(claims(iat=now, exp=now + 3601)))
    with pytest.raises(Unauthenticated, match="lifetime"):
        limited.verify(hs256(claims(iat=now, exp=1e300)))  # the token the issue found accepted
    with pytest.raises(Unauthenticated, match="'iat'"):
        limited.verify(hs256(claims()))
    # Without the limit, the same long-lived token still passes: the limit is what refuses it.
    assert (
        JwtVerifier(jwt_config, TENANTS, {SECRET_ENV: SECRET}).verify(hs256(claims(iat=now, exp=now + 10**9))) == "beta"
    )
