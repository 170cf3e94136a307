"""Session fixtures that run real servers (Triton, ...) for the integration tests.

Each server fixture starts a real process on free ports, logs under ``tmp_path_factory``,
yields an object with a ``log_path`` and stops the process at teardown. A missing binary
skips with the marker's name outside CI and fails under CI (``CI=true``), where
``make test`` installs everything.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Generator, Iterator

import pytest

from inferline.core.config import TritonConfig
from inferline.triton.launcher import TritonLauncher, find_tritonserver
from tests.integration.redis_fixtures import redis_left_running, redis_server
from tests.integration.router_fixtures import router_config, router_server

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
__all__ = ["redis_left_running", "redis_server", "router_config", "router_server"]  # re-exported fixtures
LOG_TAIL_BYTES = 4000

# Fixture → marker: every test using the fixture gets the marker, so `-m "not requires_triton"` deselects it.
FIXTURE_MARKERS = {
    "triton_server": "requires_triton",
    "router_server": "requires_triton",
    "redis_server": "requires_redis",
}


def require(available: bool, marker: str, reason: str) -> None:
    """Skip (outside CI) or fail (under CI) when a binary a fixture needs is missing."""
    if available:
        return
    message = f"{marker}: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def log_tail(path: pathlib.Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a server log, decoded leniently."""
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log tail of every server fixture a failed test used to its report."""
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            path = getattr(value, "log_path", None)
            if isinstance(path, pathlib.Path):
                report.sections.append((f"{name} log tail ({path})", log_tail(path)))
    return report


@pytest.fixture(scope="session")
def triton_config() -> TritonConfig:
    """Config of the bundled Triton on the repository's models, every port picked free."""
    server_env = REPO_ROOT / ".venv-triton"
    require(find_tritonserver(server_env) is not None, "requires_triton", f"no tritonserver in {server_env}")
    return TritonConfig(
        model_repository=REPO_ROOT / "triton_models",
        server_env=server_env,
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        startup_timeout_s=120,
    )


@pytest.fixture(scope="session")
def triton_server(triton_config: TritonConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonLauncher]:
    """A running bundled Triton with all models of ``triton_models/`` ready."""
    launcher = TritonLauncher(triton_config, log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log")
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()
