"""The embedded gateway's CPU priority (``gateway.priority_boost``): every Envoy thread runs that
many steps of niceness above the process that started it, where raising a priority is
permitted (root, CAP_SYS_NICE, RLIMIT_NICE), and at its priority, with one warning, where not.
And its CPU group (``gateway.own_cpu_group``): a session, so an autogroup, of its own, or the
starting process's. Against a real Envoy in front of a real router."""

from __future__ import annotations

import logging
import os
import pathlib

import grpc
import pytest

from inferline.core.config import load_config
from inferline.core.ports import free_port
from inferline.core.processes import may_raise_priority, pid_alive
from inferline.gateway.embedded import EmbeddedGateway, ensure_gateway_secret
from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.router_fixtures import DEMO_KEY, ServerProcess

pytestmark = pytest.mark.requires_triton


def thread_nices(pid: int) -> list[int]:
    """The niceness of each thread of ``pid`` (on Linux a thread's niceness is its own)."""
    nices = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        nices.append(int(fields[16]))  # stat field 19, "nice", counted after the ")" of the name
    return nices


@pytest.mark.parametrize("boost", [5, 0])
async def test_every_envoy_thread_runs_at_the_boosted_priority(
    router_server: ServerProcess,
    router_config: pathlib.Path,
    tmp_path: pathlib.Path,
    boost: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = load_config(router_config)
    config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"priority_boost": boost})})
    ensure_gateway_secret(config)
    gateway = EmbeddedGateway(config, "127.0.0.1", free_port(), [router_server.address], work_dir=tmp_path)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with caplog.at_level(logging.WARNING, logger="inferline.gateway.embedded"):
        await gateway.start()
    try:
        pid = gateway.pid
        assert pid is not None
        permitted = may_raise_priority(own - boost)
        nices = thread_nices(pid)
        assert len(nices) > 1  # its workers too, not only its main thread
        assert set(nices) == {own - boost if permitted else own}
        warned = [r for r in caplog.records if "priority_boost" in r.getMessage()]
        assert len(warned) == (0 if permitted or boost == 0 else 1)
        async with grpc.aio.insecure_channel(gateway.address) as channel:  # and it still serves
            request = pb.PredictRequest(
                route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001)]
            )
            answer = await pb_grpc.InferenceStub(channel).Predict(
                request, timeout=10, metadata=(("authorization", f"Bearer {DEMO_KEY}"),)
            )
        assert answer.served_by == pb.SERVED_BY_PRIMARY
    finally:
        await gateway.stop()


def autogroup(pid: int) -> str | None:
    """The scheduler's autogroup of ``pid`` (``/autogroup-N nice K``), or None where none applies.

    The file is missing where the kernel has no autogroups, and empty for a process in a CPU cgroup
    other than the root one (a container, a systemd slice): the cgroup then decides, not the session.
    """
    path = pathlib.Path(f"/proc/{pid}/autogroup")
    fields = path.read_text().split() if path.exists() else []
    return fields[0] if fields else None


@pytest.mark.parametrize("own_group", [True, False])
async def test_envoy_runs_in_a_cpu_group_of_its_own(
    router_server: ServerProcess, router_config: pathlib.Path, tmp_path: pathlib.Path, own_group: bool
) -> None:
    config = load_config(router_config)
    config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"own_cpu_group": own_group})})
    ensure_gateway_secret(config)
    gateway = EmbeddedGateway(config, "127.0.0.1", free_port(), [router_server.address], work_dir=tmp_path)
    await gateway.start()
    try:
        pid = gateway.pid
        assert pid is not None
        if own_group:
            assert os.getsid(pid) == pid != os.getsid(0)  # a session (and process group) of its own
            assert autogroup(pid) is None or autogroup(pid) != autogroup(os.getpid())
        else:
            assert os.getsid(pid) == os.getsid(0)
            assert autogroup(pid) == autogroup(os.getpid())
        async with grpc.aio.insecure_channel(gateway.address) as channel:  # and it serves
            request = pb.PredictRequest(
                route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001)]
            )
            answer = await pb_grpc.InferenceStub(channel).Predict(
                request, timeout=10, metadata=(("authorization", f"Bearer {DEMO_KEY}"),)
            )
        assert answer.predictions
    finally:
        await gateway.stop()
    assert not pid_alive(pid)  # stopped and reaped, in its own session too
