import pytest

from inferline.core.auth import ApiKeyAuthenticator, hash_api_key
from inferline.core.config import TenantConfig
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


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing"),
        ([("authorization", "key-a")], "must be 'Bearer"),
        ([("authorization", "Basic key-a")], "must be 'Bearer"),
        ([("authorization", "Bearer ")], "must be 'Bearer"),
        ([("authorization", "Bearer wrong")], "unknown API key"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    auth: ApiKeyAuthenticator, metadata: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        auth.authenticate(metadata)
