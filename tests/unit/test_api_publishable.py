"""The API is publishable: a named buf module, per-language options in every proto, stubs
that generate for Go and Java, a breaking-change check with teeth, and one ErrorReason
enum that names every reason the services put in ``ErrorInfo``."""

from __future__ import annotations

import dataclasses
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
from inferline.internal.v1 import degradation_pb2, features_pb2, postprocess_pb2
from inferline.v1 import batch_jobs_pb2, errors_pb2, inference_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
BUF = pathlib.Path(sys.executable).parent / "buf"
PUBLIC = [batch_jobs_pb2, errors_pb2, inference_pb2]
INTERNAL = [degradation_pb2, features_pb2, postprocess_pb2]
MODULES = PUBLIC + INTERNAL


@dataclasses.dataclass(frozen=True)
class Package:
    """What every file of one proto package sets, per language."""

    path: str
    go_package: str
    go_name: str
    java_package: str
    csharp: str
    php: str
    ruby: str


PACKAGES = {
    "inferline.v1": Package(
        "inferline/v1",
        "github.com/inferline/inferline/gen/go/inferline/v1;inferlinev1",
        "inferlinev1",
        "io.inferline.v1",
        "Inferline.V1",
        "Inferline\\V1",
        "Inferline::V1",
    ),
    "inferline.internal.v1": Package(
        "inferline/internal/v1",
        "github.com/inferline/inferline/gen/go/inferline/internal/v1;internalv1",
        "internalv1",
        "io.inferline.internal.v1",
        "Inferline.Internal.V1",
        "Inferline\\Internal\\V1",
        "Inferline::Internal::V1",
    ),
}
REASON_PREFIX = "ERROR_REASON_"
REASON_NAMES = [value.name for value in errors_pb2.ErrorReason.DESCRIPTOR.values]


def _options(module: object) -> descriptor_pb2.FileOptions:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto.options


def _package(module: object) -> Package:
    return PACKAGES[module.DESCRIPTOR.package]  # type: ignore[attr-defined]


def test_every_proto_file_is_compiled_into_python() -> None:
    on_disk = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("inferline/**/*.proto"))
    assert on_disk == sorted(m.DESCRIPTOR.name for m in MODULES)  # type: ignore[attr-defined]


def test_the_internal_services_live_apart_from_the_public_api() -> None:
    public = {name for m in PUBLIC for name in m.DESCRIPTOR.services_by_name}  # type: ignore[attr-defined]
    internal = {name for m in INTERNAL for name in m.DESCRIPTOR.services_by_name}  # type: ignore[attr-defined]
    assert public == {"Inference", "BatchJobs"}
    assert internal == {"Features", "Postprocess", "Degradation"}
    assert {m.DESCRIPTOR.package for m in PUBLIC} == {"inferline.v1"}  # type: ignore[attr-defined]
    assert {m.DESCRIPTOR.package for m in INTERNAL} == {"inferline.internal.v1"}  # type: ignore[attr-defined]


def test_buf_module_has_a_name() -> None:
    config = yaml.safe_load((ROOT / "buf.yaml").read_text())
    names = [module.get("name", "") for module in config["modules"]]
    assert names == ["buf.build/inferline/api"]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_each_file_sets_the_language_options(module: object) -> None:
    options = _options(module)
    package = _package(module)
    stem = module.__name__.split(".")[-1].removesuffix("_pb2")  # type: ignore[attr-defined]
    assert options.go_package == package.go_package
    assert options.java_package == package.java_package
    assert options.java_multiple_files is True
    # Outer class named after the file, so it never collides with a message of the same name.
    assert options.java_outer_classname == "".join(word.capitalize() for word in stem.split("_")) + "Proto"
    assert options.csharp_namespace == package.csharp
    assert options.php_namespace == package.php
    assert options.ruby_package == package.ruby
    assert options.objc_class_prefix == "IXX"


def _all_error_classes() -> list[type[InferlineError]]:
    """Every InferlineError subclass in the package (each module imported, so none hides).

    Skipped: generated code, the demo's entry point, and the model code that runs inside
    Triton's python backend (it imports Triton's own module).
    """
    for info in pkgutil.walk_packages(inferline.__path__, "inferline."):
        if not info.name.startswith(
            ("inferline.v1", "inferline.internal", "inferline.demo.run", "inferline.triton.onnx_runner")
        ):
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


def test_breaking_check_leaves_the_internal_services_out(tmp_path: pathlib.Path) -> None:
    """The internal package changes in step with the routers (buf.yaml ``breaking.ignore``);
    the public one stays checked."""
    workdir = _copy_module(tmp_path)
    baseline = "protos/breaking-baseline.json"
    features = workdir / "protos" / "inferline" / "internal" / "v1" / "features.proto"
    features.write_text(features.read_text().replace("rpc GetFeatures(", "rpc FetchFeatures("))
    assert "FetchFeatures" in features.read_text()
    internal = _buf(workdir, "breaking", "--against", baseline)
    assert internal.returncode == 0, internal.stdout + internal.stderr
    inference = workdir / "protos" / "inferline" / "v1" / "inference.proto"
    inference.write_text(re.sub(r"rpc Predict\(", "rpc Forecast(", inference.read_text(), count=1))
    public = _buf(workdir, "breaking", "--against", baseline)
    assert public.returncode != 0 and "Predict" in public.stdout, public.stdout + public.stderr


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
    for module in MODULES:
        file = module.DESCRIPTOR  # type: ignore[attr-defined]
        package = _package(module)
        go_dir = workdir / "gen" / "go" / package.path
        java_dir = workdir / "gen" / "java" / pathlib.Path(*package.java_package.split("."))
        stem = pathlib.Path(file.name).stem
        go_source = (go_dir / f"{stem}.pb.go").read_text()
        assert re.search(rf"^package {package.go_name}$", go_source, re.MULTILINE)
        for name in [*file.message_types_by_name, *file.enum_types_by_name]:
            assert f"type {name} " in go_source, f"{name} missing from {stem}.pb.go"
            assert (java_dir / f"{name}.java").read_text().startswith("// Generated by the protocol buffer compiler")
        for service in file.services_by_name:
            assert f"func New{service}Client(" in (go_dir / f"{stem}_grpc.pb.go").read_text()
            assert (
                f"public static {service}BlockingStub newBlockingStub("
                in (java_dir / f"{service}Grpc.java").read_text()
            )
