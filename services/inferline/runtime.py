"""Process lifecycle: start and supervise Triton if asked, host the services, serve metrics,
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import pathlib
import signal

from prometheus_client import start_http_server

from inferline.app import App, Role, build_app
from inferline.core.config import ConfigError, InferlineConfig
from inferline.core.grpc_server import RunningServer, start_server
from inferline.core.ports import free_port, port_in_use
from inferline.core.processes import boost_this_thread
from inferline.gateway.embedded import EmbeddedGateway, check_access_log, ensure_gateway_secret
from inferline.route_check import CheckReport, route_models, run_check
from inferline.triton.autoscaler import OwnedAutoscaler
from inferline.triton.launcher import TritonLauncher
from inferline.triton.supervisor import TritonSupervisor
from inferline.workers import RouterWorkers

logger = logging.getLogger(__name__)


def _stop_signal() -> asyncio.Future[str]:
    """A future set to the name of the first SIGINT/SIGTERM, handlers installed now.

    Installed before anything starts: a SIGTERM during start-up (a supervisor, an impatient
    caller) then ends in the same orderly stop, Triton and Envoy included, instead of
    killing this process and leaving them behind.
    """
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def received(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received, sig)
    return stop


_background: set[asyncio.Task[None]] = set()
"""Fire-and-forget tasks, referenced until done (the loop keeps only weak references)."""


async def check_before_traffic(config: InferlineConfig, triton_url: str, roles: set[Role]) -> CheckReport:
    """The routes checked against Triton's models and the Feast registry (``inferline.route_check``).

    Raises:
        ConfigError: a route does not match its model or features and ``validation.on_mismatch``
            is ``refuse``: one line per mismatch, naming the route, the variant and the field.
    """
    local_features = "features" in roles or config.services.features is None
    registry = config.feature_store.feast_repo if local_features else None
    report = await run_check(config, triton_url, feast_registry_path=registry)
    if report.errors and config.validation.on_mismatch == "refuse":
        lines = "\n".join(f"  {finding.line()}" for finding in report.errors)
        raise ConfigError(
            f"{len(report.errors)} mismatch(es) between routes and their models or features "
            f"(validation.on_mismatch: not_serving starts with these routes NOT_SERVING instead):\n{lines}"
        )
    for finding in report.findings:
        if finding.blocking:
            logger.error("%s (route NOT_SERVING)", finding.line())
        elif finding.severity == "warning":
            logger.warning("%s", finding.line())
    logger.info(
        "routes checked: %d variants, %d feature references, %d mismatches",
        report.variants,
        report.feature_refs,
        len(report.errors),
    )
    return report


def _supervised_app(
    config: InferlineConfig, roles: set[Role], launcher: TritonLauncher, route_check: CheckReport
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
        route_check=route_check,
    )
    return app, supervisor


def _check_before_start(config: InferlineConfig, roles: set[Role], bundled_triton: bool) -> None:
    """Refuse to start, naming the key, where the process could not serve: a public or metrics
    port another process already listens on, a Feast repository or model repository that is
    not there.

    Otherwise each failed late and unclear: a busy port after Triton had started, as Envoy's
    bind error and a traceback of its readiness wait (and a router serving on the port itself,
    gRPC binding with ``SO_REUSEPORT``, could share it with the other process unawares); a
    missing Feast repository as Feast's FileNotFoundError traceback; a missing model
    repository as Triton's exit code, after a restart.

    Raises:
        ConfigError: naming each key at fault.
    """
    if "features" in roles and not (config.feature_store.feast_repo / "feature_store.yaml").is_file():
        raise ConfigError(
            f"feature_store.feast_repo: {config.feature_store.feast_repo} holds no feature_store.yaml "
            "(the directory of a Feast repository)"
        )
    if bundled_triton and not config.triton.model_repository.is_dir():
        raise ConfigError(f"triton.model_repository: {config.triton.model_repository} is not a directory")
    host = config.server.host
    ports = {"server.port": config.server.port, "server.metrics_port": config.server.metrics_port}
    busy = [f"{host}:{port} ({key})" for key, port in ports.items() if port and port_in_use(host, port)]
    if busy:
        raise ConfigError(
            f"{', '.join(busy)}: already in use by another process; stop it, or choose another port "
            "(--port, --metrics-port)"
        )


def _lane_note(lane_routers: list[str]) -> str:
    return f"; protected lane {', '.join(lane_routers)}" if lane_routers else ""


async def serve_process(
    config: InferlineConfig,
    roles: set[Role],
    triton_url: str | None,
    start_triton: bool,
    gateway: bool = False,
    workers: int = 1,
    config_path: pathlib.Path | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code.

    ``gateway``: Envoy takes the public port (``server.host:server.port``) in front of the
    router, which then listens on a loopback port of its own (``gateway.embedded``).
    ``workers``: router processes in all, this one included (more need the gateway, and
    ``config_path`` for the others to load). ``start_triton`` (``inferline up``) also runs
    the ``autoscale`` section's controller on the Triton used, in this process only: the
    router workers and ``inferline serve`` never do (one controller per Triton).
    """
    launcher: TritonLauncher | None = None
    supervisor: TritonSupervisor | None = None
    front: EmbeddedGateway | None = None
    others: RouterWorkers | None = None
    autoscaler: OwnedAutoscaler | None = None
    if workers > 1 and (not gateway or config_path is None):
        raise ValueError("several router workers need the embedded gateway and the config file's path")
    gateway = gateway and "router" in roles
    lane = gateway and config.gateway.starts_protected_lane
    if lane and config_path is None:
        raise ValueError("gateway.protected_lane needs the config file's path (the lane's process loads it)")
    bundled_triton = "router" in roles and triton_url is None and start_triton
    _check_before_start(config, roles, bundled_triton)  # before Triton starts: refused at once, by name
    if gateway:
        ensure_gateway_secret(config)  # before the router reads it
        check_access_log(config)  # before Triton starts: a log Envoy cannot open is refused at once
    stop = _stop_signal()
    app: App | None = None
    running: RunningServer | None = None
    workers_ready: asyncio.Task[None] | None = None

    async def start_up() -> None:
        """Everything up to serving, each part kept where the ``finally`` below stops it."""
        nonlocal launcher, supervisor, front, others, autoscaler, app, running, workers_ready, triton_url
        if bundled_triton:
            # Only the models routes name are loaded (with their per-class copies): a broken
            # directory the routes do not use costs nothing, one they use degrades its routes.
            launcher = TritonLauncher(config.triton, models=route_models(config))
            await asyncio.to_thread(launcher.start)
            report = await check_before_traffic(config, launcher.grpc_url, roles)
            app, supervisor = _supervised_app(config, roles, launcher, report)
            triton_url = launcher.grpc_url
        else:
            checked = None
            if "router" in roles and triton_url:
                checked = await check_before_traffic(config, triton_url, roles)
            app = build_app(config, roles, triton_url, route_check=checked)
        if start_triton and "router" in roles and triton_url and config.autoscale and config.autoscale.enabled:
            # Before the server takes traffic: the warm pool is loaded and warmed up when this returns.
            autoscaler = await OwnedAutoscaler.start(config.autoscale, triton_url, config.triton.tls)
        if workers > 1 or lane:
            assert config_path is not None and triton_url is not None
            tls = config.server.tls is not None
            others = RouterWorkers(
                config_path, workers - 1, triton_url, config.server.metrics_port, not tls,
                lane=lane, lane_boost=config.gateway.protected_lane_boost,
            )  # fmt: skip
            # Started now, beside this process's own start (after the autoscaler's warm pool, which
            # their warm-ups call): each process's Feast import and Triton warm-up (30 s where
            # Triton does not answer) overlap, not one after another. Envoy, started last, keeps
            # calls off them until every router is SERVING.
            workers_ready = asyncio.ensure_future(others.start())
        await app.start()
        # Feast, pandas and pyarrow leave millions of long-lived objects behind at start-up;
        # a full collection walking them stalls the event loop for 100+ ms (seen here as
        # whole bursts of requests missing their budgets). Freezing moves them out of the
        # collector's sight; objects made while serving are collected as usual.
        gc.collect()
        gc.freeze()
        if supervisor is not None:
            await supervisor.start()
        # Behind the embedded gateway, the router is reached over loopback only.
        server_config = config.server.model_copy(update={"host": "127.0.0.1", "port": 0}) if gateway else config.server
        running = await start_server(app.registrations, server_config, interceptors=app.interceptors)
        if app.route_health is not None:
            await app.route_health.start(running.health)
        if config.server.metrics_port:
            start_http_server(config.server.metrics_port, addr=config.server.host, registry=app.registry)
        public_port = running.port
        routers = [f"127.0.0.1:{running.port}"]
        lane_routers: list[str] = []
        if others is not None and workers_ready is not None:
            await workers_ready
            routers += others.addresses
            lane_routers = others.lane_addresses
        if gateway:
            public_port = config.server.port or free_port()
            front = EmbeddedGateway(config, config.server.host, public_port, routers, protected_routers=lane_routers)
            await front.start()
        logger.info(
            "serving %s on port %d%s (triton %s)",
            ",".join(sorted(roles)),
            public_port,
            f" through the gateway (routers {', '.join(routers)}{_lane_note(lane_routers)})" if gateway else "",
            triton_url,
        )
        boost = config.server.loop_priority_boost
        if boost and not boost_this_thread(boost):
            logger.warning(
                "server.loop_priority_boost: the event loop keeps the process's CPU priority "
                "(raising it needs CAP_SYS_NICE); set it to 0 to silence this"
            )

    try:
        starting = asyncio.ensure_future(start_up())
        await asyncio.wait((starting, stop), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # A stop asked for during start-up is acted on now, not once every warm-up has ended
            # (a Triton that does not answer holds each router's for 30 s): the parts started so
            # far are stopped below, as after serving.
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            logger.info("%s received during start-up: stopping", stop.result())
            if running is not None:  # serving already, and waiting for the other routers
                if app is not None and app.route_health is not None:
                    await app.route_health.stop(running.health)
                await running.server.stop(None)
            if app is not None:
                await app.close()
            return 0
        starting.result()  # a failed start-up raises here
        assert app is not None and running is not None
        received = await stop
        logger.info("%s received: draining", received)
        if app.route_health is not None:
            await app.route_health.stop(running.health)
        await running.drain_and_stop(config.server.drain_s, config.server.grace_s, config.server.drain_quiet_s)
        await app.close()
        return 0
    finally:
        if workers_ready is not None:
            workers_ready.cancel()  # nothing, if done: its failure, if any, was raised above
            await asyncio.gather(workers_ready, return_exceptions=True)
        if front is not None:
            await front.stop()
        if others is not None:
            await others.stop()
        if autoscaler is not None:  # before Triton stops, or its last samples fail
            await autoscaler.stop()
        # The supervisor first: otherwise it would take the requested stop for a crash.
        if supervisor is not None:
            await supervisor.stop()
        if launcher is not None:
            await asyncio.to_thread(launcher.stop)
