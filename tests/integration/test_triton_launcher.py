"""TritonLauncher against the real bundled Triton: readiness, inference, queue policy, stop and restart."""

from __future__ import annotations

import os
import pathlib
import signal
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2

from inferline.core.config import TritonConfig
from inferline.core.ports import port_is_free
from inferline.demo.driver_data import LIGHT_FEATURES, PRIMARY_FEATURES, training_set
from inferline.triton.launcher import TritonLauncher

pytestmark = pytest.mark.requires_triton

MODELS = ("driver_ranker", "driver_ranker_light")


@pytest.fixture(scope="module")
def client(triton_server: TritonLauncher) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


def features(rows: int, columns: tuple[str, ...] = PRIMARY_FEATURES) -> np.ndarray:
    x, _ = training_set(seed=5, n=rows)
    return np.ascontiguousarray(x[:, [PRIMARY_FEATURES.index(c) for c in columns]], dtype=np.float32)


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kwargs: int) -> np.ndarray:
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput("score")]
    result = client.infer(model, [tensor], outputs=outputs, client_timeout=10, **kwargs)
    scores: np.ndarray = result.as_numpy("score")
    return scores


def ports(launcher: TritonLauncher) -> list[int]:
    urls = [f"grpc://{launcher.grpc_url}", launcher.http_url, launcher.metrics_url]
    return [int(urlsplit(url).port or 0) for url in urls]


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``: the server and its backend stubs."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def test_launcher_loads_every_model_and_waits_until_ready(
    triton_server: TritonLauncher, client: grpcclient.InferenceServerClient
) -> None:
    assert triton_server.is_running()
    assert set(MODELS) <= set(triton_server.models)
    assert client.is_server_ready()
    assert all(client.is_model_ready(model) for model in MODELS)


def test_primary_model_scores_three_rows_in_unit_interval(client: grpcclient.InferenceServerClient) -> None:
    scores = infer(client, "driver_ranker", features(3))
    assert scores.shape == (3, 1)
    assert np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()


def test_light_model_takes_two_features(client: grpcclient.InferenceServerClient) -> None:
    scores = infer(client, "driver_ranker_light", features(2, LIGHT_FEATURES))
    assert scores.shape == (2, 1)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_priority_and_queue_timeout_parameters_are_accepted(client: grpcclient.InferenceServerClient) -> None:
    scores = infer(client, "driver_ranker", features(1), priority=1, timeout=2_000_000)
    assert scores.shape == (1, 1)


@pytest.mark.parametrize("model", MODELS)
def test_model_config_has_three_priority_queues_that_reject_late_requests(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    batching = client.get_model_config(model).config.dynamic_batching
    assert batching.priority_levels == 3
    assert batching.default_queue_policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert batching.default_queue_policy.allow_timeout_override


def test_stop_leaves_no_process_and_frees_ports(triton_config: TritonConfig, tmp_path: pathlib.Path) -> None:
    launcher = TritonLauncher(triton_config, log_path=tmp_path / "tritonserver.log")
    launcher.start()
    pid = launcher.pid
    assert pid is not None

    launcher.stop()
    launcher.stop()

    assert not launcher.is_running()
    assert launcher.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    deadline = time.monotonic() + 5
    while live_processes_in_group(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL of leftovers is asynchronous
    assert live_processes_in_group(pid) == []
    assert all(port_is_free(port) for port in ports(launcher))


def test_restart_gives_new_pid_and_ready_models(triton_config: TritonConfig, tmp_path: pathlib.Path) -> None:
    with TritonLauncher(triton_config, log_path=tmp_path / "tritonserver.log") as launcher:
        first_pid, first_url = launcher.pid, launcher.grpc_url
        launcher.restart()
        assert launcher.pid not in (None, first_pid)
        assert launcher.grpc_url == first_url
        client = grpcclient.InferenceServerClient(launcher.grpc_url)
        try:
            assert all(client.is_model_ready(model) for model in launcher.models)
        finally:
            client.close()
    assert not launcher.is_running()


def test_a_temporary_log_is_removed_after_a_clean_run_and_kept_after_a_crash(triton_config: TritonConfig) -> None:
    clean = TritonLauncher(triton_config)
    clean.start()
    clean_log = clean.log_path
    assert clean_log is not None and clean_log.exists()
    clean.stop()
    assert not clean_log.exists(), "a clean run's temporary log is removed"

    crashed = TritonLauncher(triton_config)
    crashed.start()
    crashed_log, pid = crashed.log_path, crashed.pid
    assert crashed_log is not None and pid is not None
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while crashed.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        crashed.stop()
        assert crashed_log.exists(), "the log of a server that died on its own is kept"
    finally:
        crashed_log.unlink(missing_ok=True)
