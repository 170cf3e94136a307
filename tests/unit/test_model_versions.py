"""Model versions without a restart, piece by piece: pinned versions in the config and route
selection, readiness and warm-up per version, the version reaching Triton, and what
``inferline models load`` does to the bundled server's repository (real Triton: tests/integration)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.core.config import (
    CanaryConfig,
    ClassBatchingConfig,
    ClassCopiesConfig,
    ConfigError,
    DeviceClassConfig,
    EntitySpec,
    FeatureSpec,
    RouteConfig,
    VariantConfig,
    parse_config,
    split_ref,
)
from inferline.core.deadline import Deadline
from inferline.core.served_by import Reason, ServedBy
from inferline.postprocess.client import LocalPostprocessClient
from inferline.postprocess.service import PostprocessService
from inferline.router.breaker import BreakerRegistry
from inferline.router.plan import build_route_plans
from inferline.router.selection import CANARY_BUCKETS, RouteSelector, StatsRegistry
from inferline.router.service import PredictCall, RouterService
from inferline.triton.coalescer import CoalescingExecutor
from inferline.triton.executor import InferResult, ModelNotLoaded, ModelUnavailable, TritonExecutor, _classify
from inferline.triton.model_repository import adapt_onnx, inspect_model
from inferline.triton.readiness import ModelReadiness
from inferline.triton.versions import (
    BundledServer,
    LoadError,
    LoadReport,
    find_bundled,
    inspect_for_load,
    load,
    publish_bundled,
    refresh_derived,
    state_path,
    warnings,
    withdraw_bundled,
)
from tests.unit.test_router_service import FakeDegradation, FakeFeatures

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEVICES = {"cpu": DeviceClassConfig(cost_per_hour=0.2)}
V1 = VariantConfig(model="m", version="1", features=["x"])
V2 = VariantConfig(model="m", version="2", features=["x"])
ONNX_CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "features", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]
dynamic_batching { }
"""


def demo_raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())


def demo_config(**primary: Any) -> Any:
    raw = demo_raw()
    raw["routes"]["driver_ranking"]["primary"].update(primary)
    return parse_config(raw, ROOT / "deploy/local")


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v2", "0", "-1", "1.0", "²"])
def test_a_version_that_is_not_a_version_number_names_its_key(version: str) -> None:
    with pytest.raises(ConfigError, match=r"routes\.driver_ranking\.primary\.version: .*not a Triton model version"):
        demo_config(version=version)


def test_a_variant_is_named_by_model_and_pinned_version() -> None:
    assert (V1.ref, VariantConfig(model="m", features=[]).ref) == ("m:1", "m")
    assert [split_ref(r) for r in ("m:1", "m", "a:b", "ns:m:12")] == [
        ("m", "1"),
        ("m", ""),
        ("a:b", ""),
        ("ns:m", "12"),
    ]


def test_a_canary_of_a_pinned_version_is_named_model_colon_version() -> None:
    raw = demo_raw()
    route = raw["routes"]["driver_ranking"]
    route["primary"]["version"] = "1"
    route["alternates"] = [{**route["primary"], "version": "2"}]
    raw["tenants"]["demo"]["canary"] = {"driver_ranking": {"model": "driver_ranker:2", "share": 0.1}}
    raw["tenants"]["demo"]["pin"] = {"driver_ranking": "driver_ranker:1"}
    parse_config(raw, ROOT / "deploy/local")
    raw["tenants"]["demo"]["canary"]["driver_ranking"]["model"] = "driver_ranker:3"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, ROOT / "deploy/local")
    assert (
        "tenants.demo: 'driver_ranker:3' is not a variant of route 'driver_ranking' "
        "(its variants: driver_ranker:1, driver_ranker:2; a pinned version is named model:version)"
    ) in str(err.value)


# --- route selection -------------------------------------------------------------------------


def selector(available: set[str]) -> RouteSelector:
    route = RouteConfig(entity=EntitySpec(join_key="id"), features=[FeatureSpec(name="x", default=0.0)], primary=V1,
                        alternates=[V2])  # fmt: skip
    return RouteSelector("r", route, DEVICES, lambda ref: ref in available, StatsRegistry())


def test_two_versions_of_one_model_are_two_variants_with_their_own_stats() -> None:
    chosen = selector({"m:1", "m:2"})
    canary = CanaryConfig(model="m:2", share=0.5)
    picks = [chosen.select(tenant_pin=None, canary=canary, request_key=k, budget_s=1.0, prefer_cheapest=False)
             for k in (0, CANARY_BUCKETS - 1)]  # fmt: skip
    assert [(c.variant.ref, c.reason) for c in picks if c is not None] == [("m:2", "canary"), ("m:1", "preferred")]
    assert picks[0] is not None and picks[1] is not None and picks[0].stats is not picks[1].stats
    pinned = chosen.select(tenant_pin="m:2", canary=None, request_key=7, budget_s=1.0, prefer_cheapest=False)
    assert pinned is not None and (pinned.variant.ref, pinned.reason) == ("m:2", "pinned")


def test_a_canary_version_not_loaded_yet_leaves_every_call_on_the_other() -> None:
    chosen = selector({"m:1"})
    canary = CanaryConfig(model="m:2", share=1.0)
    choice = chosen.select(tenant_pin=None, canary=canary, request_key=0, budget_s=1.0, prefer_cheapest=False)
    assert choice is not None and (choice.variant.ref, choice.reason) == ("m:1", "preferred")


def test_when_the_pinned_primary_version_is_unloaded_calls_spill_to_the_next_version() -> None:
    choice = selector({"m:2"}).select(tenant_pin=None, canary=None, request_key=0, budget_s=1.0, prefer_cheapest=False)
    assert choice is not None and (choice.variant.ref, choice.reason) == ("m:2", "spill")


# --- readiness and warm-up per version --------------------------------------------------------


class FakeTriton:
    def __init__(self) -> None:
        self.ready: set[tuple[str, str]] = set()
        self.asked: list[tuple[str, str]] = []

    async def model_ready(self, name: str, version: str = "") -> bool:
        self.asked.append((name, version))
        return (name, version) in self.ready


async def test_a_version_that_turns_ready_is_warmed_up_before_it_is_reported_ready() -> None:
    triton = FakeTriton()
    warmed: list[tuple[str, bool]] = []

    async def warm(ref: str) -> None:
        warmed.append((ref, readiness.is_ready(ref)))

    readiness = ModelReadiness(triton, ["m:1", "m:2"], on_ready=warm)
    triton.ready = {("m", "1")}
    await readiness.refresh()
    assert triton.asked == [("m", "1"), ("m", "2")]
    assert readiness.is_ready("m:1") and not readiness.is_ready("m:2")
    assert warmed == [], "a variant ready from the start was warmed up at start-up"
    triton.ready.add(("m", "2"))
    await readiness.refresh()
    await readiness.refresh()
    assert warmed == [("m:2", False)], "warmed once, while still out of selection"
    assert readiness.is_ready("m:2")


async def test_a_failed_warm_up_does_not_keep_a_loaded_version_out(caplog: pytest.LogCaptureFixture) -> None:
    triton = FakeTriton()

    async def fail(ref: str) -> None:
        raise RuntimeError("boom")

    readiness = ModelReadiness(triton, ["m:2"], on_ready=fail)
    await readiness.refresh()
    triton.ready = {("m", "2")}
    await readiness.refresh()
    assert readiness.is_ready("m:2")
    assert "warm-up of m:2 before its first call failed" in caplog.text


# --- the version reaches Triton -----------------------------------------------------------------


class AnsweredCall:
    """A ``grpc.aio`` unary call that has already answered."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def add_done_callback(self, callback: Any) -> None:
        callback(self)

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return self.response


class RecordingStub:
    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []

    def ModelInfer(self, request: service_pb2.ModelInferRequest, timeout: float) -> AnsweredCall:
        self.requests.append(request)
        output = service_pb2.ModelInferResponse.InferOutputTensor(name="score", datatype="FP32", shape=[1, 1])
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version or "3", outputs=[output],
            raw_output_contents=[np.zeros(1, np.float32).tobytes()],
        )  # fmt: skip
        return AnsweredCall(response)


async def test_a_pinned_version_is_sent_to_triton_and_no_version_lets_triton_choose() -> None:
    executor = TritonExecutor("127.0.0.1:1")
    stub = RecordingStub()
    executor._stub = stub  # type: ignore[assignment]
    try:
        pinned = await executor.infer("m", np.zeros((1, 4), np.float32), deadline=Deadline.after(1), priority=2,
                                      version="2")  # fmt: skip
        latest = await executor.infer("m", np.zeros((1, 4), np.float32), deadline=Deadline.after(1), priority=2)
    finally:
        await executor.close()
    assert [r.model_version for r in stub.requests] == ["2", ""]
    assert (pinned.model_version, latest.model_version) == ("2", "3")


class VersionEcho:
    def __init__(self) -> None:
        self.versions: list[str] = []

    async def infer(self, model: str, inputs: np.ndarray, *, deadline: Deadline, priority: int, input_name: str,
                    output_name: str, version: str = "") -> InferResult:  # fmt: skip
        self.versions.append(version)
        await asyncio.sleep(0.01)
        return InferResult(np.zeros(inputs.shape[0], np.float32), model, version)


async def test_calls_of_two_versions_are_never_merged_into_one() -> None:
    inner = VersionEcho()
    executor = CoalescingExecutor(inner, max_concurrent=1)
    calls = [executor.infer("m", np.zeros((1, 4), np.float32), deadline=Deadline.after(1), priority=2, version=v)
             for v in ("1", "2", "1", "2")]  # fmt: skip
    results = await asyncio.gather(*calls)
    assert [r.model_version for r in results] == ["1", "2", "1", "2"]
    assert sorted(inner.versions) == ["1", "1", "2", "2"]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_triton_saying_a_version_is_not_loaded_is_told_from_triton_being_down() -> None:
    for code, details in [
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' version 1 is not found"),
        (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'm' version 1 is not at ready state"),
    ]:
        assert type(_classify("m", rpc_error(code, details))) is ModelNotLoaded
    down = _classify("m", rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert type(down) is ModelUnavailable


class UnloadedVersion:
    """Triton after version 1 was unloaded: calls naming it are "not found"."""

    def __init__(self, gone: str = "1") -> None:
        self.gone = gone
        self.versions: list[str] = []

    async def infer(self, model: str, inputs: np.ndarray, *, deadline: Deadline, priority: int, input_name: str,
                    output_name: str, version: str = "") -> InferResult:  # fmt: skip
        self.versions.append(version)
        if version == self.gone:
            raise ModelNotLoaded(f"model {model} failed: NOT_FOUND: version {version} is not found")
        return InferResult(np.linspace(0.2, 0.8, inputs.shape[0], dtype=np.float32), model, version)


def versioned_router(*versions: str) -> tuple[RouterService, UnloadedVersion, set[str], Any]:
    raw = demo_raw()
    route = raw["routes"]["driver_ranking"]
    route["primary"]["version"] = versions[0]
    route["alternates"] = [{**route["primary"], "version": v} for v in versions[1:]]
    config = parse_config(raw, ROOT / "deploy/local")
    gone: set[str] = set()
    plans = build_route_plans(config, lambda ref: ref not in gone)
    executor = UnloadedVersion()
    post = LocalPostprocessClient(PostprocessService(config.routes))
    router = RouterService(FakeFeatures(), executor, post, FakeDegradation(), plans, BreakerRegistry(config.breaker),
                           variant_gone=gone.add)  # fmt: skip
    call = PredictCall("demo", plans["driver_ranking"], [1001, 1002], {}, "standard", 2, 0, "r1")
    return router, executor, gone, call


async def test_a_call_to_a_version_triton_has_just_unloaded_runs_on_the_next_variant() -> None:
    router, executor, gone, call = versioned_router("1", "2")
    outcome = await router.predict(call, Deadline.after(1.0), time.perf_counter())
    assert (outcome.served_by, outcome.model_version) == (ServedBy.PRIMARY, "2")
    assert executor.versions == ["1", "2"] and gone == {"driver_ranker:1"}
    outcome = await router.predict(call, Deadline.after(1.0), time.perf_counter())
    assert executor.versions == ["1", "2", "2"], "out of selection from then on"


async def test_with_no_other_variant_a_call_to_an_unloaded_version_degrades() -> None:
    router, executor, gone, call = versioned_router("1")
    outcome = await router.predict(call, Deadline.after(1.0), time.perf_counter())
    assert outcome.served_by is not ServedBy.PRIMARY and outcome.reason is Reason.MODEL_UNAVAILABLE
    assert executor.versions == ["1"] and gone == {"driver_ranker:1"}


def test_readiness_takes_a_variant_triton_said_is_gone_out_at_once() -> None:
    readiness = ModelReadiness(FakeTriton(), ["m:1", "m:2"])
    readiness.mark_unready("m:1")
    readiness.mark_unready("unknown")
    assert not readiness.is_ready("m:1") and readiness.is_ready("m:2") and readiness.is_ready("unknown")


# --- the bundled server's repository --------------------------------------------------------------


def owner_model(repository: pathlib.Path, *versions: int) -> pathlib.Path:
    directory = repository / "m"
    for version in versions:
        (directory / str(version)).mkdir(parents=True)
        (directory / str(version) / "model.onnx").write_bytes(b"onnx v%d" % version)
    (directory / "config.pbtxt").write_text(ONNX_CONFIG)
    return directory


def tree(path: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_bytes().decode() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_bad_model_directory_is_one_line(tmp_path: pathlib.Path) -> None:
    owner_model(tmp_path, 1)
    (tmp_path / "no_version").mkdir()
    (tmp_path / "no_version" / "config.pbtxt").write_text(ONNX_CONFIG.replace('"m"', '"no_version"'))
    cases = {
        "n": "no model directory 'n' in the model repository",
        "mm": "(did you mean 'm'?)",
        "no_version": "no_version: no version directory (e.g.",
    }
    for name, expected in cases.items():
        with pytest.raises(LoadError) as err:
            inspect_for_load(tmp_path, name)
        assert err.value.exit_code == 2 and expected in str(err.value) and "\n" not in str(err.value)
    assert inspect_for_load(tmp_path, "m").versions == (1,)


def test_a_new_version_appears_in_the_derived_repository_and_the_owners_stays_untouched(tmp_path: pathlib.Path) -> None:
    owner, derived = tmp_path / "owner", tmp_path / "derived"
    derived.mkdir()
    directory = owner_model(owner, 1)
    adapt_onnx(inspect_model(directory), derived / "m")  # as the launcher did at start
    (directory / "2").mkdir()
    (directory / "2" / "model.onnx").write_bytes(b"onnx v2")
    before = tree(owner)
    copies = ClassCopiesConfig(models=["m"], classes={"batch": ClassBatchingConfig(max_queue_delay_us=2000)})
    names = refresh_derived(derived, inspect_for_load(owner, "m"), copies)
    assert names == ["m", "m__batch"]
    for model in ("m", "m__batch"):
        assert (derived / model / "2" / "model.onnx").read_bytes() == b"onnx v2"
        assert (derived / model / "2" / "model.py").resolve().name == "onnx_runner.py"
    assert (derived / "m" / "1" / "model.onnx").read_bytes() == b"onnx v1"
    assert sorted(p.name for p in derived.iterdir()) == ["m", "m__batch"], "no staging left behind"
    assert tree(owner) == before


def test_a_model_added_after_start_is_linked_into_the_derived_repository(tmp_path: pathlib.Path) -> None:
    owner, derived = tmp_path / "owner", tmp_path / "derived"
    derived.mkdir()
    directory = owner / "p"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.py").write_text("# python model\n")
    (directory / "config.pbtxt").write_text('name: "p"\nbackend: "python"\n')
    assert refresh_derived(derived, inspect_for_load(owner, "p"), ClassCopiesConfig()) == ["p"]
    assert (derived / "p").is_symlink() and (derived / "p").resolve() == directory.resolve()


def test_the_bundled_server_is_found_by_its_repository_while_it_runs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    repository = tmp_path / "models"
    repository.mkdir()
    server = BundledServer(repository.resolve(), tmp_path / "derived", "127.0.0.1:8001", os.getpid(), False)
    path = publish_bundled(server)
    assert path == state_path(repository) and path.parent == tmp_path / "run" / "inferline"
    assert find_bundled(repository) == server
    assert find_bundled(tmp_path) is None, "another repository"
    withdraw_bundled(repository, os.getpid() + 1)
    assert find_bundled(repository) == server, "another server's stop withdraws nothing"
    withdraw_bundled(repository, os.getpid())
    assert find_bundled(repository) is None
    publish_bundled(BundledServer(repository.resolve(), repository, "127.0.0.1:8001", 2**22 + 12345, False))
    assert find_bundled(repository) is None, "a server that is gone"


# --- the load and what it says ---------------------------------------------------------------------


class FakeClient:
    def __init__(self, before: list[str], after: list[str], error: str = "") -> None:
        self.states, self.after, self.error = before, after, error
        self.loaded: list[str] = []

    def get_model_repository_index(self, client_timeout: float) -> Any:
        models = [SimpleNamespace(name="m", version=v, state="READY") for v in self.states]
        return SimpleNamespace(models=[*models, SimpleNamespace(name="other", version="9", state="READY")])

    def load_model(self, name: str, client_timeout: float) -> None:
        if self.error:
            raise InferenceServerException(self.error)
        self.loaded.append(name)
        self.states = self.after


def test_a_load_reports_the_versions_before_and_after() -> None:
    client = FakeClient(["1"], ["2"])
    report = load(client, "m", ["m__batch"])  # type: ignore[arg-type]
    assert client.loaded == ["m", "m__batch"]
    assert (report.before, report.after, report.serving) == (("1",), ("2",), "2")
    assert report.line().startswith("model m: version 2 ready in ")
    assert report.line().endswith(
        "serving versions 2 (was 1); unloaded 1 once their calls finished; calls without a version go to version 2; "
        "class copies m__batch reloaded"
    )


def test_a_failed_load_is_one_line() -> None:
    reason = "load failed for model 'm': version 2 is at UNAVAILABLE state\nTraceback (most recent call last):\n"
    client = FakeClient(["1"], ["1", "2"], reason + '  File "model.py", line 5\nRuntimeError: weights are corrupt\n')
    with pytest.raises(LoadError) as err:
        load(client, "m")  # type: ignore[arg-type]
    assert str(err.value) == (
        "model m not loaded: load failed for model 'm': version 2 is at UNAVAILABLE state ... "
        "RuntimeError: weights are corrupt"
    )
    assert err.value.exit_code == 1


def test_the_load_warns_of_pins_triton_no_longer_serves_and_of_an_unwarmed_switch(tmp_path: pathlib.Path) -> None:
    config = demo_config(version="1")
    report = LoadReport("driver_ranker", ("1",), ("2",), 1.0)
    model = inspect_model(owner_model(tmp_path, 1, 2))
    assert warnings(config, model, report) == [
        "routes.driver_ranking.primary.version: pins version 1 of driver_ranker, which Triton does not serve "
        "(serves 2): its calls go to the route's other variants, or it degrades"
    ]
    unpinned = demo_config()
    assert warnings(unpinned, model, report) == [
        "model driver_ranker has no model_warmup in its config.pbtxt: variants without a version took their first "
        "calls on version 2 unwarmed (add model_warmup: docs/models.md, New versions)"
    ]
    assert warnings(unpinned, None, LoadReport("nobody_calls", (), ("1",), 1.0)) == [
        "model nobody_calls is named by no route and no models: entry; nothing calls it through inferline"
    ]


# --- the command line ------------------------------------------------------------------------------


def test_models_load_of_a_bad_directory_or_without_a_server_is_one_line_and_an_exit_code(
    tmp_path: pathlib.Path,
) -> None:
    owner_model(tmp_path / "models", 1)
    (tmp_path / "models" / "m" / "3").mkdir()  # a version without its model file (the latest: served)
    env = {"INFERLINE_TRITON__MODEL_REPOSITORY": str(tmp_path / "models"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    config = str(ROOT / "deploy/local/inferline.yaml")
    runner = CliRunner()
    cases = {
        "ghost": (2, "no model directory 'ghost' in the model repository"),
        "m": (2, "m/3/model.onnx: missing (version 3 of model 'm')"),
    }
    for name, (code, expected) in cases.items():
        result = runner.invoke(cli, ["models", "load", name, "--config", config], env=env)
        assert result.exit_code == code, result.output
        [line] = result.output.splitlines()
        assert expected in line and "Traceback" not in result.output
    (tmp_path / "models" / "m" / "3").rmdir()
    result = runner.invoke(cli, ["models", "load", "m", "--config", config], env=env)
    assert result.exit_code == 1
    assert result.output.startswith(
        f"no bundled Triton is running on {tmp_path / 'models'} (start it with inferline up)"
    )
    assert len(result.output.splitlines()) == 1


def test_a_version_pin_is_validated_before_anything_runs() -> None:
    with pytest.raises(ValidationError):
        VariantConfig(model="m", version="latest", features=[])
