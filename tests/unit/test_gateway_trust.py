"""``GatewayTrust``: gateway headers count only on calls carrying the deployment's gateway secret."""

from __future__ import annotations

import pytest

from inferline.core.config import ConfigError
from inferline.core.headers import GATEWAY_SECRET, INGRESS_TIMEOUT
from inferline.router.gateway_trust import GatewayTrust

SECRET = "s" * 24


def test_a_call_with_the_secret_came_through_the_gateway() -> None:
    assert GatewayTrust(SECRET).from_gateway([(INGRESS_TIMEOUT, "100m"), (GATEWAY_SECRET, SECRET)])
    assert GatewayTrust(SECRET).from_gateway([(GATEWAY_SECRET, SECRET.encode())])  # bytes values too


@pytest.mark.parametrize(
    "metadata",
    [
        [(INGRESS_TIMEOUT, "99999999S")],  # the header alone
        [(INGRESS_TIMEOUT, "100m"), (GATEWAY_SECRET, "guess")],  # a wrong secret
        [(INGRESS_TIMEOUT, "100m"), (GATEWAY_SECRET, SECRET[:-1])],  # a prefix of the right one
        [(INGRESS_TIMEOUT, "100m"), (GATEWAY_SECRET, "")],
    ],
)
def test_gateway_headers_without_the_secret_are_ignored_and_counted(metadata: list[tuple[str, str]]) -> None:
    seen: list[str] = []
    assert not GatewayTrust(SECRET, seen.append).from_gateway(metadata)
    assert seen == [key for key, _ in metadata]


def test_a_router_without_a_secret_trusts_no_call() -> None:
    seen: list[str] = []
    trust = GatewayTrust.from_environment("GW_SECRET", environ={}, on_untrusted=seen.append)
    assert not trust.enabled
    # Envoy writes "-" for an unset %ENVIRONMENT()%: that never matches either.
    assert not trust.from_gateway([(GATEWAY_SECRET, "-"), (INGRESS_TIMEOUT, "100m")])
    assert seen == [GATEWAY_SECRET, INGRESS_TIMEOUT]


def test_calls_without_gateway_headers_count_nothing() -> None:
    seen: list[str] = []
    assert not GatewayTrust(SECRET, seen.append).from_gateway([("authorization", "Bearer k")])
    assert not GatewayTrust(SECRET, seen.append).from_gateway(None)
    assert seen == []


def test_a_short_secret_fails_the_start_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway.secret_env: environment variable GW_SECRET .* 16"):
        GatewayTrust.from_environment("GW_SECRET", environ={"GW_SECRET": "short"})
