"""Errors that echo caller input stay small, and never name where a dependency runs."""

from __future__ import annotations

import pytest

from inferline.core.errors import (
    MAX_ECHO_CHARS,
    MAX_MESSAGE_CHARS,
    InvalidInput,
    ModelNotFound,
    RouteNotFound,
    redact_addresses,
    to_status,
)


@pytest.mark.parametrize("error", [RouteNotFound("r" * 10_000), ModelNotFound("m" * 10_000)])
def test_a_huge_echoed_name_is_cut_in_the_message_and_the_metadata(error: RouteNotFound | ModelNotFound) -> None:
    status = to_status(error)
    # Far below gRPC clients' 16 KB metadata limit: the caller gets NOT_FOUND, not "Stream removed".
    assert len(status.SerializeToString()) < 1000
    assert "..." in error.message
    assert all(len(value) <= MAX_ECHO_CHARS for value in error.metadata.values())


def test_every_message_is_bounded_whatever_built_it() -> None:
    error = InvalidInput("f" * 500, "x" * 50_000)
    assert len(error.message) <= MAX_MESSAGE_CHARS
    assert len(error.field) <= MAX_ECHO_CHARS


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8001: Connection refused",
            "failed to connect to all addresses; last error: UNKNOWN: <address>: Connection refused",
        ),
        ("connect to 10.0.0.7:8001 failed", "connect to <address> failed"),
        ("ipv6:[::1]:8001 unreachable", "<address> unreachable"),
        ("unix:/tmp/triton.sock: no such file", "<address>: no such file"),
        ("Request timeout expired", "Request timeout expired"),
    ],
)
def test_addresses_are_redacted_from_dependency_messages(text: str, redacted: str) -> None:
    assert redact_addresses(text) == redacted
