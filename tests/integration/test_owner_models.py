"""A model owner's standard Triton repository on the real bundled Triton (one server for the module).

The repository holds what owners write for a production Triton: onnxruntime directories
(``platform: "onnxruntime_onnx"`` and ``backend: "onnxruntime"``), a python-backend model
of their own, a copy with class copies, and broken directories: one that is TensorRT, one
without a config, one whose config does not parse, one without a version, and a python
model that raises while loading. The good ones serve; each broken one is one line naming
the model and why, and takes nothing else down; the owner's files are never written.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inferline.core.config import ClassBatchingConfig, ClassCopiesConfig, TritonConfig
from inferline.triton.launcher import TritonLauncher
from tests.integration.owner_models import BROKEN, GOOD, NOT_ASKED, owner_repository

pytestmark = pytest.mark.requires_triton

COPIES = ClassCopiesConfig(
    models=["ranker_onnx"], classes={"batch": ClassBatchingConfig(max_queue_delay_us=2000, preferred_batch_sizes=[8])}
)


def digest(repository: pathlib.Path) -> dict[str, str]:
    """Every file of the owner's repository → its content's hash: proof that nothing was written there."""
    return {
        str(p.relative_to(repository)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repository.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return owner_repository(tmp_path_factory.mktemp("owner"))


@pytest.fixture(scope="module")
def before(repository: pathlib.Path) -> dict[str, str]:
    return digest(repository)


@pytest.fixture(scope="module")
def launcher(
    triton_config: TritonConfig,
    repository: pathlib.Path,
    before: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonLauncher]:
    config = triton_config.model_copy(update={"model_repository": repository, "class_copies": COPIES})
    log = tmp_path_factory.mktemp("owner-triton") / "tritonserver.log"
    launcher = TritonLauncher(config, log_path=log, models=[*GOOD, *BROKEN])
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def client(launcher: TritonLauncher) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(launcher.grpc_url)
    yield client
    client.close()


def infer(client: grpcclient.InferenceServerClient, model: str, width: int) -> np.ndarray:
    x = np.full((3, width), 0.5, np.float32)
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("score")], client_timeout=10)
    scores: np.ndarray = result.as_numpy("score")
    return scores


@pytest.mark.parametrize(("model", "width"), [("ranker_onnx", 4), ("ranker_backend", 4), ("light_onnx", 2)])
def test_standard_onnxruntime_directories_serve_unchanged(
    client: grpcclient.InferenceServerClient, model: str, width: int
) -> None:
    scores = infer(client, model, width)
    assert scores.shape == (3, 1)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_the_owners_python_model_and_class_copies_serve(
    launcher: TritonLauncher, client: grpcclient.InferenceServerClient
) -> None:
    assert infer(client, "owners_python", 2).shape == (3, 1)
    assert "ranker_onnx__batch" in launcher.models
    assert infer(client, "ranker_onnx__batch", 4).shape == (3, 1)


def test_metadata_is_the_owners_config(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("ranker_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 4])]
    assert client.get_model_config("ranker_onnx").config.max_batch_size == 64


def test_each_broken_model_is_one_line_and_the_rest_serve(launcher: TritonLauncher) -> None:
    assert set(launcher.models) >= set(GOOD)
    assert set(launcher.failed) == set(BROKEN)
    for model, reason in launcher.failed.items():
        assert "\n" not in reason and len(reason) <= 400, (model, reason)
    failed = launcher.failed
    assert "tensorrt_plan" in failed["trt_model"] and "triton.url" in failed["trt_model"]
    assert "config.pbtxt: missing" in failed["no_config"]
    assert "bad_config/config.pbtxt" in failed["bad_config"]
    assert "no version directory" in failed["no_version"]
    assert "weights are corrupt" in failed["raises_on_load"]


def test_only_the_models_asked_for_are_loaded(client: grpcclient.InferenceServerClient) -> None:
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index.get(NOT_ASKED, "") != "READY"
    assert not client.is_model_ready(NOT_ASKED)


def test_the_owners_directory_is_never_written(
    launcher: TritonLauncher, repository: pathlib.Path, before: dict[str, str]
) -> None:
    assert launcher.repository != repository
    assert digest(repository) == before


def test_failures_are_logged_in_one_line_each(
    triton_config: TritonConfig, repository: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = triton_config.model_copy(update={"model_repository": repository})
    models = ["light_onnx", "trt_model", "ghost"]
    with (
        caplog.at_level(logging.ERROR, logger="inferline.triton.launcher"),
        TritonLauncher(config, log_path=tmp_path / "t.log", models=models) as launcher,
    ):
        assert launcher.models == ("light_onnx",)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("model trt_model not loaded: ")
    assert lines[1] == f"model ghost not loaded: no model directory 'ghost' in the model repository {repository}"
