"""Regenerate the Python code of ``protos/inferline/v1`` (the public API) into
``services/inferline/v1`` and of ``protos/inferline/internal/v1`` (the internal services)
into ``services/inferline/internal/v1``.

``python scripts/gen_proto.py [OUT_DIR]``: the proto path equals the package path, so
generated modules import each other as ``from inferline.v1 import x_pb2`` (or
``inferline.internal.v1``) with no rewriting. Typed stubs (``.pyi``) for messages and gRPC
stubs come from mypy-protobuf. The freshness test calls this with a temporary OUT_DIR and diffs the result.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGES = (pathlib.PurePath("inferline/v1"), pathlib.PurePath("inferline/internal/v1"))
"""Proto packages, each generated into the Python package of the same path."""


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for package in PACKAGES for p in (PROTOS / package).glob("*.proto"))
    plugins = pathlib.Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in PACKAGES:
        name = ".".join(package.parts)
        (out_dir / package / "__init__.py").write_text(
            f'"""Generated protobuf and gRPC code for {name} (do not edit)."""\n'
        )
    (out_dir / "inferline" / "internal" / "__init__.py").write_text(
        '"""The internal services\' protocol (routers are their only callers; not a public contract)."""\n'
    )


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services")
