"""Routes checked before traffic, and a route whose model failed degraded alone, through real router processes.

One bundled Triton serves a model owner's standard repository, one of whose models fails
to load. Routers run against it (``--triton-url``):

* with ``validation.on_mismatch: not_serving``: the good route serves PRIMARY; the route on
  the failed model and the route whose features do not match its model's width answer from
  their degradation path, and each route's ``grpc.health.v1`` service
  (``inferline.route.<name>``) says which is which, while the server's own health is SERVING;
* by default (``refuse``) a config with mismatches does not start: exit 2, one line per
  mismatch naming the route, the variant and the field, no traceback (a route that only
  accepts more entities than its model's max batch size is a warning: it starts);
* ``inferline models check`` prints the same lines and exits 1; on a good config, 0.
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.core.config import TritonConfig
from inferline.core.ports import free_ports
from inferline.triton.launcher import TritonLauncher
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.owner_models import GOOD, owner_repository
from tests.integration.router_fixtures import DEMO_KEY, ROOT, ServerProcess, start_inferline, write_test_config

pytestmark = pytest.mark.requires_triton

AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
FEATURES = ["conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km"]
MISMATCHES = {
    "narrow": "routes.narrow.primary.features: 3 features (conv_rate, acc_rate, avg_daily_trips), "
    "but model 'ranker_onnx' input 'features' takes 4",
    "wrong_output": "routes.wrong_output.primary.output_name: model 'ranker_onnx' has no output 'probability'",
    "typo": "routes.typo.primary.model: no model 'rankr_onnx' in Triton's repository",
    "bad_view": "routes.bad_view.features[0].source: unknown feature view 'driver_stats' in the Feast registry",
}
WARNING = (
    "warning: routes.too_many_rows.primary.max_batch_size: model 'ranker_onnx' takes at most 64 rows a call; "
    "the route accepts up to 100 entities (its max_entities): larger requests degrade"
)


def route(primary: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A route on the demo driver features, with a light model and ``max_entities`` within the models' 64 rows."""
    raw: dict[str, Any] = {
        "entity": {"join_key": "driver_id", "type": "int64"},
        "max_entities": 50,
        "features": [
            {"name": "conv_rate", "source": "driver_hourly_stats:conv_rate", "default": 0.5},
            {"name": "acc_rate", "source": "driver_hourly_stats:acc_rate", "default": 0.7},
            {"name": "avg_daily_trips", "source": "driver_hourly_stats:avg_daily_trips", "default": 480},
            {"name": "trip_distance_km", "default": 6.0},
        ],
        "primary": {"features": FEATURES, **primary},
        "light": {"model": "light_onnx", "features": ["conv_rate", "acc_rate"]},
    }
    raw.update(overrides)
    return raw


def write_config(
    path: pathlib.Path, repository: pathlib.Path, routes: dict[str, Any], **validation: str
) -> pathlib.Path:
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    raw["triton"].update(model_repository=str(repository), server_env=str(ROOT / ".venv-triton"))
    raw["triton"]["coalesce_max_batch_rows"] = 64
    raw["feature_store"]["feast_repo"] = str(ROOT / "deploy/feast/feature_repo")
    raw["tenants"]["demo"]["routes"] = list(routes)
    raw["routes"] = routes
    raw["validation"] = validation
    path.write_text(yaml.safe_dump(raw))
    return path


def mismatched_routes() -> dict[str, Any]:
    bad_view = route({"model": "ranker_onnx"})
    bad_view["features"] = copy.deepcopy(bad_view["features"])
    bad_view["features"][0]["source"] = "driver_stats:conv_rate"
    return {
        "owners": route({"model": "ranker_onnx"}),
        "narrow": route({"model": "ranker_onnx", "features": FEATURES[:3]}),
        "wrong_output": route({"model": "ranker_onnx", "output_name": "probability"}),
        "typo": route({"model": "rankr_onnx"}),
        "bad_view": bad_view,
        "too_many_rows": route({"model": "ranker_onnx"}, max_entities=100),
    }


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return owner_repository(tmp_path_factory.mktemp("owner-routes"))


@pytest.fixture(scope="module")
def owner_triton(
    triton_config: TritonConfig, repository: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonLauncher]:
    config = triton_config.model_copy(update={"model_repository": repository})
    log = tmp_path_factory.mktemp("owner-routes-triton") / "tritonserver.log"
    with TritonLauncher(config, log_path=log, models=[*GOOD, "raises_on_load"]) as launcher:
        assert set(launcher.failed) == {"raises_on_load"}
        yield launcher


@pytest.fixture(scope="module")
def router(
    owner_triton: TritonLauncher, repository: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A router started with ``not_serving``: a good route, one on the failed model, one of the wrong width."""
    routes = {
        "owners": route({"model": "ranker_onnx"}),
        "broken": route({"model": "raises_on_load"}),
        "narrow": mismatched_routes()["narrow"],
    }
    directory = tmp_path_factory.mktemp("owner-router")
    config = write_config(directory / "inferline.yaml", repository, routes, on_mismatch="not_serving")
    args = ["up", "--no-gateway", "--config", str(config), "--triton-url", owner_triton.grpc_url]
    server = start_inferline(args, directory / "router.log")
    yield server
    assert server.stop() == 0, server.log_tail()


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def predict(address: str, route_name: str) -> pb.PredictResponse:
    request = pb.PredictRequest(
        route=route_name, entities=[pb.EntityKey(name="driver_id", int64_value=i) for i in (1001, 1002)]
    )
    with grpc.insecure_channel(address) as channel:
        response: pb.PredictResponse = pb_grpc.InferenceStub(channel).Predict(request, timeout=5, metadata=AUTH)
    return response


def test_each_route_has_its_own_health(router: ServerProcess) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(router.address, "") == serving
    assert health(router.address, "inferline.route.owners") == serving
    assert health(router.address, "inferline.route.broken") == not_serving
    assert health(router.address, "inferline.route.narrow") == not_serving


def test_the_good_route_serves_and_the_others_degrade(router: ServerProcess) -> None:
    assert predict(router.address, "owners").served_by == pb.SERVED_BY_PRIMARY
    broken = predict(router.address, "broken")
    assert (
        broken.served_by != pb.SERVED_BY_PRIMARY
        and broken.degradation_reason == pb.DEGRADATION_REASON_MODEL_UNAVAILABLE
    )
    assert predict(router.address, "narrow").served_by != pb.SERVED_BY_PRIMARY


def test_the_router_log_names_the_mismatch_without_a_traceback(router: ServerProcess) -> None:
    log = router.log_tail(200_000)
    assert MISMATCHES["narrow"] in log
    assert "route broken NOT_SERVING" in log
    assert "Traceback" not in log


def run_cli(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferline.cli", *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT
    )


def test_startup_refuses_mismatched_routes_in_one_line_each(
    owner_triton: TritonLauncher, repository: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = write_config(tmp_path / "inferline.yaml", repository, mismatched_routes())
    port, metrics_port = free_ports(2)
    args = ["up", "--no-gateway", "--config", str(config), "--triton-url", owner_triton.grpc_url]
    done = run_cli([*args, "--port", str(port), "--metrics-port", str(metrics_port)])
    assert done.returncode == 2, done.stderr[-4000:]
    for line in MISMATCHES.values():
        assert line in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "owners" not in done.stderr.replace("owners_python", "")


def test_startup_without_a_bundled_triton_says_so_in_one_line(tmp_path: pathlib.Path) -> None:
    config = write_test_config(tmp_path / "inferline.yaml")
    raw = yaml.safe_load(config.read_text())
    raw["triton"]["server_env"] = str(tmp_path / "no-such-venv")
    config.write_text(yaml.safe_dump(raw))
    port, metrics_port = free_ports(2)
    done = run_cli(
        ["up", "--no-gateway", "--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port)]
    )
    assert done.returncode == 1, done.stderr[-4000:]
    assert "the bundled Triton did not start: tritonserver not found" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_models_check_prints_every_mismatch_and_passes_a_good_config(
    owner_triton: TritonLauncher, repository: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    bad = write_config(tmp_path / "bad.yaml", repository, mismatched_routes())
    done = run_cli(["models", "check", "--config", str(bad), "--triton-url", owner_triton.grpc_url])
    assert done.returncode == 1, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(MISMATCHES) + 2, done.stdout  # the warning of the primary and of the light model
    assert all(any(line.startswith(expected) for line in lines) for expected in [*MISMATCHES.values(), WARNING])
    good = write_config(tmp_path / "good.yaml", repository, {"owners": route({"model": "ranker_onnx"})})
    done = run_cli(["models", "check", "--config", str(good), "--triton-url", owner_triton.grpc_url])
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "no problems" in done.stderr
