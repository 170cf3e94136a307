"""``RouterWorkers``: more router processes beside ``inferline up``'s own, behind its gateway.

One Python router process runs its request path on one core (the GIL); ``inferline up
--workers N`` runs N-1 more (``inferline serve router`` on loopback ports, on the same
bundled Triton and config) so the router uses every core, and the embedded gateway
balances calls (not connections) over all N. Each worker hosts features, post-processing
and degradation in-process like the first. Workers that die are started again on the same
port; Envoy's health checks keep calls off a worker until it is SERVING.

With ``gateway.protected_lane`` one more process is the lane of the classes the gateway never
sheds (``gateway.protected_routers``): the gateway sends their calls there (and to the
others only while the lane is down), so under overload they do not queue behind the lower
classes in one router's gRPC transport. The lane runs ``gateway.protected_lane_boost`` steps
of CPU niceness above the other routers, so on shared cores it does not wait behind them
for a core either. It runs no batch job (``batch_jobs.run_jobs`` false): the other routers do.

Per-process state is per worker: with ``rate_limit.backend: memory`` each worker has its own
token buckets (a tenant gets up to N times its quota), and with ``score_cache.backend:
memory`` its own cache of recent scores. Use the Redis backends to share them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass

from inferline.core.health_wait import wait_until_serving_async
from inferline.core.ports import free_ports
from inferline.core.processes import ChildBoost, nice_prefix, spawn_tethered

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
RESTART_DELAY_S = 1.0
"""Pause before starting a dead worker again: a crash loop must not spin a core."""
STOP_TIMEOUT_S = 30.0
LANE_RUNS_NO_JOBS = "INFERLINE_BATCH_JOBS__RUN_JOBS"
"""Set to false in the protected lane's environment (``batch_jobs.run_jobs``)."""


@dataclass
class _Worker:
    port: int
    metrics_port: int
    lane: bool = False
    """The protected lane's process (``gateway.protected_routers``)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class RouterWorkers:
    """``count`` router processes on loopback ports, started, supervised and stopped together.

    Args:
        config_path: the YAML file this process loaded (the workers load the same, with the
            same environment overrides).
        count: how many processes to run.
        triton_url: the Triton they call (the bundled one of the parent process).
        metrics_port: the parent's metrics port; 0: the workers serve none either, else each
            serves its own on a free port (logged with its address).
        wait_ready: wait for each worker's health check (off when the router port serves TLS,
            whose client credentials this process may not hold; Envoy's checks still gate traffic).
        lane: also start the protected lane's process (``lane_addresses``), ``lane_boost``
            steps of niceness above the others.
    """

    def __init__(
        self,
        config_path: pathlib.Path,
        count: int,
        triton_url: str,
        metrics_port: int,
        wait_ready: bool = True,
        *,
        lane: bool = False,
        lane_boost: int = 0,
    ) -> None:
        self._config_path = config_path
        self._triton_url = triton_url
        self._wait_ready = wait_ready
        self._lane_boost = ChildBoost(
            lane_boost, "gateway.protected_lane_boost", "the protected lane runs at the other routers' CPU priority"
        )
        total = count + lane
        ports = free_ports(total * 2)
        self._workers = [
            _Worker(ports[2 * i], ports[2 * i + 1] if metrics_port else 0, lane=i == count) for i in range(total)
        ]
        self._watch: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def addresses(self) -> list[str]:
        """The workers that take every class (the lane's process not among them)."""
        return [w.address for w in self._workers if not w.lane]

    @property
    def lane_addresses(self) -> list[str]:
        """The protected lane's process, if started."""
        return [w.address for w in self._workers if w.lane]

    def _spawn(self, worker: _Worker) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "inferline.cli", "serve", "router", "--config", str(self._config_path),
            "--triton-url", self._triton_url, "--port", str(worker.port), "--metrics-port", str(worker.metrics_port),
        ]  # fmt: skip
        # Loopback only: the gateway is the front door. The rest of the environment (the gateway
        # and service secrets, INFERLINE_* overrides) is this process's.
        environ = {**os.environ, "INFERLINE_SERVER__HOST": "127.0.0.1"}
        if worker.lane:
            # The lane serves the BatchJobs service but runs no job (``batch_jobs.run_jobs``):
            # a job's process would take its raised priority, and its loop the jobs' supervision.
            environ[LANE_RUNS_NO_JOBS] = "false"
        # At the supervisor's own priority, not its event loop's (each worker boosts its own);
        # the lane above it. Stopped (drained) by the kernel should this process be killed outright.
        boost = self._lane_boost.prefix if worker.lane else nice_prefix
        process = spawn_tethered(command, priority=boost, env=environ, stdin=subprocess.DEVNULL)
        logger.info(
            "started %s pid %d on %s (metrics port %d)",
            "protected lane router" if worker.lane else "router worker",
            process.pid, worker.address, worker.metrics_port,
        )  # fmt: skip
        return process

    async def start(self) -> None:
        """Start every worker, wait until each is SERVING, then watch them."""
        for worker in self._workers:
            worker.process = self._spawn(worker)
        if self._wait_ready:
            await asyncio.gather(*(self._ready(w) for w in self._workers))
        loop = asyncio.get_running_loop()
        self._watch = [loop.create_task(self._supervise(w)) for w in self._workers]

    async def _ready(self, worker: _Worker) -> None:
        process = worker.process
        assert process is not None
        await wait_until_serving_async(worker.address, READY_TIMEOUT_S, is_alive=lambda: process.poll() is None)

    async def _supervise(self, worker: _Worker) -> None:
        while not self._stopping:
            process = worker.process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self._stopping:
                return
            logger.error("router worker on %s exited with %s; starting it again", worker.address, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if not self._stopping:
                worker.process = self._spawn(worker)

    async def stop(self) -> None:
        """SIGTERM every worker (each drains as configured), SIGKILL after ``STOP_TIMEOUT_S``."""
        self._stopping = True
        running = [w.process for w in self._workers if w.process is not None and w.process.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        for task in self._watch:
            await task
