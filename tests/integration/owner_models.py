"""Model owners' repositories for the tests: standard Triton directories built from the repo's ONNX files.

Each directory is what an owner would write for Triton's native onnxruntime backend
(``1/model.onnx`` and a ``config.pbtxt``), never the project's python runner: the bundled
server must serve it as it is.
"""

from __future__ import annotations

import pathlib
import shutil

GOOD = ("ranker_onnx", "ranker_backend", "light_onnx", "owners_python")
"""The models of ``owner_repository`` that serve."""
BROKEN = ("trt_model", "no_config", "bad_config", "no_version", "raises_on_load")
"""The models of ``owner_repository`` that cannot: each is one line, and takes nothing else down."""
NOT_ASKED = "not_asked"
ROOT = pathlib.Path(__file__).resolve().parents[2]
PRIMARY_ONNX = ROOT / "triton_models" / "driver_ranker" / "1" / "model.onnx"
LIGHT_ONNX = ROOT / "triton_models" / "driver_ranker_light" / "1" / "model.onnx"

BATCHING = """
dynamic_batching {
  max_queue_delay_microseconds: 500
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { timeout_action: REJECT, default_timeout_microseconds: 10000000, allow_timeout_override: true }
}
"""


ONNX_PLATFORM = 'platform: "onnxruntime_onnx"'


def onnx_config(name: str, width: int, *, header: str = ONNX_PLATFORM, max_batch_size: int = 64) -> str:
    """A standard onnxruntime config: ``features`` [width] FP32 in, ``score`` [1] FP32 out."""
    return (
        f'name: "{name}"\n{header}\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "features", data_type: TYPE_FP32, dims: [ {width} ] }} ]\n'
        'output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n" + BATCHING
    )


def onnx_model(
    repository: pathlib.Path, name: str, onnx: pathlib.Path = PRIMARY_ONNX, width: int = 4, header: str = ONNX_PLATFORM
) -> pathlib.Path:
    """``repository/name/`` holding ``1/model.onnx`` (a copy of ``onnx``) and a standard config."""
    directory = repository / name
    (directory / "1").mkdir(parents=True)
    shutil.copy2(onnx, directory / "1" / "model.onnx")
    (directory / "config.pbtxt").write_text(onnx_config(name, width, header=header))
    return directory


RAISING_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights are corrupt")
"""


def owner_repository(root: pathlib.Path) -> pathlib.Path:
    """``root/models``: the ``GOOD`` models, the ``BROKEN`` ones and ``NOT_ASKED`` (a good one no one loads)."""
    repository = root / "models"
    repository.mkdir()
    onnx_model(repository, "ranker_onnx")
    onnx_model(repository, "ranker_backend", header='backend: "onnxruntime"')
    onnx_model(repository, "light_onnx", LIGHT_ONNX, width=2)
    onnx_model(repository, NOT_ASKED)
    python = shutil.copytree(ROOT / "triton_models" / "driver_ranker_light", repository / "owners_python")
    config = (python / "config.pbtxt").read_text().replace('name: "driver_ranker_light"', 'name: "owners_python"')
    (python / "config.pbtxt").write_text(config)
    trt = onnx_model(repository, "trt_model")
    (trt / "config.pbtxt").write_text(onnx_config("trt_model", 4, header='platform: "tensorrt_plan"'))
    (repository / "no_config" / "1").mkdir(parents=True)
    shutil.copy2(LIGHT_ONNX, repository / "no_config" / "1" / "model.onnx")
    bad = onnx_model(repository, "bad_config")
    (bad / "config.pbtxt").write_text('name: "bad_config"\nplatform: "onnxruntime_onnx"\nmax_batch_size: [oops\n')
    (repository / "no_version").mkdir()
    (repository / "no_version" / "config.pbtxt").write_text(onnx_config("no_version", 4))
    raising = repository / "raises_on_load"
    (raising / "1").mkdir(parents=True)
    (raising / "1" / "model.py").write_text(RAISING_MODEL)
    (raising / "config.pbtxt").write_text(
        'name: "raises_on_load"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "features", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        'output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
    )
    return repository
