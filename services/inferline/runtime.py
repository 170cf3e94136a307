"""Process lifecycle: start Triton if asked, host the services, serve metrics, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from prometheus_client import start_http_server

from inferline.app import Role, build_app
from inferline.core.config import InferlineConfig
from inferline.core.grpc_server import start_server

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


async def serve_process(config: InferlineConfig, roles: set[Role], triton_url: str | None, start_triton: bool) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    launcher = None
    if "router" in roles and triton_url is None and start_triton:
        from inferline.triton.launcher import TritonLauncher

        launcher = TritonLauncher(config.triton)
        await asyncio.to_thread(launcher.start)
        triton_url = launcher.grpc_url
    try:
        app = build_app(config, roles, triton_url)
        await app.start()
        # Feast, pandas and pyarrow leave millions of long-lived objects behind at start-up;
        # a full collection walking them stalls the event loop for 100+ ms (seen here as
        # whole bursts of requests missing their budgets). Freezing moves them out of the
        # collector's sight; objects made while serving are collected as usual.
        gc.collect()
        gc.freeze()
        running = await start_server(app.registrations, config.server)
        if config.server.metrics_port:
            start_http_server(config.server.metrics_port, addr=config.server.host, registry=app.registry)
        logger.info("serving %s on port %d (triton %s)", ",".join(sorted(roles)), running.port, triton_url)
        received = await _wait_for_signal()
        logger.info("%s received: draining", received)
        await running.drain_and_stop(config.server.drain_s, config.server.grace_s)
        await app.close()
        return 0
    finally:
        if launcher is not None:
            await asyncio.to_thread(launcher.stop)
