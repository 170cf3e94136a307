"""NVIDIA's perf_analyzer starts from the services venv and measures Triton directly and through the front door."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inferline.triton.launcher import TritonLauncher
from tests.integration.router_fixtures import DEMO_KEY, ROOT, ServerProcess

pytestmark = pytest.mark.requires_triton

# Short, fixed-size windows: the point is that it runs and measures, not a stable number.
SHORT = ["--measurement-mode", "count_windows", "--measurement-request-count", "50", "-r", "3", "-s", "100"]


def perf_analyzer(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "inferline.cli", "perf-analyzer", *args, *SHORT]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_perf_analyzer_measures_triton_directly(triton_server: TritonLauncher) -> None:
    done = perf_analyzer("-m", "driver_ranker", "-u", triton_server.grpc_url, "-i", "grpc", "--concurrency-range", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Throughput:" in done.stdout and "Server:" in done.stdout


def test_perf_analyzer_measures_the_front_door_with_the_key_header(router_server: ServerProcess) -> None:
    # perf_analyzer keeps the space after a header's colon in the value: "name:value", no space.
    done = perf_analyzer(
        "-m", "driver_ranker", "-u", router_server.address, "-i", "grpc", "--concurrency-range", "2",
        "-H", f"authorization:Bearer {DEMO_KEY}", "-H", "x-inferline-traffic-class:standard",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Throughput:" in done.stdout
