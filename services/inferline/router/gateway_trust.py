"""``GatewayTrust``: whether a call provably came through the gateway, so its gateway headers count.

The gateway (Envoy) adds headers a router acts on: ``x-inferline-ingress-timeout``, from
which the router measures its transport wait and sheds. A caller could send the same
headers straight to a router's port and make it shed every tenant's traffic. So the
gateway also adds ``x-inferline-gateway-secret``, a per-deployment secret read from the
environment (``gateway.secret_env``) by Envoy and by the routers alike; Envoy drops a
caller's own copy before adding it. A router reads gateway headers only after the caller
authenticated, and only when the secret matches; otherwise it ignores them and counts
them (``inferline_untrusted_headers_total``).

A shared secret rather than mTLS peer identity: it works over plain-text loopback (the
sidecar topology) and through any TLS termination, and costs one constant-time compare.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping, Sequence

from inferline.core.config import ConfigError
from inferline.core.headers import GATEWAY_HEADERS, GATEWAY_SECRET

Metadata = Sequence[tuple[str, str | bytes]] | None
MIN_SECRET_CHARS = 16
"""Shorter secrets are refused at start: a guessable secret would be no boundary."""


class GatewayTrust:
    """Decides per call whether the gateway sent it.

    Args:
        secret: the deployment's gateway secret; None trusts no call (no gateway configured).
        on_untrusted: told the name of each gateway header a call carried without the secret.
    """

    def __init__(self, secret: str | None, on_untrusted: Callable[[str], None] = lambda header: None) -> None:
        self._secret = secret.encode() if secret is not None else None
        self._on_untrusted = on_untrusted

    @classmethod
    def from_environment(
        cls,
        variable: str,
        environ: Mapping[str, str] | None = None,
        on_untrusted: Callable[[str], None] = lambda header: None,
    ) -> GatewayTrust:
        """The trust of a router whose gateway secret is in ``variable`` (unset: trust no call).

        Raises:
            ConfigError: the variable is set but shorter than ``MIN_SECRET_CHARS``.
        """
        secret = (os.environ if environ is None else environ).get(variable)
        if secret is not None and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"gateway.secret_env: environment variable {variable} must hold at least {MIN_SECRET_CHARS} characters"
            )
        return cls(secret or None, on_untrusted)

    @property
    def enabled(self) -> bool:
        """Whether any call can be trusted (a secret is configured)."""
        return self._secret is not None

    def from_gateway(self, metadata: Metadata) -> bool:
        """Whether the call carries the gateway's secret; if not, count the gateway headers it carried."""
        presented: bytes | None = None
        for key, value in metadata or ():
            if key == GATEWAY_SECRET:
                presented = value.encode(errors="replace") if isinstance(value, str) else value
                break
        if self._secret is not None and presented is not None and hmac.compare_digest(presented, self._secret):
            return True
        for key, _ in metadata or ():
            if key in GATEWAY_HEADERS:
                self._on_untrusted(key)
        return False
