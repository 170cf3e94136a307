"""Process lifecycle: start and supervise Triton if asked, host the services, serve metrics,
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from prometheus_client import start_http_server

from inferline.app import App, Role, build_app
from inferline.core.config import InferlineConfig
from inferline.core.grpc_server import start_server
from inferline.triton.launcher import TritonLauncher
from inferline.triton.supervisor import TritonSupervisor

logger = logging.getLogger(__name__)


async def _wait_for_signal() -> str:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def received(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received, sig)
    return await stop


_background: set[asyncio.Task[None]] = set()
"""Fire-and-forget tasks, referenced until done (the loop keeps only weak references)."""


def _supervised_app(
    config: InferlineConfig, roles: set[Role], launcher: TritonLauncher
) -> tuple[App, TritonSupervisor]:
    """The app with the router told at once when the bundled Triton is down, and when it is back."""
    primaries = [v.model for r in config.routes.values() for v in r.full_variants]
    app: App | None = None

    def on_change(available: bool) -> None:
        if available and app is not None and app.recovery is not None:
            for model in primaries:
                app.recovery.healthy(model)
        if available and app is not None and app.readiness is not None:
            # A restarted Triton may have said "not ready" while loading: ask again now,
            # not at the next periodic refresh, or selection would skip its models for seconds.
            task = asyncio.get_running_loop().create_task(app.readiness.refresh())
            _background.add(task)
            task.add_done_callback(_background.discard)

    supervisor = TritonSupervisor(launcher, on_change=on_change)
    app = build_app(
        config,
        roles,
        launcher.grpc_url,
        model_available=lambda: supervisor.available,
        triton_metrics_url=launcher.metrics_url,
    )
    return app, supervisor


async def serve_process(config: InferlineConfig, roles: set[Role], triton_url: str | None, start_triton: bool) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    launcher: TritonLauncher | None = None
    supervisor: TritonSupervisor | None = None
    try:
        if "router" in roles and triton_url is None and start_triton:
            launcher = TritonLauncher(config.triton)
            await asyncio.to_thread(launcher.start)
            app, supervisor = _supervised_app(config, roles, launcher)
            triton_url = launcher.grpc_url
        else:
            app = build_app(config, roles, triton_url)
        await app.start()
        # Feast, pandas and pyarrow leave millions of long-lived objects behind at start-up;
        # a full collection walking them stalls the event loop for 100+ ms (seen here as
        # whole bursts of requests missing their budgets). Freezing moves them out of the
        # collector's sight; objects made while serving are collected as usual.
        gc.collect()
        gc.freeze()
        if supervisor is not None:
            await supervisor.start()
        running = await start_server(app.registrations, config.server, interceptors=app.interceptors)
        if config.server.metrics_port:
            start_http_server(config.server.metrics_port, addr=config.server.host, registry=app.registry)
        logger.info("serving %s on port %d (triton %s)", ",".join(sorted(roles)), running.port, triton_url)
        received = await _wait_for_signal()
        logger.info("%s received: draining", received)
        await running.drain_and_stop(config.server.drain_s, config.server.grace_s, config.server.drain_quiet_s)
        await app.close()
        return 0
    finally:
        # The supervisor first: otherwise it would take the requested stop for a crash.
        if supervisor is not None:
            await supervisor.stop()
        if launcher is not None:
            await asyncio.to_thread(launcher.stop)
