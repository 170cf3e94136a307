"""A real Envoy gateway (``inferline gateway render``) in front of real routers, for the integration tests.

Envoy inherits this process's environment, so it adds the session's gateway secret
(``tests/conftest.py``) that the routers started by the tests also hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from inferline.core.config import TlsClientConfig, load_config
from inferline.core.health_wait import wait_until_serving
from inferline.core.ports import free_ports
from inferline.gateway import render_envoy
from tests.integration.router_fixtures import ROOT

ENVOY = ROOT / ".venv/bin/envoy"


@dataclass
class Gateway:
    address: str
    admin_url: str
    log_path: pathlib.Path

    def stat(self, name: str) -> int:
        with urllib.request.urlopen(f"{self.admin_url}/stats?filter=^{name}$", timeout=5) as reply:
            text: str = reply.read().decode()
        values = [int(line.split(": ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name}: ")]
        return sum(values)

    def post_json(self, path: str, body: dict[str, object], **headers: str) -> tuple[int, Any]:
        """A REST call: ``POST <path>`` with a JSON body over HTTP/1.1; (HTTP status, JSON answer)."""
        request = urllib.request.Request(
            f"http://{self.address}{path}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            with err:  # an HTTPError holds the response's socket until closed
                return err.code, json.loads(err.read() or b"{}")


@contextlib.contextmanager
def start_gateway(
    gateway_config: dict[str, Any],
    router_config: pathlib.Path,
    router: str | list[str],
    tmp_path: pathlib.Path,
    *,
    ready_tls: TlsClientConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Gateway]:
    """A real Envoy on free ports, rendered from ``router_config`` with ``gateway_config``, before ``router``(s).

    ``ready_tls``: the listener serves TLS; the readiness check connects with it. ``env``:
    variables added to Envoy's environment.
    """
    raw = yaml.safe_load(router_config.read_text())
    raw["gateway"] = gateway_config
    config_path = tmp_path / "inferline.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    port, admin_port = free_ports(2)
    envoy_yaml = tmp_path / "envoy.yaml"
    routers = [router] if isinstance(router, str) else router
    rendered = render_envoy(load_config(config_path), port=port, admin_port=admin_port, routers=routers)
    envoy_yaml.write_text(yaml.safe_dump(rendered, sort_keys=False))
    log_path = tmp_path / "envoy.log"
    command = [str(ENVOY), "-c", str(envoy_yaml), "--base-id", str(random.randint(1, 1 << 30))]
    command += ["--disable-hot-restart", "--concurrency", "2", "-l", "warning"]
    with log_path.open("wb") as log:
        environ = {**os.environ, **(env or {})}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environ)
    try:
        gateway = Gateway(f"127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path)
        try:
            wait_until_serving(gateway.address, 30, is_alive=lambda: process.poll() is None, tls=ready_tls)
        except TimeoutError:
            raise AssertionError(f"envoy did not forward health checks:\n{log_path.read_text()[-4000:]}") from None
        yield gateway
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
