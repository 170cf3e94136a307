"""Runs NVIDIA's ``perf_analyzer`` (shipped in the tritonclient wheel) with the libraries it needs.

The binary links ``libcudart.so.12`` and ``libb64.so.0d`` dynamically, and neither comes
with the wheel: ``make setup`` installs the CUDA runtime from PyPI
(``nvidia-cuda-runtime-cu12``, into the services venv; no GPU needed) and libb64 from the
system's packages (Debian's ``libb64-0d``). The runtime's folder is not on the loader's
path, so ``perf_analyzer_command`` builds the environment that puts it there.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

BINARY = "perf_analyzer"


def find_binary() -> pathlib.Path | None:
    """``perf_analyzer`` next to this Python (the venv's ``bin``), or None."""
    path = pathlib.Path(sys.executable).parent / BINARY
    return path if path.is_file() else None


def cuda_runtime_dir() -> pathlib.Path | None:
    """The folder holding ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` wheel, or None."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = pathlib.Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libcudart.so.12").exists() else None


def perf_analyzer_command(
    args: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``perf_analyzer args``.

    Raises:
        FileNotFoundError: the binary or the CUDA runtime is missing (run ``make setup``).
    """
    binary, runtime = find_binary(), cuda_runtime_dir()
    if binary is None:
        raise FileNotFoundError(f"no {BINARY} next to {sys.executable} (it comes with tritonclient; run make setup)")
    if runtime is None:
        raise FileNotFoundError("libcudart.so.12 not found: pip install nvidia-cuda-runtime-cu12 (make setup does)")
    env = dict(os.environ if environ is None else environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(runtime), env.get("LD_LIBRARY_PATH")]))
    return [str(binary), *args], env
