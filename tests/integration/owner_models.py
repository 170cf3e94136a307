"""Model owners' repositories for the tests: standard Triton directories built from the repo's ONNX files.

Each directory is what an owner would write for Triton's native onnxruntime backend
(``1/model.onnx`` and a ``config.pbtxt``), never the project's python runner: the bundled
server must serve it as it is.
"""

from __future__ import annotations

import pathlib
import shutil

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
