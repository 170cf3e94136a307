"""The API is publishable: a named buf module, per-language options in every proto, stubs
that generate for Go and Java, a breaking-change check with teeth, and one ErrorReason
enum that names every reason the services put in ``ErrorInfo``."""

from __future__ import annotations

import importlib
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from google.protobuf import descriptor_pb2

import inferline
from inferline.core.errors import InferlineError
from inferline.v1 import batch_jobs_pb2, degradation_pb2, errors_pb2, features_pb2, inference_pb2, postprocess_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "inferline" / "v1"
BUF = pathlib.Path(sys.executable).parent / "buf"
MODULES = [batch_jobs_pb2, degradation_pb2, errors_pb2, features_pb2, inference_pb2, postprocess_pb2]
GO_PACKAGE = "github.com/inferline/inferline/gen/go/inferline/v1;inferlinev1"
JAVA_PACKAGE = "io.inferline.v1"
REASON_PREFIX = "ERROR_REASON_"
REASON_NAMES = [value.name for value in errors_pb2.ErrorReason.DESCRIPTOR.values]


def _options(module: object) -> descriptor_pb2.FileOptions:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto.options


def test_every_proto_file_is_compiled_into_python() -> None:
    assert sorted(p.stem for p in PROTO_DIR.glob("*.proto")) == sorted(m.__name__.split(".")[-1][:-4] for m in MODULES)


def test_buf_module_has_a_name() -> None:
    config = yaml.safe_load((ROOT / "buf.yaml").read_text())
    names = [module.get("name", "") for module in config["modules"]]
    assert names == ["buf.build/inferline/api"]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_each_file_sets_the_language_options(module: object) -> None:
    options = _options(module)
    stem = module.__name__.split(".")[-1].removesuffix("_pb2")  # type: ignore[attr-defined]
    assert options.go_package == GO_PACKAGE
    assert options.java_package == JAVA_PACKAGE
    assert options.java_multiple_files is True
    # Outer class named after the file, so it never collides with a message of the same name.
    assert options.java_outer_classname == "".join(word.capitalize() for word in stem.split("_")) + "Proto"
    assert options.csharp_namespace == "Inferline.V1"
    assert options.php_namespace == "Inferline\\V1"
    assert options.ruby_package == "Inferline::V1"
    assert options.objc_class_prefix == "IXX"


def _all_error_classes() -> list[type[InferlineError]]:
    """Every InferlineError subclass in the package (each module imported, so none hides).

    Skipped: generated code, the demo's entry point, and the model code that runs inside
    Triton's python backend (it imports Triton's own module).
    """
    for info in pkgutil.walk_packages(inferline.__path__, "inferline."):
        if not info.name.startswith(("inferline.v1", "inferline.demo.run", "inferline.triton.onnx_runner")):
            importlib.import_module(info.name)
    found: list[type[InferlineError]] = []
    pending: list[type[InferlineError]] = [InferlineError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_reason_the_services_send_is_an_error_reason_value() -> None:
    declared = {name.removeprefix(REASON_PREFIX) for name in REASON_NAMES} - {"UNSPECIFIED"}
    sent = {cls.reason for cls in _all_error_classes() if cls is not InferlineError}
    assert sent - declared == set(), "add these reasons to ErrorReason in protos/inferline/v1/errors.proto"
    assert declared - sent == set(), "ErrorReason promises reasons no service sends"


def test_error_reason_values_carry_the_enum_prefix() -> None:
    assert all(name.startswith(REASON_PREFIX) for name in REASON_NAMES)
    assert errors_pb2.ErrorReason.Value("ERROR_REASON_UNSPECIFIED") == 0


def _copy_module(tmp_path: pathlib.Path) -> pathlib.Path:
    workdir = tmp_path / "api"
    shutil.copytree(ROOT / "protos", workdir / "protos")
    shutil.copy(ROOT / "buf.yaml", workdir / "buf.yaml")
    shutil.copy(ROOT / "buf.gen.yaml", workdir / "buf.gen.yaml")
    return workdir


def _buf(workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=workdir, capture_output=True, text=True, timeout=120)


def test_breaking_check_passes_now_and_catches_a_renamed_enum_value(tmp_path: pathlib.Path) -> None:
    workdir = _copy_module(tmp_path)
    baseline = "protos/breaking-baseline.json"
    same = _buf(workdir, "breaking", "--against", baseline)
    assert same.returncode == 0, same.stdout + same.stderr
    errors = workdir / "protos" / "inferline" / "v1" / "errors.proto"
    errors.write_text(errors.read_text().replace("ERROR_REASON_SHED =", "ERROR_REASON_SHEDDED ="))
    broken = _buf(workdir, "breaking", "--against", baseline)
    assert broken.returncode != 0
    assert "ERROR_REASON_SHED" in broken.stdout


def _require_plugins() -> None:
    missing = [p for p in ("protoc-gen-go", "protoc-gen-go-grpc", "grpc_java_plugin", "protoc") if not shutil.which(p)]
    if not missing:
        return
    message = f"code generator plugins missing ({', '.join(missing)}): run `make codegen-plugins`"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def test_go_and_java_stubs_generate_with_buf(tmp_path: pathlib.Path) -> None:
    _require_plugins()
    workdir = _copy_module(tmp_path)
    result = _buf(workdir, "generate", "-o", "gen")
    assert result.returncode == 0, result.stderr
    go_dir = workdir / "gen" / "go" / "inferline" / "v1"
    java_dir = workdir / "gen" / "java" / "io" / "inferline" / "v1"
    for module in MODULES:
        file = module.DESCRIPTOR  # type: ignore[attr-defined]
        stem = pathlib.Path(file.name).stem
        go_source = (go_dir / f"{stem}.pb.go").read_text()
        assert re.search(r"^package inferlinev1$", go_source, re.MULTILINE)
        for name in [*file.message_types_by_name, *file.enum_types_by_name]:
            assert f"type {name} " in go_source, f"{name} missing from {stem}.pb.go"
            assert (java_dir / f"{name}.java").read_text().startswith("// Generated by the protocol buffer compiler")
        for service in file.services_by_name:
            assert f"func New{service}Client(" in (go_dir / f"{stem}_grpc.pb.go").read_text()
            assert (
                f"public static {service}BlockingStub newBlockingStub("
                in (java_dir / f"{service}Grpc.java").read_text()
            )
