"""The instance autoscaler on the real (bundled) Triton: model control changes a model's
instance count without unloading it, an added instance runs the model's warm-up before the
load returns, the controller adds an instance under queueing and gives it back once the
queue is quiet, never below the warm pool, and ``inferline up`` with an ``autoscale``
section has the warm pool loaded before it serves and keeps it there."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import yaml
from tritonclient.grpc import aio as triton_aio

from inferline.triton.autoscaler import AutoscalerConfig, InstanceAutoscaler, ModelScalingConfig, TritonInstanceControl
from inferline.triton.launcher import TritonLauncher
from tests.integration.router_fixtures import FUNCTIONAL_BUDGETS, start_router, write_test_config

MODEL = "driver_ranker_light"


@pytest.fixture
async def client(triton_server: TritonLauncher) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(triton_server.grpc_url)
    control = TritonInstanceControl(client)
    before = await control.instance_count(MODEL)
    try:
        yield client
    finally:  # the session's Triton serves other tests: leave the model as it was
        if await control.instance_count(MODEL) != before:
            await control.set_instance_count(MODEL, before)
        await client.close()


async def _infer(client: triton_aio.InferenceServerClient, rows: int = 4) -> None:
    tensor = triton_aio.InferInput("features", [rows, 2], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 2), 0.5, dtype=np.float32))
    result = await client.infer(MODEL, [tensor], client_timeout=30)
    assert result.as_numpy("score").shape == (rows, 1)


def _instances_started(log_path: pathlib.Path | None) -> set[str]:
    assert log_path is not None
    text = log_path.read_text(errors="replace")
    return {
        word.rstrip(":,")
        for line in text.splitlines()
        if "ModelInstanceInitialize" in line or "TRITONBACKEND_ModelInstanceInitialize" in line
        for word in line.split()
        if word.startswith(MODEL + "_")
    }


async def test_instance_count_changes_without_unloading(
    client: triton_aio.InferenceServerClient, triton_server: TritonLauncher
) -> None:
    control = TritonInstanceControl(client)
    assert await control.instance_count(MODEL) == 1
    await control.set_instance_count(MODEL, 2)
    assert await control.instance_count(MODEL) == 2
    assert await client.is_model_ready(MODEL)
    await _infer(client)
    started = _instances_started(triton_server.log_path)
    assert f"{MODEL}_0_1" in started, f"Triton started {sorted(started)}"


async def test_an_added_instance_runs_the_warm_up_before_the_load_returns(
    client: triton_aio.InferenceServerClient, triton_server: TritonLauncher
) -> None:
    control = TritonInstanceControl(client)
    assert await control.has_warmup(MODEL)
    assert triton_server.log_path is not None
    mark = len(triton_server.log_path.read_bytes())
    await client.update_log_settings(settings={"log_verbose_level": 1})  # Triton logs warm-ups at level 1
    try:
        await control.set_instance_count(MODEL, 2)
    finally:
        await client.update_log_settings(settings={"log_verbose_level": 0})
    log = triton_server.log_path.read_bytes()[mark:].decode(errors="replace")
    assert f"instance {MODEL}_0_1 is running warmup sample" in log, log[-3000:]


async def test_controller_adds_an_instance_under_queueing_and_returns_to_the_warm_pool(
    client: triton_aio.InferenceServerClient,
) -> None:
    config = AutoscalerConfig(
        models={MODEL: ModelScalingConfig(min_instances=1, max_instances=2)},
        interval_s=0.2,
        scale_up_queue_ms=0.001,  # any queueing at all (the batching window alone is 0.5 ms)
        scale_down_queue_ms=0.0005,
        scale_down_after_s=1.0,
        up_cooldown_s=0.0,
        down_cooldown_s=1.0,
    )
    autoscaler = InstanceAutoscaler(config, TritonInstanceControl(client))
    control = TritonInstanceControl(client)
    await autoscaler.start()
    try:
        assert autoscaler.counts == {MODEL: 1}
        deadline = time.monotonic() + 60
        while autoscaler.counts[MODEL] < 2:
            assert time.monotonic() < deadline, "no instance added under load"
            await asyncio.gather(*(_infer(client) for _ in range(16)))
        assert await control.instance_count(MODEL) == 2
        await _infer(client)  # served throughout
        deadline = time.monotonic() + 60
        while autoscaler.counts[MODEL] > 1:
            assert time.monotonic() < deadline, "the added instance was never given back"
            await asyncio.sleep(0.2)
        assert await control.instance_count(MODEL) == 1
        await asyncio.sleep(1.5)  # idle past scale_down_after_s again: the warm pool stays
        assert autoscaler.counts[MODEL] == 1
    finally:
        await autoscaler.stop()


async def test_cli_brings_the_model_to_its_warm_pool_and_stops_on_sigterm(
    client: triton_aio.InferenceServerClient, triton_server: TritonLauncher, tmp_path: pathlib.Path
) -> None:
    control = TritonInstanceControl(client)
    assert await control.instance_count(MODEL) == 1
    log = tmp_path / "autoscale.log"
    command = [sys.executable, "-m", "inferline.cli", "triton", "autoscale", "--triton-url", triton_server.grpc_url]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, "--model", f"{MODEL}=2:3", stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while "autoscaling" not in log.read_text(errors="replace"):
            assert process.returncode is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.1)
        assert await control.instance_count(MODEL) == 2  # raised to the warm pool before it reports
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_up_loads_the_warm_pool_before_serving_and_keeps_it(
    client: triton_aio.InferenceServerClient, triton_server: TritonLauncher, tmp_path: pathlib.Path
) -> None:
    control = TritonInstanceControl(client)
    assert await control.instance_count(MODEL) == 1
    config = write_test_config(tmp_path / "inferline.yaml", budgets=FUNCTIONAL_BUDGETS)
    raw = yaml.safe_load(config.read_text())
    raw["autoscale"] = {"models": {MODEL: {"min_instances": 2, "max_instances": 3}}, "interval_s": 0.2}
    config.write_text(yaml.safe_dump(raw))
    router = start_router(triton_server, config, tmp_path)
    try:
        assert await control.instance_count(MODEL) == 2  # loaded (and warmed up) before it served
        await control.set_instance_count(MODEL, 1)  # as a restarted Triton or `models load` would
        deadline = time.monotonic() + 30
        while await control.instance_count(MODEL) != 2:
            assert time.monotonic() < deadline, f"the warm pool was not restored:\n{router.log_tail()}"
            await asyncio.sleep(0.1)
    finally:
        code = router.stop()
    assert code == 0, router.log_tail()
    assert "autoscaling driver_ranker_light=2" in router.log_tail(1_000_000)
