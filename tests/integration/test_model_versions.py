"""New model versions under steady load, without a restart: real bundled Triton, real router process.

A model owner's repository (standard onnxruntime directories) runs on the bundled Triton
and a router (``inferline up``) calls it under steady ``Predict`` load while the owner adds
``2/`` to a model directory and runs ``inferline models load`` (the command line, which
finds the bundled server itself). Two rollouts:

* **Following ``version_policy``** (route ``driver_ranking``, its variant names no
  version; Triton's default policy serves the latest): answers move from version 1 to 2,
  no call fails, and the switch time is reported.
* **Canary of a pinned version** (route ``canary_ranking``: primary ``scorer:1``, an
  alternate ``scorer:2`` declared before version 2 exists, the tenant's canary sending it
  half of the calls; ``version_policy`` keeps the latest two): before the load every
  answer is version 1; after it the router warms version 2 up and then sends it its share,
  while version 1 keeps the rest; no call fails.

"Failed" means anything but an OK answer served by the primary path: an RPC error or a
degraded (fallback) answer.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import yaml

from inferline.core.config import TritonConfig
from inferline.triton.launcher import TritonLauncher
from inferline.triton.versions import find_bundled
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.owner_models import LIGHT_ONNX, onnx_config, onnx_model
from tests.integration.router_fixtures import (
    DEMO_KEY,
    FUNCTIONAL_ADMISSION,
    FUNCTIONAL_BUDGETS,
    FUNCTIONAL_QUEUE_WAIT_MS,
    ROOT,
    ServerProcess,
    start_router,
    write_test_config,
)

pytestmark = pytest.mark.requires_triton

AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
WARMUP = """
model_warmup [ { name: "zeros", batch_size: 1,
  inputs { key: "features" value { data_type: TYPE_FP32, dims: [ 4 ], zero_data: true } } } ]
"""
KEEP_TWO = "version_policy: { latest: { num_versions: 2 } }\n"
LOAD_THREADS = 3
PAUSE_S = 0.02
"""Each load thread's pause between calls: about 3 × 40 calls a second in all, steady."""
CANARY_SHARE = 0.5
BUDGETS = {**FUNCTIONAL_BUDGETS, "model_ms": 2000}
"""A test of what answers (which version, from the primary path), not of when: Triton's
priority queue holds calls sent with a priority and a queue timeout for up to ~0.5 s now
and then, rollout or not (seen on this 2-core VM), which must not read as a failed rollout."""
CALL_TIMEOUT_S = 3.0


def owner_model(repository: pathlib.Path, name: str, extra: str = "") -> pathlib.Path:
    directory = onnx_model(repository, name)
    (directory / "config.pbtxt").write_text(onnx_config(name, 4) + WARMUP + extra)
    return directory


@dataclass
class Answer:
    sent_at: float
    answered_at: float
    version: str = ""
    error: str = ""


@dataclass
class SteadyLoad:
    """``LOAD_THREADS`` threads calling ``Predict`` on one route back to back until stopped."""

    address: str
    route: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        for i in range(LOAD_THREADS):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self, seed: int) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.InferenceStub(channel)
        n = 0
        while not self._stop.is_set():
            n += 1
            entity = pb.EntityKey(name="driver_id", int64_value=1001 + (seed * 7 + n) % 5)
            request = pb.PredictRequest(route=self.route, entities=[entity], traffic_class="standard")
            sent = time.monotonic()
            try:
                response = stub.Predict(request, timeout=CALL_TIMEOUT_S, metadata=AUTH)
            except grpc.RpcError as err:
                self.answers.append(Answer(sent, time.monotonic(), error=f"{err.code().name}: {err.details()}"))
            else:
                answer = Answer(sent, time.monotonic(), response.model_version)
                if response.served_by != pb.SERVED_BY_PRIMARY:
                    reason = pb.DegradationReason.Name(response.degradation_reason)
                    answer.error = f"{pb.ServedBy.Name(response.served_by)} ({reason})"
                self.answers.append(answer)
            time.sleep(PAUSE_S)
        channel.close()

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.error]

    def versions(self, after: float = 0.0, before: float = float("inf")) -> list[str]:
        return [a.version for a in self.answers if after <= a.sent_at and a.answered_at <= before]


@dataclass
class Stack:
    repository: pathlib.Path
    config: pathlib.Path
    launcher: TritonLauncher
    router: ServerProcess


@pytest.fixture(scope="module")
def stack(triton_config: TritonConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("versions")
    repository = root / "models"
    repository.mkdir()
    owner_model(repository, "ranker")
    owner_model(repository, "scorer", KEEP_TWO)
    onnx_model(repository, "light", LIGHT_ONNX, width=2)
    config = write_test_config(
        root / "inferline.yaml",
        budgets=BUDGETS,
        queue_wait_target_ms=FUNCTIONAL_QUEUE_WAIT_MS,
        admission=FUNCTIONAL_ADMISSION,
    )
    raw = yaml.safe_load(config.read_text())
    raw["triton"]["model_repository"] = str(repository)
    raw["triton"]["coalesce_max_batch_rows"] = 64  # the owner's configs' max_batch_size
    route = raw["routes"]["driver_ranking"]
    route["primary"]["model"] = "ranker"
    route["light"]["model"] = "light"
    canary = yaml.safe_load(yaml.safe_dump(route))
    features = route["primary"]["features"]
    canary["primary"] = {"model": "scorer", "version": "1", "features": features}
    canary["alternates"] = [{"model": "scorer", "version": "2", "features": features}]
    raw["routes"]["canary_ranking"] = canary
    demo = raw["tenants"]["demo"]
    demo["routes"].append("canary_ranking")
    demo["canary"] = {"canary_ranking": {"model": "scorer:2", "share": CANARY_SHARE}}
    config.write_text(yaml.safe_dump(raw))

    triton = triton_config.model_copy(update={"model_repository": repository})
    launcher = TritonLauncher(triton, root / "tritonserver.log", models=["ranker", "scorer", "light"])
    launcher.start()
    try:
        assert launcher.failed == {}
        router = start_router(launcher, config, root)
        try:
            yield Stack(repository, config, launcher, router)
        finally:
            code = router.stop()
            assert code == 0, f"router exited with {code}:\n{router.log_tail()}"
    finally:
        launcher.stop()


def models_load(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``inferline models load ARGS --config CONFIG``, as the owner runs it."""
    command = [sys.executable, "-m", "inferline.cli", "models", "load", *args, "--config", str(stack.config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def add_version(model_dir: pathlib.Path, version: int) -> None:
    """What the owner does: a new version directory beside the others (written, then renamed in)."""
    staging = model_dir.parent / f".{model_dir.name}-{version}"
    shutil.copytree(model_dir / "1", staging)
    staging.rename(model_dir / str(version))


def test_the_bundled_triton_is_found_by_its_model_repository(stack: Stack) -> None:
    found = find_bundled(stack.repository)
    assert found is not None
    assert (found.grpc_url, found.pid) == (stack.launcher.grpc_url, stack.launcher.pid)
    assert found.derived  # onnxruntime models: the server runs on the derived repository


def test_a_new_version_takes_over_under_steady_load_without_a_failed_call(
    stack: Stack, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    with SteadyLoad(stack.router.address, "driver_ranking") as load:
        time.sleep(1.5)
        add_version(stack.repository / "ranker", 2)
        started = time.monotonic()
        done = models_load(stack, "ranker")
        returned = time.monotonic()
        time.sleep(1.5)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("model ranker: version 2 ready in ")
    assert "serving versions 2 (was 1)" in line and "calls without a version go to version 2" in line

    assert load.failed() == [], load.failed()[:5]
    assert set(load.versions(before=started)) == {"1"}
    assert set(load.versions(after=returned)) == {"2"}
    first_v2 = min(a.answered_at for a in load.answers if a.version == "2")
    last_v1 = max(a.answered_at for a in load.answers if a.version == "1")
    switch_s = first_v2 - started
    record_property("calls", len(load.answers))
    record_property("switch_s", round(switch_s, 3))
    with capsys.disabled():  # the switch time, in the test run's output
        print(
            f"\nversion_policy rollout: {len(load.answers)} calls, 0 failed; `models load` took "
            f"{returned - started:.2f} s ({line.split(' in ')[1].split(';')[0]} in Triton); first version-2 answer "
            f"{switch_s:.2f} s after it "
            f"started, last version-1 answer {last_v1 - started:.2f} s"
        )
    assert (stack.repository / "ranker" / "config.pbtxt").read_text().startswith('name: "ranker"')  # untouched


def test_a_canary_of_the_next_version_gets_its_share_once_loaded_and_warm(
    stack: Stack, record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    with SteadyLoad(stack.router.address, "canary_ranking") as load:
        time.sleep(1.5)
        add_version(stack.repository / "scorer", 2)
        started = time.monotonic()
        done = models_load(stack, "scorer")
        returned = time.monotonic()
        deadline = returned + 10
        while time.monotonic() < deadline and "2" not in load.versions():
            time.sleep(0.1)
        time.sleep(3)
    assert done.returncode == 0, done.stderr
    assert "serving versions 1, 2 (was 1)" in done.stdout
    assert load.failed() == [], load.failed()[:5]
    assert set(load.versions(before=started)) == {"1"}
    first_v2 = min(a.sent_at for a in load.answers if a.version == "2")
    settled = load.versions(after=first_v2 + 0.5)
    share = settled.count("2") / len(settled)
    assert set(settled) == {"1", "2"}
    assert CANARY_SHARE - 0.2 < share < CANARY_SHARE + 0.2, share
    record_property("canary_switch_s", round(first_v2 - started, 3))
    with capsys.disabled():
        print(
            f"\ncanary rollout: {len(load.answers)} calls, 0 failed; first version-2 answer "
            f"{first_v2 - started:.2f} s after `models load` started (it took {returned - started:.2f} s); "
            f"then {share:.0%} of answers version 2"
        )
    log = stack.router.log_tail(1_000_000)
    assert "variant scorer:2 is ready on Triton and warmed up" in log


def test_promoting_the_canary_moves_every_call_to_it(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """The owner drops version 1 from ``version_policy`` and loads again: Triton unloads it once
    its calls have finished, and the route's calls spill to its ``scorer:2`` variant. A call the
    router sends to version 1 after Triton unloaded it (before the router's readiness refresh has
    seen it go) is told "not found": the router takes ``scorer:1`` out of selection at once and
    runs the call on ``scorer:2``, within its budget, so none fails, whichever of the two notices
    first."""
    config = stack.repository / "scorer" / "config.pbtxt"
    config.write_text(config.read_text().replace(KEEP_TWO, "version_policy: { specific: { versions: [ 2 ] } }\n"))
    with SteadyLoad(stack.router.address, "canary_ranking") as load:
        time.sleep(1.0)
        started = time.monotonic()
        done = models_load(stack, "scorer")
        returned = time.monotonic()
        time.sleep(4)
    assert done.returncode == 0, done.stderr
    assert "serving versions 2 (was 1, 2); unloaded 1 once their calls finished" in done.stdout
    assert "routes.canary_ranking.primary.version: pins version 1 of scorer, which Triton does not serve" in done.stderr
    assert load.failed() == [], load.failed()[:5]
    assert set(load.versions(after=returned)) == {"2"}
    with capsys.disabled():
        print(f"\npromotion: {len(load.answers)} calls, 0 failed; `models load` took {returned - started:.2f} s")
    # The router took version 1 out of selection one of two ways, whichever came first: a call
    # Triton told "not found" (then that call ran on scorer:2), or its readiness refresh. Which
    # one is a race (both were seen in CI); that a call to an unloaded version runs on the next
    # variant is tested deterministically in tests/unit/test_model_versions.py.
    log = stack.router.log_tail(1_000_000)
    assert (
        "scorer:1 is not loaded on Triton any more: out of route selection" in log
        or "models not ready on Triton: ['scorer:1']" in log
    ), log[-3000:]


def test_a_bad_load_is_one_line_and_changes_nothing(stack: Stack) -> None:
    (stack.repository / "ranker" / "7").mkdir()  # a version directory without its model file
    try:
        cases = {
            ("ghost",): (2, "no model directory 'ghost' in the model repository"),
            ("ranker",): (2, "model.onnx: missing (version 7 of model 'ranker')"),
        }
        for args, (code, expected) in cases.items():
            done = models_load(stack, *args)
            assert done.returncode == code, done.stderr
            assert done.stdout == ""
            [line] = done.stderr.splitlines()
            assert expected in line and "Traceback" not in line
    finally:
        (stack.repository / "ranker" / "7").rmdir()
    with SteadyLoad(stack.router.address, "driver_ranking") as load:
        time.sleep(0.5)
    assert load.failed() == [] and len(set(load.versions())) == 1
