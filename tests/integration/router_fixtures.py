"""Fixtures that run the router as a real process (``inferline up`` / ``inferline serve``)."""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
import yaml

from inferline.bench import harness
from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_ports

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVING_LINE = '"msg": "serving '
"""How ``inferline up`` / ``serve`` logs that start-up is over (``runtime.serve_process``)."""
DEMO_KEY = "inferline-demo-key"
LIMITED_KEY = "limited-tenant-key"


@dataclass
class ServerProcess:
    """An ``inferline`` process (started and reaped by the bench harness's ``ServerProcess``)."""

    address: str
    metrics_port: int
    server: harness.ServerProcess

    @property
    def log_path(self) -> pathlib.Path:
        return self.server.log_path

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM, SIGKILL after ``timeout_s``; always reaped. Returns the exit code."""
        return self.server.stop(timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        return self.server.log_tail(chars)


FUNCTIONAL_BUDGETS = {"features_ms": 1000, "model_ms": 1000}
"""Layer budgets for tests of what the router answers, not of when. The default config's
(20 ms for the features, 60 ms for the model) are now and then missed on a busy 2-core
machine, and the router then rightly answers from its fallback: a test expecting PRIMARY
would fail for the machine's speed. Each layer still gets no more than the call's deadline
leaves; the deadline and degradation tests (tests/fault) keep the default budgets."""


FUNCTIONAL_QUEUE_WAIT_MS = 5000.0
"""Every class's queue-wait target for the same tests: under a loaded machine the router's event
loop lags 30-70 ms now and then, past ``standard``'s 30 ms target, and the router then rightly
sheds (or degrades ``critical``) — a test of what the router answers would fail for the
machine's speed. Admission is tested apart (tests/unit, tests/fault, the gateway tests' own
overrides)."""


FUNCTIONAL_ADMISSION = {"protected_miss_rate": None}
"""Every route's admission for the same tests: a test that makes critical calls miss on purpose
(a deadline shorter than the fallback reserve) would otherwise have the router shed the lower
classes of the next tests for a second or two (``AdmissionConfig.protected_miss_rate``)."""


def write_test_config(
    path: pathlib.Path,
    *,
    budgets: Mapping[str, float] | None = None,
    queue_wait_target_ms: float | None = None,
    admission: Mapping[str, object] | None = None,
    **server: object,
) -> pathlib.Path:
    """The default config with absolute paths, a second, limited tenant, every route's ``budgets``
    and ``admission`` patched (e.g. ``FUNCTIONAL_BUDGETS``, ``FUNCTIONAL_ADMISSION``), every
    class's ``queue_wait_target_ms`` if given (e.g. ``FUNCTIONAL_QUEUE_WAIT_MS``) and server
    overrides; no protected lane."""
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    raw["triton"]["model_repository"] = str(ROOT / "triton_models")
    raw["triton"]["server_env"] = str(ROOT / ".venv-triton")
    raw["feature_store"]["feast_repo"] = str(ROOT / "deploy/feast/feature_repo")
    raw["server"].update(server)
    # One router process per server, so that a test's scrape of its metrics sees every call; the
    # protected lane (gateway.protected_lane) has tests of its own (test_process_topology).
    raw["gateway"]["protected_lane"] = False
    for route in raw["routes"].values():
        route["budgets"].update(budgets or {})
        route["admission"].update(admission or {})
    if queue_wait_target_ms is not None:
        for traffic_class in raw["traffic_classes"].values():
            traffic_class["queue_wait_target_ms"] = queue_wait_target_ms
    import hashlib

    raw["tenants"]["limited"] = {
        "api_key_sha256": [hashlib.sha256(LIMITED_KEY.encode()).hexdigest()],
        "routes": [],
        "traffic_classes": ["batch"],
        "default_traffic_class": "batch",
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def start_inferline(
    args: list[str], log_path: pathlib.Path, env: Mapping[str, str] | None = None, timeout_s: float = 120
) -> ServerProcess:
    port, metrics_port = free_ports(2)
    command = [sys.executable, "-m", "inferline.cli", *args, "--port", str(port), "--metrics-port", str(metrics_port)]
    process = harness.ServerProcess(args[0], f"127.0.0.1:{port}", command, log_path, env=env, cwd=ROOT)
    process.start()
    server = ServerProcess(process.url, metrics_port, process)
    try:
        wait_until_serving(server.address, timeout_s, is_alive=process.alive)
    except TimeoutError:
        server.stop()
        raise AssertionError(f"{' '.join(args)} did not become ready:\n{server.log_tail()}") from None
    # Health answers as soon as the public port serves (through the embedded gateway, that is
    # before the process has finished starting): the process's own "serving ... on port <its
    # public port>" line says it has, and is listening for SIGTERM (a worker's line names its
    # own port). On a busy machine the gap is long enough for a test to read a log without
    # that line, or to stop a process not yet ready to drain.
    deadline = time.monotonic() + timeout_s
    while not any(
        SERVING_LINE in line and f" on port {port} " in line for line in server.log_tail(1_000_000).splitlines()
    ):
        if time.monotonic() > deadline or not process.alive():
            server.stop()
            raise AssertionError(f"{' '.join(args)} never logged that it serves:\n{server.log_tail()}")
        time.sleep(0.02)
    return server


def start_router(
    triton_server: object,
    router_config: pathlib.Path,
    log_dir: pathlib.Path,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """``inferline up --no-gateway`` with ``router_config`` (and ``env``) against the session's real Triton:
    the router on the port, as tests of its own behaviour need (the gateway's tests put one in front)."""
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    args = ["up", "--no-gateway", "--config", str(router_config), "--triton-url", url]  # the router itself
    return start_inferline(args, log_dir / "router.log", env)


@pytest.fixture(scope="session")
def router_config(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_test_config(
        tmp_path_factory.mktemp("router") / "inferline.yaml",
        budgets=FUNCTIONAL_BUDGETS,
        queue_wait_target_ms=FUNCTIONAL_QUEUE_WAIT_MS,
        admission=FUNCTIONAL_ADMISSION,
        max_message_bytes=65536,
    )


@pytest.fixture(scope="session")
def router_server(
    triton_server: object, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """``inferline up`` against the session's real Triton, with in-process services."""
    server = start_router(triton_server, router_config, tmp_path_factory.mktemp("router-log"))
    yield server
    code = server.stop()
    assert code == 0, f"router exited with {code}:\n{server.log_tail()}"
