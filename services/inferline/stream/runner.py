"""``run_stream``: check the options, wire the worker's parts from the config, run until a signal.

The one entry point the CLI calls. Everything before the worker starts is a check that
fails with ``StreamInputError`` (exit 2) before any event is read.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CollectorRegistry

from inferline.batch.features import BatchFeatures
from inferline.batch.publish import CachePublisher
from inferline.batch.scoring import BatchScorer, ModelTarget
from inferline.core.config import InferlineConfig, RouteConfig
from inferline.core.errors import DependencyUnavailable
from inferline.degradation.factory import build_degradation_service
from inferline.stream.engines import open_sink, open_source
from inferline.stream.errors import StreamError, StreamInputError
from inferline.stream.feature_batch import FeatureBatcher
from inferline.stream.metrics import StreamMetrics
from inferline.stream.scoring import EventScorer
from inferline.stream.spec import StreamSpec
from inferline.stream.worker import StreamWorker
from inferline.triton.class_copies import ClassModelMap
from inferline.triton.executor import TritonExecutor

logger = logging.getLogger(__name__)

MODEL_ATTEMPTS = 2
"""Tries of one event's Triton call before the degradation ladder answers it."""


def check_spec(config: InferlineConfig, spec: StreamSpec) -> RouteConfig:
    """The route, after checking the options against the config.

    Raises:
        StreamInputError: naming the option at fault.
    """
    route = config.routes.get(spec.route)
    if route is None:
        raise StreamInputError(f"--route {spec.route!r}: no such route (routes: {', '.join(config.routes)})")
    if spec.traffic_class not in config.traffic_classes:
        raise StreamInputError(f"--class {spec.traffic_class!r}: no such traffic class")
    if spec.tenant is not None:
        tenant = config.tenants.get(spec.tenant)
        if tenant is None:
            raise StreamInputError(f"--tenant {spec.tenant!r}: no such tenant")
        if spec.route not in tenant.routes:
            raise StreamInputError(f"--tenant {spec.tenant!r} may not call route {spec.route!r}")
        if config.score_cache.backend != "redis":
            raise StreamInputError("--tenant: refreshing the score cache needs score_cache.backend: redis")
    return route


async def primary_target(config: InferlineConfig, spec: StreamSpec, executor: TritonExecutor) -> ModelTarget:
    """The route's primary model (its copy for the worker's class), one event per request.

    Raises:
        StreamError: Triton does not answer or the model is not ready.
    """
    route = config.routes[spec.route]
    variant = route.primary
    model = ClassModelMap(config.triton.class_copies).resolve(variant.model, spec.traffic_class)
    try:
        ready = await executor.model_ready(model)
    except DependencyUnavailable as err:
        raise StreamError(f"Triton did not answer: {err}") from err
    if not ready:
        raise StreamError(f"route {spec.route}: model {model} is not ready on Triton")
    return ModelTarget(
        variant=variant.model,
        model=model,
        input_name=variant.input_name,
        output_name=variant.output_name,
        features=tuple(variant.features),
        priority=config.traffic_classes[spec.traffic_class].priority,
        request_rows=1,
        device=variant.device,
    )


async def run_stream(
    config: InferlineConfig,
    spec: StreamSpec,
    triton_url: str,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
    started: asyncio.Event | None = None,
) -> StreamWorker:
    """Run a worker against a running Triton until ``stop`` is set; the worker (its counters).

    Raises:
        StreamInputError: bad options (nothing was read).
        StreamError: Triton or the route's model is not there.
    """
    route = check_spec(config, spec)
    executor = TritonExecutor(triton_url, default_max_in_flight=route.max_in_flight, tls=config.triton.tls)
    features = await asyncio.to_thread(BatchFeatures, route, config.feature_store, offline=False)
    degradation = build_degradation_service(config, executor)
    publisher = None
    if spec.tenant is not None:
        publisher = CachePublisher(config.score_cache, route.degradation, spec.tenant, spec.route)
    source = open_source(spec)
    sink = open_sink(spec)
    try:
        target = await primary_target(config, spec, executor)
        scorer = BatchScorer(
            executor, target, route.postprocess, concurrency=route.max_in_flight,
            timeout_s=spec.request_timeout_s, attempts=MODEL_ATTEMPTS,
        )  # fmt: skip
        batcher = FeatureBatcher(features, [f.name for f in route.features if f.source is None])
        budget_ms = spec.budget_for(route)
        events = EventScorer(
            spec.route, route, batcher, scorer, degradation, publisher, tenant=spec.tenant, budget_ms=budget_ms
        )
        metrics = None if registry is None else StreamMetrics(registry, spec.route)
        worker = StreamWorker(spec, route, source, sink, events, metrics)
        logger.info(
            "stream %s → %s: group %s, consumer %s, route %s, model %s",
            spec.source.stream, spec.sink.stream, spec.group, spec.consumer, spec.route, target.model,
        )  # fmt: skip
        if started is not None:
            started.set()
        await worker.run(stop)
        return worker
    finally:
        await source.close()
        await sink.close()
        await features.close()
        await degradation.close()
        if publisher is not None:
            await publisher.close()
        await executor.close()


async def run_until_signal(
    config: InferlineConfig, spec: StreamSpec, triton_url: str | None, *, metrics_port: int = 0
) -> dict[str, int]:
    """``run_stream`` until SIGINT or SIGTERM, which stop the reading and let in-flight events finish;
    ``triton_url`` None starts the bundled Triton; with ``metrics_port`` metrics are served there."""
    check_spec(config, spec)
    registry = None
    if metrics_port:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        start_http_server(metrics_port, registry=registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    launcher = None
    try:
        if triton_url is None:
            from inferline.route_check import route_models
            from inferline.triton.launcher import TritonLauncher

            launcher = TritonLauncher(config.triton, models=route_models(config))
            await asyncio.to_thread(launcher.start)
            triton_url = launcher.grpc_url
        worker = await run_stream(config, spec, triton_url, stop, registry=registry)
        return {"answered": worker.answered, "dead_letters": worker.dead_letters}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if launcher is not None:
            await asyncio.to_thread(launcher.stop)
