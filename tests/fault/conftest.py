"""Fixtures of the fault tests: real Triton, Redis and router processes, broken on purpose.

The session fixtures of the integration tests are re-exported here (``triton_config``
skips or fails when the bundled Triton is missing, ``redis_server`` is the tests' own
``redis-server``). On top of them:

* ``fault_repository`` / ``fault_triton``: a bundled Triton of the fault tests' own on a
  temporary copy of the model repository, plus three test models: ``driver_ranker_slow``
  (sleeps ``SLOW_DELAY_MS`` per batch), ``driver_ranker_faulty`` (answers NaN for rows
  whose first feature is negative, 7.0 below -100) and ``driver_ranker_narrow`` (a small,
  known capacity to overload). Tests may stop it; ``Routers.start``
  starts it again when a router needs it.
* ``routers``: writes test configs (the default config with extra routes derived from
  ``driver_ranking`` and patched sections) and runs ``inferline up`` processes.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

from inferline.core.config import TritonConfig
from inferline.triton.launcher import TritonLauncher
from tests.integration.conftest import pytest_runtest_makereport, triton_config
from tests.integration.redis_fixtures import redis_server
from tests.integration.router_fixtures import ROOT, ServerProcess, start_inferline, write_test_config

# Re-exported: session fixtures, and the hook that attaches server log tails to failed tests.
__all__ = ["pytest_runtest_makereport", "redis_server", "triton_config"]

BASE_ROUTE = "driver_ranking"
SLOW_MODEL = "driver_ranker_slow"
FAULTY_MODEL = "driver_ranker_faulty"
SLOW_DELAY_MS = 200
"""Per-batch delay of the slow model: well past any deadline the fault tests send it."""
NARROW_MODEL = "driver_ranker_narrow"
NARROW_BATCH = 1
NARROW_DELAY_MS = 20
"""The narrow model: one instance, batches of at most ``NARROW_BATCH`` rows, each taking
``NARROW_DELAY_MS``: at most 50 rows a second, a capacity a test client can overload three
times over without the client and the router themselves running out of CPU on a busy
2-core machine (at two rows of 10 ms, 3x was 450 calls a second, and under
``stress-ng --cpu 2`` the router's own gRPC server fell behind before admission ever saw
the calls). A batch still takes well under the route's 60 ms model budget, so the model
overloads by queueing, not by timing out every call (at 40 ms its circuit breaker opened
instead)."""

WAY_BACK_RESERVE_MS = 25
"""The fallback reserve of the fault tests' routes (the default config's is 5 ms). A router
answers a call whose main path ran out of time from the fallback about reserve +
post-processing budget before the deadline, ~8 ms with the default, and the answer must
then still travel back: on a busy 2-core machine (``stress-ng --cpu 2``), the client saw
1 such answer in 40 arrive after its gRPC deadline although the router had answered at
91 ms. 25 ms leaves the way back 3x the worst client-side overhead seen under that load,
so the fault tests judge the router's choices rather than the machine's scheduling; the
router's own timing is still checked against the full deadline."""

EASY_BUDGETS = {"features_ms": 1000, "model_ms": 1000}
"""Layer budgets no busy machine misses, for routes whose layers' timing a test does not look
at: on a busy 2-core machine the default 20 ms features read or 60 ms model call is now and
then missed, and the router then rightly degrades, for a reason that is not the one the test
is about. (Each layer still gets no more than what the call's deadline leaves.)"""


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, recursively for mappings (other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _copy_model(
    repository: pathlib.Path,
    source: str,
    name: str,
    parameters: Mapping[str, str],
    edits: Mapping[str, str] | None = None,
) -> None:
    """A copy of model ``source`` named ``name`` with extra config ``parameters`` (read by
    onnx_runner.py) and ``edits`` (config text replaced: old → new, each must be found)."""
    target = repository / name
    shutil.copytree(repository / source, target, symlinks=True)
    config = (target / "config.pbtxt").read_text().replace(f'name: "{source}"', f'name: "{name}"', 1)
    for old, new in (edits or {}).items():
        assert old in config, f"{old!r} not in the config of {source}"
        config = config.replace(old, new)
    for key, value in parameters.items():
        config += f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
    (target / "config.pbtxt").write_text(config)


@pytest.fixture(scope="session")
def fault_repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A model repository with the demo models and the slow and faulty test copies of the primary."""
    repository = tmp_path_factory.mktemp("fault-models")
    shutil.copy2(ROOT / "triton_models" / "onnx_runner.py", repository)  # model.py links to ../../onnx_runner.py
    for model in ("driver_ranker", "driver_ranker_light"):
        shutil.copytree(
            ROOT / "triton_models" / model,
            repository / model,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    _copy_model(repository, "driver_ranker", SLOW_MODEL, {"delay_ms": str(SLOW_DELAY_MS)})
    _copy_model(repository, "driver_ranker", FAULTY_MODEL, {"fault_injection": "nan_on_negative"})
    _copy_model(
        repository,
        "driver_ranker",
        NARROW_MODEL,
        {"delay_ms": str(NARROW_DELAY_MS)},
        {
            "max_batch_size: 128": f"max_batch_size: {NARROW_BATCH}",
            "count: 2": "count: 1",
            "preferred_batch_size: [ 16, 32 ]": f"preferred_batch_size: [ {NARROW_BATCH} ]",
            "batch_size: 8": f"batch_size: {NARROW_BATCH}",
        },
    )
    return repository


@pytest.fixture(scope="session")
def fault_triton(
    triton_config: TritonConfig, fault_repository: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonLauncher]:
    """A bundled Triton on ``fault_repository`` (every port free); a test may stop it."""
    config = triton_config.model_copy(update={"model_repository": fault_repository})
    launcher = TritonLauncher(config, log_path=tmp_path_factory.mktemp("fault-triton") / "tritonserver.log")
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


class Routers:
    """Writes router configs and runs ``inferline up`` processes for the fault tests."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory

    def write_config(
        self, name: str, *, routes: Mapping[str, Mapping[str, Any]] | None = None, **sections: Mapping[str, Any]
    ) -> pathlib.Path:
        """The integration tests' config with ``WAY_BACK_RESERVE_MS``, plus ``routes`` and patched ``sections``.

        ``routes`` maps a new route name to a patch of ``driver_ranking`` (merged
        recursively; lists replace), or ``driver_ranking`` itself to a patch of it; the
        demo tenant may call every new route. ``sections`` patch top-level sections,
        e.g. ``score_cache={"backend": "redis"}``.
        """
        path = write_test_config(self._tmp.mktemp(f"{name}-config") / "inferline.yaml")
        raw = yaml.safe_load(path.read_text())
        raw["routes"][BASE_ROUTE]["budgets"]["fallback_reserve_ms"] = WAY_BACK_RESERVE_MS
        base = raw["routes"][BASE_ROUTE]
        for route, patch in (routes or {}).items():
            raw["routes"][route] = _merge(base, patch)
            if route not in raw["tenants"]["demo"]["routes"]:
                raw["tenants"]["demo"]["routes"].append(route)
        raw = _merge(raw, sections)
        path.write_text(yaml.safe_dump(raw))
        return path

    def start(
        self,
        name: str,
        config: pathlib.Path,
        *,
        triton: TritonLauncher | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        """``inferline up`` on ``config``: against ``triton`` (started if stopped), else embedded."""
        args = ["up", "--no-gateway", "--config", str(config)]  # the router's own behaviour, reached directly
        if triton is not None:
            triton.start()  # no-op while it runs
            args += ["--triton-url", triton.grpc_url]
        return start_inferline(args, self._tmp.mktemp(f"{name}-log") / "router.log", env=env)

    @contextlib.contextmanager
    def running(
        self,
        name: str,
        *,
        triton: TritonLauncher | None = None,
        env: Mapping[str, str] | None = None,
        routes: Mapping[str, Mapping[str, Any]] | None = None,
        **sections: Mapping[str, Any],
    ) -> Iterator[ServerProcess]:
        """A router on a config of its own, stopped (SIGTERM, exit code 0 expected) afterwards."""
        server = self.start(name, self.write_config(name, routes=routes, **sections), triton=triton, env=env)
        try:
            yield server
        finally:
            code = server.stop()
        assert code == 0, f"router {name} exited with {code}:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Routers:
    return Routers(tmp_path_factory)
