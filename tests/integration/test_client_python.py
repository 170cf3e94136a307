"""The slim Python client (clients/python) installs into a fresh virtual environment with
only its declared dependencies, and calls a real router from there.

The fresh environment gets the client's wheel and, for its dependencies, links to the
files of exactly those distributions (and theirs) from the test's own environment: the
same bytes pip would install, without a registry round-trip per run. Anything else the
client imported (numpy, Feast, tritonclient, the server package) would be missing there.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from packaging.requirements import Requirement

from tests.integration.router_fixtures import DEMO_KEY, ServerProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "typing-extensions"}
"""The client's whole dependency closure: gRPC, protobuf, the google.rpc messages."""

CLIENT_SCRIPT = """
import importlib.util, json, sys
from inferline_client import AuthenticationError, ErrorReason, InferenceClient, NotFoundError

address, key = sys.argv[1:]
out = {"server_package": importlib.util.find_spec("inferline.core") is not None,
       "numpy": importlib.util.find_spec("numpy") is not None}
with InferenceClient(address, api_key=key, timeout_s=5.0) as client:
    reply = client.predict("driver_ranking", [("driver_id", 1001), ("driver_id", 1002)])
    out["served_by"] = reply.served_by
    out["entities"] = sorted(p.entity.int64_value for p in reply.predictions)
    try:
        client.predict("no_such_route", [("driver_id", 1001)])
    except NotFoundError as err:
        out["not_found"] = ErrorReason.Name(err.reason)
with InferenceClient(address, api_key="not-a-key", timeout_s=5.0) as client:
    try:
        client.predict("driver_ranking", [("driver_id", 1001)])
    except AuthenticationError as err:
        out["bad_key"] = ErrorReason.Name(err.reason)
print(json.dumps(out))
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names needed by ``requirements``, recursively (markers evaluated here)."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        req = pending.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _normalise(req.name)
        if name in seen:
            continue
        seen.add(name)
        pending.extend(Requirement(r) for r in importlib.metadata.requires(req.name) or ())
    return seen


def _link_distribution(name: str, site_packages: pathlib.Path) -> None:
    dist = importlib.metadata.distribution(name)
    for file in dist.files or ():
        source = pathlib.Path(str(dist.locate_file(file))).resolve()
        if file.parts[0] == ".." or not source.is_file():
            continue  # scripts outside site-packages, and RECORD entries never written
        target = site_packages / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, list[str]]:
    """A fresh venv holding the client's wheel and its dependency closure; (python, Requires-Dist)."""
    work = tmp_path_factory.mktemp("client")
    source = work / "source"
    shutil.copytree(ROOT / "clients" / "python", source)  # links to the generated stubs become files
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(work)],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("inferline_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert pathlib.Path(purelib) != pathlib.Path(sysconfig.get_paths()["purelib"])
    for name in _closure(requires):
        _link_distribution(name, pathlib.Path(purelib))
    return python, requires


def test_client_depends_on_grpc_and_protobuf_only(client_python: tuple[pathlib.Path, list[str]]) -> None:
    _, requires = client_python
    closure = _closure(requires)
    assert closure <= ALLOWED, f"the client pulls in {sorted(closure - ALLOWED)}"
    assert {"grpcio", "protobuf"} <= closure


def test_client_from_a_fresh_venv_calls_the_router(
    client_python: tuple[pathlib.Path, list[str]], router_server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    python, _ = client_python
    result = subprocess.run(
        [str(python), "-I", "-c", CLIENT_SCRIPT, router_server.address, DEMO_KEY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # nothing of the repository on the path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["server_package"] is False and out["numpy"] is False
    assert out["served_by"] == 1  # SERVED_BY_PRIMARY
    assert out["entities"] == [1001, 1002]
    assert out["not_found"] == "ERROR_REASON_ROUTE_NOT_FOUND"
    assert out["bad_key"] == "ERROR_REASON_UNAUTHENTICATED"
