"""The load generators' processes: where they run and at which priority (real child processes)."""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from typing import Any

import grpc
import pytest

from inferline.bench.mix import TrafficMix
from inferline.bench.multiproc import Generators
from inferline.bench.recording import TargetSpec
from inferline.v1 import inference_pb2, inference_pb2_grpc
from tests.waiting import wait_until


def test_generators_run_pinned_and_at_the_niceness_asked() -> None:
    cpu = min(os.sched_getaffinity(0))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lower = min(base + 3, 19)  # any process may lower its own priority
    with Generators(2, name="test-gen", cpus=frozenset({cpu}), nice=lower) as gens:
        pids = [proc.pid for proc in gens.procs]
        # Each sets its affinity and niceness first thing, before it waits for a job.
        wait_until(lambda: all(os.getpriority(os.PRIO_PROCESS, pid) == lower for pid in pids), "niceness set")
        assert all(os.sched_getaffinity(pid) == {cpu} for pid in pids)
        # A session of their own, whose autogroup (where the kernel has them) gets the niceness:
        # across sessions the kernel weighs autogroups, not processes.
        assert all(os.getsid(pid) == pid for pid in pids)
        autogroups = [pathlib.Path(f"/proc/{pid}/autogroup") for pid in pids]
        assert all(not path.exists() or path.read_text().split()[-1] == str(lower) for path in autogroups)
    with Generators(1, name="test-gen") as plain:  # by default they inherit this process's
        pid = plain.procs[0].pid
        wait_until(lambda: plain.procs[0].is_alive(), "generator started")
        assert os.getpriority(os.PRIO_PROCESS, pid) == base
        assert os.getsid(pid) == os.getsid(0)  # and this process's session


class _Peers(inference_pb2_grpc.InferenceServicer):
    """Answers every Predict and notes the connection (the peer's address and port) it came on."""

    def __init__(self) -> None:
        self.peers: Counter[str] = Counter()

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.PredictResponse:
        self.peers[context.peer()] += 1
        return inference_pb2.PredictResponse(route=request.route)


@pytest.mark.parametrize("connections", [1, 4])
async def test_a_generator_spreads_its_calls_over_its_connections(connections: int) -> None:
    peers = _Peers()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(peers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = TargetSpec("predict", f"127.0.0.1:{port}", connections=connections, entity_ids=(1, 10))
        with Generators(1, name="test-gen") as gens:
            [result] = await gens.run(
                target, TrafficMix((("critical", 1.0),)), 400, warmup_s=0.0, duration_s=0.5, deadline_s=1.0, seed=1
            )
    finally:
        await server.stop(None)
    sent = len(result.result.records)
    assert sent > 100 and sum(peers.peers.values()) == sent
    assert len(peers.peers) == connections  # one peer port per connection
    assert max(peers.peers.values()) - min(peers.peers.values()) <= 1  # round robin
