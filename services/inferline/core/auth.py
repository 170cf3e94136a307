"""API-key authentication: ``authorization: Bearer <key>`` metadata → tenant name.

Keys are stored only as SHA-256 digests; a check hashes the presented key (about a
microsecond) and looks the digest up in a dict, whatever the number of tenants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from inferline.core.config import TenantConfig
from inferline.core.errors import Unauthenticated


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyAuthenticator:
    """Resolves the bearer key of a call to the tenant that owns it."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._tenant_by_digest = {digest: name for name, t in tenants.items() for digest in t.api_key_sha256}

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """Return the tenant name for the call's ``authorization`` metadata.

        Raises:
            Unauthenticated: no bearer key, or a key no tenant owns.
        """
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
                break
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>'")
        tenant = self._tenant_by_digest.get(hash_api_key(token))
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant
