"""KServe-only models (``models:``) through the router's front door, with unmodified tritonclient.

The steps of the README's "Add a model", as a model owner takes them with a new model: a
standard Triton directory (``tensor_scorer``: 2 inputs wide, unlike the demo route's 4), a
``models:`` entry and the tenant's ``models`` list (and a route of its own), ``inferline
models check``, ``inferline up`` (which starts the bundled Triton on the repository), then
``inferline predict`` and unmodified tritonclient against the router. The same router
serves a slow python model (``slow_echo``: it sleeps for its first input, in seconds) with a
default deadline and an admission limit of its own, and a route's model (``driver_ranker``)
whose entry gives each tenant a quota for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from inferline.core.ports import free_ports
from inferline.stats import delta, scrape
from tests.integration.owner_models import BATCHING, LIGHT_ONNX, onnx_config, onnx_model
from tests.integration.router_fixtures import DEMO_KEY, FUNCTIONAL_BUDGETS, ROOT, ServerProcess, start_inferline

pytestmark = pytest.mark.requires_triton

OWNER_KEY = "model-owner-key"
OWNER = {"authorization": f"Bearer {OWNER_KEY}"}
DEMO = {"authorization": f"Bearer {DEMO_KEY}"}
NOT_ASKED = "not_asked"
DEFAULT_DEADLINE_MS = 300
"""``slow_echo``'s default deadline; its slow calls sleep far longer (``SLOW_S``)."""
SLOW_S = 3.0
OWNED = {"priority": 2, "default_deadline_ms": 250, "limit_share": 1.0, "queue_wait_target_ms": 600_000}
"""The class of the tests' calls: admission sheds it only at a model's concurrency limit, never for the
queue wait (the event-loop lag) that a busy machine shows now and then."""

SLOW_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            time.sleep(float(x[0, 0]))
            score = pb_utils.Tensor("score", np.full((x.shape[0], 1), 0.5, np.float32))
            responses.append(pb_utils.InferenceResponse([score]))
        return responses
"""

MODELS = {
    # Step 2 of "Add a model": the model's entry...
    "tensor_scorer": {"traffic_classes": ["owned"], "deadline_ms": 10000},
    "slow_echo": {
        "deadline_ms": DEFAULT_DEADLINE_MS,
        "admission": {"initial_limit": 1, "min_limit": 1, "max_limit": 1},
    },
    "driver_ranker": {"quota": {"rate_per_s": 0.001, "burst": 2}},  # a route's model, metered at the front door
}
OWNER_ROUTE = {
    # ... or a route of its own, for Predict callers (two request-time features, the model's width) ...
    "entity": {"join_key": "item_id"},
    "features": [{"name": "x1", "default": 0.5}, {"name": "x2", "default": 0.5}],
    "primary": {"model": "tensor_scorer", "features": ["x1", "x2"]},
    "budgets": FUNCTIONAL_BUDGETS,
}
OWNER_TENANT = {
    # ... and the tenant that may call it.
    "api_key_sha256": [hashlib.sha256(OWNER_KEY.encode()).hexdigest()],
    "models": ["tensor_scorer", "slow_echo", "driver_ranker"],
    "routes": ["owner_scoring"],
    "traffic_classes": ["critical", "owned"],
    "default_traffic_class": "owned",
}


def model_repository(root: pathlib.Path) -> pathlib.Path:
    """The demo route's models, and step 1 of "Add a model": the owner's directories."""
    repository = root / "models"
    repository.mkdir()
    for entry in ("driver_ranker", "driver_ranker_light", "onnx_runner.py"):
        (repository / entry).symlink_to(ROOT / "triton_models" / entry)
    scorer = onnx_model(repository, "tensor_scorer", LIGHT_ONNX, width=2)
    (scorer / "config.pbtxt").write_text(onnx_config("tensor_scorer", 2, max_batch_size=128))  # the router merges 128
    onnx_model(repository, NOT_ASKED, LIGHT_ONNX, width=2)  # a directory no config names: never loaded
    slow = repository / "slow_echo"
    (slow / "1").mkdir(parents=True)
    (slow / "1" / "model.py").write_text(SLOW_MODEL)
    (slow / "config.pbtxt").write_text(
        'name: "slow_echo"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "features", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        'output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n" + BATCHING
    )
    return repository


@pytest.fixture(scope="module")
def owner_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, int]:
    """The default config on the owner's repository, with its ``models:`` entries; and Triton's gRPC port."""
    root = tmp_path_factory.mktemp("kserve-models")
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    (triton_port,) = free_ports(1)
    raw["triton"].update(model_repository=str(model_repository(root)), grpc_port=triton_port)
    raw["triton"]["server_env"] = str(ROOT / ".venv-triton")
    raw["feature_store"]["feast_repo"] = str(ROOT / "deploy/feast/feature_repo")
    for route in raw["routes"].values():
        route["budgets"].update(FUNCTIONAL_BUDGETS)
    raw["traffic_classes"]["owned"] = OWNED
    raw["tenants"]["demo"]["traffic_classes"].append("owned")
    raw["models"] = MODELS
    raw["routes"]["owner_scoring"] = OWNER_ROUTE
    raw["tenants"]["owner"] = OWNER_TENANT
    path = root / "inferline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, triton_port


@pytest.fixture(scope="module")
def checked(owner_config: tuple[pathlib.Path, int]) -> subprocess.CompletedProcess[str]:
    """Step 3: ``inferline models check`` (the bundled Triton loads the configured models, then the check)."""
    command = [sys.executable, "-m", "inferline.cli", "models", "check", "--config", str(owner_config[0])]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def router(
    checked: subprocess.CompletedProcess[str],
    owner_config: tuple[pathlib.Path, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """Step 4: ``inferline up`` (no gateway: the router's own answers), starting the bundled Triton."""
    log = tmp_path_factory.mktemp("kserve-models-log") / "router.log"
    server = start_inferline(["up", "--no-gateway", "--config", str(owner_config[0])], log, timeout_s=240)
    yield server
    code = server.stop()
    assert code == 0, f"router exited with {code}:\n{server.log_tail()}"


@pytest.fixture
def client(router: ServerProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(router.address)  # step 5: unmodified tritonclient
    yield client
    client.close()


def tensors(rows: np.ndarray) -> list[triton_grpc.InferInput]:
    tensor = triton_grpc.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return [tensor]


WIDE2 = np.array([[0.5, 0.8], [0.1, 0.2], [0.9, 0.4]], np.float32)
WIDE4 = np.array([[0.5, 0.8, 500, 3]], np.float32)


def slow(seconds: float) -> list[triton_grpc.InferInput]:
    return tensors(np.array([[seconds]], np.float32))


def failure(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def status(call: Any, *args: Any, **kwargs: Any) -> str:
    return str(failure(call, *args, **kwargs).status())


def test_models_check_passes(checked: subprocess.CompletedProcess[str]) -> None:
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no problems" in checked.stderr


def test_a_kserve_only_model_is_served_to_its_tenant(
    router: ServerProcess, client: triton_grpc.InferenceServerClient
) -> None:
    url = f"http://127.0.0.1:{router.metrics_port}/metrics"
    before = scrape(url)
    result = client.infer("tensor_scorer", tensors(WIDE2), headers=OWNER, client_timeout=30)
    scores = result.as_numpy("score")
    assert scores.shape == (3, 1) and np.all((scores >= 0) & (scores <= 1))
    assert client.is_model_ready("tensor_scorer", headers=OWNER)
    metadata = client.get_model_metadata("tensor_scorer", headers=OWNER)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 2])]
    moved = delta(scrape(url), before)
    ok = {"code": "OK", "route": "kserve:tensor_scorer", "traffic_class": "owned", "served_by": "PRIMARY"}
    assert (
        sum(
            v
            for (name, labels), v in moved.items()
            if name == "inferline_requests_total" and set(ok.items()) <= set(labels)
        )
        == 1
    )


def test_the_new_models_route_answers_predict(router: ServerProcess) -> None:
    command = [sys.executable, "-m", "inferline.cli", "predict", "--route", "owner_scoring", "--entity", "item_id=7"]
    command += ["--feature", "x1=0.2", "--feature", "x2=0.9", "--api-key", OWNER_KEY, "--class", "owned"]
    command += ["--target", router.address, "--deadline-ms", "30000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["served_by"] == "SERVED_BY_PRIMARY", answer
    assert len(answer["predictions"]) == 1


def test_the_bundled_triton_loads_the_configured_models_only(
    owner_config: tuple[pathlib.Path, int], router: ServerProcess
) -> None:
    direct = triton_grpc.InferenceServerClient(f"127.0.0.1:{owner_config[1]}")
    try:
        index = {m.name: m.state for m in direct.get_model_repository_index().models}
    finally:
        direct.close()
    assert all(index.get(m) == "READY" for m in ("tensor_scorer", "slow_echo", "driver_ranker")), index
    assert index.get(NOT_ASKED, "") != "READY"


def test_another_tenant_is_denied(client: triton_grpc.InferenceServerClient) -> None:
    assert status(client.infer, "tensor_scorer", tensors(WIDE2), headers=DEMO, client_timeout=30) == (
        "StatusCode.PERMISSION_DENIED"
    )
    assert status(client.get_model_metadata, "tensor_scorer", headers=DEMO) == "StatusCode.PERMISSION_DENIED"


@pytest.mark.parametrize("model", ["no_such_model", NOT_ASKED])
def test_a_model_no_config_names_is_not_found(client: triton_grpc.InferenceServerClient, model: str) -> None:
    assert status(client.infer, model, tensors(WIDE2), headers=OWNER, client_timeout=30) == "StatusCode.NOT_FOUND"
    assert status(client.get_model_metadata, model, headers=OWNER) == "StatusCode.NOT_FOUND"


def test_its_traffic_class_rules_apply(client: triton_grpc.InferenceServerClient) -> None:
    critical = failure(
        client.infer, "tensor_scorer", tensors(WIDE2), headers=OWNER, parameters={"traffic_class": "critical"}
    )
    assert str(critical.status()) == "StatusCode.PERMISSION_DENIED"
    assert "does not take traffic class 'critical'" in str(critical.message())
    # The tenant may use critical, the model does not take it; the class it takes is served.
    owned = client.infer(
        "tensor_scorer", tensors(WIDE2), headers=OWNER, parameters={"traffic_class": "owned"}, client_timeout=30
    )
    assert owned.as_numpy("score").shape == (3, 1)


def test_its_default_deadline_applies_when_the_caller_sets_none(client: triton_grpc.InferenceServerClient) -> None:
    late = failure(client.infer, "slow_echo", slow(SLOW_S), headers=OWNER)  # no deadline of its own
    assert str(late.status()) == "StatusCode.DEADLINE_EXCEEDED", late
    # A caller's own deadline wins over the default: a call longer than the default is answered.
    longer = client.infer("slow_echo", slow(2 * DEFAULT_DEADLINE_MS / 1000), headers=OWNER, client_timeout=60)
    assert longer.as_numpy("score").shape == (1, 1)


def in_flight(router: ServerProcess, route: str) -> float:
    samples = scrape(f"http://127.0.0.1:{router.metrics_port}/metrics")
    return sum(
        v for (name, labels), v in samples.items() if name == "inferline_in_flight" and ("route", route) in labels
    )


def test_its_admission_limit_is_its_own(router: ServerProcess, client: triton_grpc.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        "slow_echo", slow(SLOW_S), lambda result, error: answers.put((result, error)), headers=OWNER, client_timeout=60
    )
    deadline = time.monotonic() + 30
    while in_flight(router, "kserve:slow_echo") < 1:  # the first call holds the model's one permit
        assert time.monotonic() < deadline and answers.empty(), "the slow call never got in flight"
        time.sleep(0.01)
    shed = failure(client.infer, "slow_echo", slow(0), headers=OWNER, client_timeout=30)
    assert str(shed.status()) == "StatusCode.RESOURCE_EXHAUSTED", shed
    assert "kserve:slow_echo" in str(shed.message())
    # A class that may not be shed has no degraded answer for raw tensors: it runs over the
    # limit instead (Triton queues it behind the slow call), and is answered.
    critical = client.infer(
        "slow_echo", slow(0), headers=OWNER, parameters={"traffic_class": "critical"}, client_timeout=30
    )
    assert critical.as_numpy("score").shape == (1, 1)
    # Another model's admission is untouched by it.
    assert client.infer("tensor_scorer", tensors(WIDE2), headers=OWNER, client_timeout=30).as_numpy("score").size == 3
    result, error = answers.get(timeout=60)
    assert error is None and result.as_numpy("score").shape == (1, 1)


def test_its_quota_is_each_tenants_own(client: triton_grpc.InferenceServerClient) -> None:
    for _ in range(2):  # the entry's burst
        assert (
            client.infer("driver_ranker", tensors(WIDE4), headers=OWNER, client_timeout=30).as_numpy("score").size == 1
        )
    over = failure(client.infer, "driver_ranker", tensors(WIDE4), headers=OWNER, client_timeout=30)
    assert str(over.status()) == "StatusCode.RESOURCE_EXHAUSTED", over
    assert "over its quota for model 'driver_ranker'" in str(over.message())
    # The tenant's other models, and the other tenants' calls of this one, have their own buckets.
    assert client.infer("tensor_scorer", tensors(WIDE2), headers=OWNER, client_timeout=30).as_numpy("score").size == 3
    demo = {**DEMO, "x-inferline-traffic-class": "owned"}
    assert client.infer("driver_ranker", tensors(WIDE4), headers=demo, client_timeout=30).as_numpy("score").size == 1


def test_stream_infer_is_unimplemented_and_says_why(router: ServerProcess) -> None:
    client = triton_grpc.InferenceServerClient(router.address)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        client.start_stream(lambda result, error: answers.put((result, error)), headers=OWNER)
        # The router ends the stream without reading it: on a busy machine its answer can come
        # before the request goes out, and tritonclient then refuses to send. Either way the
        # status reaches the callback, which is what this test reads.
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("tensor_scorer", tensors(WIDE2))
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()
    assert result is None and str(error.status()) == "StatusCode.UNIMPLEMENTED"
    assert "ModelStreamInfer is not served by the inferline router" in str(error.message())
    assert "call ModelInfer" in str(error.message())
