"""Fixtures that run the router as a real process (``inferline up`` / ``inferline serve``)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
import yaml

from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_KEY = "inferline-demo-key"
LIMITED_KEY = "limited-tenant-key"


@dataclass
class ServerProcess:
    address: str
    metrics_port: int
    log_path: pathlib.Path
    process: subprocess.Popen[bytes]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def write_test_config(path: pathlib.Path, **server: object) -> pathlib.Path:
    """The default config with absolute paths, a second, limited tenant and server overrides."""
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    raw["triton"]["model_repository"] = str(ROOT / "triton_models")
    raw["triton"]["server_env"] = str(ROOT / ".venv-triton")
    raw["feature_store"]["feast_repo"] = str(ROOT / "deploy/feast/feature_repo")
    raw["server"].update(server)
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
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "inferline.cli", *args, "--port", str(port), "--metrics-port", str(metrics_port)]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(f"127.0.0.1:{port}", metrics_port, log_path, process)
    try:
        wait_until_serving(server.address, timeout_s, is_alive=lambda: process.poll() is None)
    except TimeoutError:
        server.stop(signal.SIGKILL)
        raise AssertionError(f"{' '.join(args)} did not become ready:\n{server.log_tail()}") from None
    return server


@pytest.fixture(scope="session")
def router_config(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_test_config(tmp_path_factory.mktemp("router") / "inferline.yaml", max_message_bytes=65536)


@pytest.fixture(scope="session")
def router_server(
    triton_server: object, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """``inferline up`` against the session's real Triton, with in-process services."""
    url = triton_server.grpc_url  # type: ignore[attr-defined]
    log = tmp_path_factory.mktemp("router-log") / "router.log"
    server = start_inferline(["up", "--config", str(router_config), "--triton-url", url], log)
    yield server
    code = server.stop()
    assert code == 0, f"router exited with {code}:\n{server.log_tail()}"
