"""Model directories read and checked for the bundled Triton: kinds, one-line errors, the ONNX adaptation."""

from __future__ import annotations

import pathlib

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from inferline.triton.model_repository import (
    RUNNER,
    ModelDirectoryError,
    ModelKind,
    adapt_onnx,
    inspect_model,
    served_versions,
)
from tests.integration.owner_models import LIGHT_ONNX, ROOT, onnx_config, onnx_model

REPO = ROOT / "triton_models"


def test_the_runner_link_reaches_the_repositorys_onnx_runner() -> None:
    assert RUNNER.is_file()
    assert RUNNER.resolve() == (REPO / "onnx_runner.py").resolve()


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ('platform: "onnxruntime_onnx"', ModelKind.ONNX),
        ('backend: "onnxruntime"', ModelKind.ONNX),
        ("", ModelKind.ONNX),  # Triton picks the backend from model.onnx
        ('platform: "ensemble"', ModelKind.ENSEMBLE),
    ],
)
def test_kind_follows_platform_or_backend(tmp_path: pathlib.Path, header: str, kind: ModelKind) -> None:
    assert inspect_model(onnx_model(tmp_path, "m", header=header)).kind is kind


def test_the_demo_models_are_python_backend_models() -> None:
    assert inspect_model(REPO / "driver_ranker").kind is ModelKind.PYTHON


@pytest.mark.parametrize(
    "header", ['platform: "tensorrt_plan"', 'platform: "pytorch_libtorch"', 'backend: "tensorflow"']
)
def test_a_platform_the_bundled_server_cannot_run_is_one_line_with_the_fix(tmp_path: pathlib.Path, header: str) -> None:
    directory = onnx_model(tmp_path, "m")
    (directory / "config.pbtxt").write_text(onnx_config("m", 4, header=header))
    with pytest.raises(ModelDirectoryError) as err:
        inspect_model(directory)
    message = str(err.value)
    assert "\n" not in message
    assert str(directory / "config.pbtxt") in message and header.split('"')[1] in message
    assert "triton.url" in message and err.value.model == "m"


def test_errors_name_the_file(tmp_path: pathlib.Path) -> None:
    cases = {
        "no_config": lambda d: (d / "config.pbtxt").unlink(),
        "bad_config": lambda d: (d / "config.pbtxt").write_text("max_batch_size: {"),
        "renamed": lambda d: (d / "config.pbtxt").write_text(onnx_config("other", 4)),
        "no_file": lambda d: (d / "1" / "model.onnx").unlink(),
        "no_inputs": lambda d: (d / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'),
    }
    expected = {
        "no_config": "no_config/config.pbtxt: missing",
        "bad_config": "bad_config/config.pbtxt: not a Triton model config",
        "renamed": "name 'other' differs from its directory 'renamed'",
        "no_file": "no_file/1/model.onnx: missing",
        "no_inputs": "lists no input",
    }
    for name, damage in cases.items():
        directory = onnx_model(tmp_path, name)
        damage(directory)
        with pytest.raises(ModelDirectoryError) as err:
            inspect_model(directory)
        assert expected[name] in str(err.value) and "\n" not in str(err.value), name


def test_a_missing_version_is_named(tmp_path: pathlib.Path) -> None:
    directory = onnx_model(tmp_path, "m")
    (directory / "1" / "model.onnx").rename(directory / "model.onnx")
    (directory / "1").rmdir()
    with pytest.raises(ModelDirectoryError, match="no version directory"):
        inspect_model(directory)
    (directory / "2").mkdir()
    (directory / "model.onnx").rename(directory / "2" / "model.onnx")
    text = onnx_config("m", 4) + "version_policy { specific { versions: [ 2, 3 ] } }\n"
    (directory / "config.pbtxt").write_text(text)
    with pytest.raises(ModelDirectoryError, match="names version 3"):
        inspect_model(directory)


def test_served_versions_follow_the_policy(tmp_path: pathlib.Path) -> None:
    directory = onnx_model(tmp_path, "m")
    for version in ("2", "3"):
        (directory / version).mkdir()
        (directory / version / "model.onnx").write_bytes(LIGHT_ONNX.read_bytes())
    assert served_versions(inspect_model(directory)) == (3,)
    (directory / "config.pbtxt").write_text(onnx_config("m", 4) + "version_policy { all { } }\n")
    assert served_versions(inspect_model(directory)) == (1, 2, 3)


def test_adapt_onnx_runs_the_owners_config_on_the_python_runner(tmp_path: pathlib.Path) -> None:
    owner = onnx_model(tmp_path / "owner", "m", header='backend: "onnxruntime"')
    text = onnx_config("m", 4, header='backend: "onnxruntime"').replace("model.onnx", "")
    text += 'default_model_filename: "ranker.onnx"\nparameters { key: "delay_ms" value { string_value: "1" } }\n'
    (owner / "config.pbtxt").write_text(text)
    (owner / "1" / "model.onnx").rename(owner / "1" / "ranker.onnx")
    (owner / "labels.txt").write_text("a\n")
    target = tmp_path / "derived" / "m"
    target.parent.mkdir()

    adapt_onnx(inspect_model(owner), target)

    config = model_config_pb2.ModelConfig()
    text_format.Parse((target / "config.pbtxt").read_text(), config)
    assert (config.backend, config.platform, config.default_model_filename) == ("python", "", "")
    assert config.max_batch_size == 64 and config.dynamic_batching.priority_levels == 3
    assert config.parameters["delay_ms"].string_value == "1"
    assert (target / "1" / "model.onnx").resolve() == (owner / "1" / "ranker.onnx").resolve()
    assert (target / "1" / "model.py").resolve() == RUNNER.resolve()
    assert (target / "labels.txt").resolve() == (owner / "labels.txt").resolve()
    assert sorted(p.name for p in owner.rglob("*")) == ["1", "config.pbtxt", "labels.txt", "ranker.onnx"]
