"""The slim Python client (clients/python) installs into a fresh virtual environment with
only its declared dependencies (tests/fresh_venv.py), and calls a real router from there:
anything else the client imported (numpy, Feast, tritonclient, the server package) would
be missing there.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest

from tests.fresh_venv import build_wheel, closure, make_venv, requires_of
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


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, list[str]]:
    """A fresh venv holding the client's wheel and its dependency closure; (python, Requires-Dist)."""
    work = tmp_path_factory.mktemp("client")
    source = work / "source"
    shutil.copytree(ROOT / "clients" / "python", source)  # links to the generated stubs become files
    wheel = build_wheel(source, work / "dist")
    return make_venv(wheel, work / "venv"), requires_of(wheel)


def test_client_depends_on_grpc_and_protobuf_only(client_python: tuple[pathlib.Path, list[str]]) -> None:
    _, requires = client_python
    needed = closure(requires)
    assert needed <= ALLOWED, f"the client pulls in {sorted(needed - ALLOWED)}"
    assert {"grpcio", "protobuf"} <= needed


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
