"""Composition root: builds the services a process hosts and wires their clients.

``inferline up`` hosts router, features, post-processing and degradation in one process
with in-process clients; ``inferline serve <service>`` hosts one, and the router then
reaches the others over gRPC when their addresses are configured.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc

from inferline.core import tls
from inferline.core.auth import Authenticator
from inferline.core.config import InferlineConfig, TlsClientConfig
from inferline.core.grpc_server import ServiceRegistration
from inferline.core.headers import GATEWAY_HEADERS
from inferline.core.metrics import ServingMetrics, front_door_route
from inferline.core.service_auth import (
    ROUTER,
    ServiceAuthInterceptor,
    ServiceCredentials,
    ServiceTokenSigner,
    ServiceTokenVerifier,
    service_secret,
)
from inferline.core.tracing import build_tracer
from inferline.degradation.client import DegradationClient, GrpcDegradationClient, LocalDegradationClient
from inferline.degradation.factory import build_degradation_service
from inferline.degradation.service import DegradationService
from inferline.degradation.servicer import DegradationServicer
from inferline.features.client import FeatureClient, GrpcFeatureClient, LocalFeatureClient
from inferline.features.metrics import FeatureCacheCollector
from inferline.features.service import FeaturesService
from inferline.features.servicer import FeaturesServicer
from inferline.features.store import FeastOnlineStore
from inferline.internal.v1 import degradation_pb2_grpc, features_pb2_grpc, postprocess_pb2_grpc
from inferline.postprocess.client import GrpcPostprocessClient, LocalPostprocessClient, PostprocessClient
from inferline.postprocess.service import PostprocessService
from inferline.postprocess.servicer import PostprocessServicer
from inferline.route_check import CheckReport
from inferline.router.admission import AdmissionController
from inferline.router.breaker import BreakerRegistry, BreakerState
from inferline.router.gate import RequestGate
from inferline.router.gateway_trust import GatewayTrust
from inferline.router.ingress import IngressWait
from inferline.router.kserve import KServeFrontDoor, build_model_quota
from inferline.router.loop_lag import LoopLagMonitor
from inferline.router.plan import build_route_plans
from inferline.router.quota import CountingRateLimiter, build_rate_limiter
from inferline.router.recovery import RecoveryTracker
from inferline.router.route_health import RouteHealth
from inferline.router.selection import StatsRegistry
from inferline.router.service import RouterService
from inferline.router.servicer import InferenceServicer
from inferline.triton.class_copies import ClassModelMap
from inferline.triton.coalescer import CoalescingExecutor
from inferline.triton.executor import TritonExecutor
from inferline.triton.readiness import ModelReadiness
from inferline.triton.statistics import TritonStatisticsCollector
from inferline.triton.tensor_coalescer import TensorCoalescer
from inferline.v1 import inference_pb2_grpc

logger = logging.getLogger(__name__)

READY_WARM_UP_TIMEOUT_S = 10.0
"""Longest warm-up of a variant Triton has just loaded before route selection may pick it
(a failed or slow warm-up is logged, and the variant is picked anyway: it is loaded)."""

Role = Literal["router", "features", "postprocess", "degradation"]


@dataclass
class App:
    """The services of one process, their gRPC registrations, and what to start and close."""

    registrations: list[ServiceRegistration] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    starters: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    recovery: RecoveryTracker | None = None
    """Set when the process hosts the router: told when Triton is healthy again."""
    readiness: ModelReadiness | None = None
    """Set when the process hosts the router: which variants Triton has loaded."""
    triton: TritonExecutor | None = None
    """The Triton executor under the coalescer, when the process talks to Triton (KServe front door)."""
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = field(default_factory=list)
    """Server interceptors of the process's port (an internal service's service-token check)."""
    route_health: RouteHealth | None = None
    """Set when the process hosts the router: each route's ``grpc.health.v1`` status (``inferline.route.<name>``)."""
    queue_wait_s: Callable[[], float] | None = None
    """Set when the process hosts the router: its queue wait (what admission sheds by), which
    the BatchJobs service's jobs yield to."""

    async def start(self) -> None:
        """Warm-ups that must finish before the process reports SERVING."""
        for start in self.starters:
            await start()

    async def close(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                logger.exception("error while closing")


def _features(config: InferlineConfig, app: App) -> FeaturesService:
    store = FeastOnlineStore(config.feature_store.feast_repo)
    app.closers.append(store.close)
    service = FeaturesService(config.routes, store, config.feature_store)
    app.registry.register(FeatureCacheCollector(service))  # hot-cache hits and misses, store reads
    app.closers.append(service.close)  # closers run in reverse: the service before its store
    # Feast's first read in a process takes ~230 ms of lazy set-up: pay it before SERVING.
    app.starters.append(service.warm_up)
    return service


def _channel(
    address: str, app: App, tls_config: TlsClientConfig | None = None, credentials: ServiceCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to a remote service: over TLS per ``services.tls``, plain text without it;
    every call carries ``credentials`` (the router's service token)."""
    interceptors: list[Any] = [credentials] if credentials is not None else []
    channel = tls.aio_channel(address, tls_config, "services.tls", interceptors=interceptors)
    app.closers.append(lambda: channel.close(grace=None))
    return channel


def _register(app: App, name: str, add: Callable[[grpc.aio.Server], None]) -> None:
    app.registrations.append(ServiceRegistration(name, add))


def _executor(
    config: InferlineConfig, triton_url: str, app: App, route_check: CheckReport | None = None
) -> CoalescingExecutor:
    limits = {v.model: r.max_in_flight for r in config.routes.values() for v in r.full_variants}
    limits.update({m: e.max_in_flight for m, e in config.models.items() if e.max_in_flight is not None})
    bases = ClassModelMap(config.triton.class_copies).bases
    triton = TritonExecutor(triton_url, max_in_flight=limits, shares_bound_with=bases, tls=config.triton.tls)
    app.triton = triton
    executor = CoalescingExecutor(triton, config.triton.coalesce_max_concurrent, config.triton.coalesce_max_batch_rows)
    app.closers.append(executor.close)
    blocked = route_check.blocked_models() if route_check is not None else {}
    shapes = [
        (v.model, len(v.features), v.input_name, v.output_name, v.version)
        for name, r in config.routes.items()
        for v in r.all_variants
        if v.ref not in blocked.get(name, ())  # a variant that failed the check is never called
    ]
    app.starters.append(lambda: triton.warm_up(shapes))
    return executor


def build_app(
    config: InferlineConfig,
    roles: set[Role],
    triton_url: str | None = None,
    model_available: Callable[[], bool] = lambda: True,
    triton_metrics_url: str | None = None,
    route_check: CheckReport | None = None,
) -> App:
    """Build the services for ``roles``; the router needs ``triton_url``.

    ``model_available`` tells the router at once when the model server is known to be
    down (the embedded supervisor saw Triton die), so it degrades without waiting.
    ``route_check``: the start-up check; routes it found in error are NOT_SERVING and
    never call the mismatched models (they answer from their degradation path).
    """
    app = App()
    executor = (
        _executor(config, triton_url, app, route_check) if triton_url and roles & {"router", "degradation"} else None
    )
    features = _features(config, app) if "features" in roles else None
    post = PostprocessService(config.routes) if "postprocess" in roles else None
    degradation: DegradationService | None = None
    if "degradation" in roles:
        degradation = build_degradation_service(config, executor)
        app.closers.append(degradation.close)
    # With the router in the process, the others are called in-process and never served:
    # only the public services are on its port. Alone, a service is served to routers only.
    internal = "router" not in roles
    if internal:
        verifier = ServiceTokenVerifier(service_secret(config.services.secret_env))
        app.interceptors.append(ServiceAuthInterceptor(verifier))
    if features is not None and internal:
        f_servicer = FeaturesServicer(features, config.routes)
        _register(
            app,
            "inferline.internal.v1.Features",
            lambda s: features_pb2_grpc.add_FeaturesServicer_to_server(f_servicer, s),
        )
    if post is not None and internal:
        p_servicer = PostprocessServicer(post)
        _register(
            app,
            "inferline.internal.v1.Postprocess",
            lambda s: postprocess_pb2_grpc.add_PostprocessServicer_to_server(p_servicer, s),
        )
    if degradation is not None and internal:
        d_servicer = DegradationServicer(degradation, config.routes)
        _register(
            app,
            "inferline.internal.v1.Degradation",
            lambda s: degradation_pb2_grpc.add_DegradationServicer_to_server(d_servicer, s),
        )
    if "router" in roles:
        if executor is None:
            raise ValueError("the router needs a Triton URL")
        gate = _build_router(
            config, app, executor, features, post, degradation, model_available, triton_metrics_url, route_check
        )
        if config.batch_jobs.enabled:
            assert triton_url is not None
            _batch_jobs(config, app, gate, triton_url)
    return app


def _batch_jobs(config: InferlineConfig, app: App, gate: RequestGate, triton_url: str) -> None:
    """The BatchJobs service on the public port: Predict's tenants and auth, jobs run in this process."""
    from inferline.batch.service import SERVICE_NAME, BatchJobsService

    jobs = BatchJobsService(config, gate, triton_url, app.registry, online_wait_s=app.queue_wait_s)
    app.starters.append(jobs.start)  # after the Triton warm-up: jobs left running by the last process resume
    app.closers.append(jobs.close)  # closers run in reverse: the jobs stop before the clients they use
    _register(app, SERVICE_NAME, jobs.add_to_server)


def _model_readiness(config: InferlineConfig, app: App) -> Callable[[str], bool]:
    """Which full-quality variants (by ref: model, or model:version) Triton has loaded, refreshed
    in the background; a variant that becomes ready is warmed up before it is reported ready."""
    triton = app.triton
    if triton is None:
        return lambda model: True
    variants = [v for r in config.routes.values() for v in r.full_variants]
    refs = [v.ref for v in variants]
    bases = {v.model for v in variants}
    copies = [copy for copy, base in ClassModelMap(config.triton.class_copies).bases.items() if base in bases]

    async def warm_up(ref: str) -> None:
        shapes = [(v.model, len(v.features), v.input_name, v.output_name, v.version) for v in variants if v.ref == ref]
        if shapes:
            await triton.warm_up(shapes, timeout_s=READY_WARM_UP_TIMEOUT_S)
            logger.info("variant %s is ready on Triton and warmed up: route selection may pick it", ref)

    readiness = ModelReadiness(triton, refs, optional_models=copies, on_ready=warm_up)
    app.readiness = readiness
    app.starters.append(readiness.start)  # after the Triton warm-up, which was added first
    app.closers.append(readiness.stop)
    return readiness.is_ready


def _unblocked(available: Callable[[str], bool], blocked: frozenset[str], model: str) -> bool:
    return model not in blocked and available(model)


def _gate(config: InferlineConfig, app: App, metrics: ServingMetrics) -> RequestGate:
    """Auth, quotas and per-route admission (its queue-wait signal runs while the app does)."""
    lag = LoopLagMonitor()

    async def start_lag() -> None:
        lag.start()

    app.starters.append(start_lag)
    app.closers.append(lag.stop)
    ingress = IngressWait()

    def queue_wait_s() -> float:
        """Waits inside the loop (lag) or before it (gateway requests' ingress wait), whichever is longer."""
        return max(lag.queue_wait_s, ingress.recent_s)

    metrics.queue_wait.set_function(queue_wait_s)
    app.queue_wait_s = queue_wait_s
    admission = {}
    # One controller per route (Predict) and one per model (KServe front door, key "kserve:<name>",
    # the route label of its calls; configured by the model's `models` entry, else by the first
    # route using the model).
    keys = [(front_door_route(name), entry.admission) for name, entry in config.models.items()]
    keys += [
        (key, route.admission)
        for name, route in config.routes.items()
        for key in (name, *(front_door_route(v.model) for v in route.all_variants))
    ]
    for name, admission_config in keys:
        if name in admission:
            continue
        controller = AdmissionController(name, admission_config, config.traffic_classes, queue_wait_s)
        metrics.admission_limit.labels(name).set_function(functools.partial(getattr, controller, "limit"))
        metrics.admission_in_flight.labels(name).set_function(functools.partial(getattr, controller, "in_flight"))
        misses = controller.protected_misses
        metrics.admission_protected_misses.labels(name).set_function(functools.partial(getattr, misses, "value"))
        admission[name] = controller
    refused = {tenant: metrics.quota_exceeded.labels(tenant) for tenant in config.tenants}
    rate_limiter = CountingRateLimiter(build_rate_limiter(config), lambda tenant: refused[tenant].inc())
    app.closers.append(rate_limiter.close)
    untrusted = {header: metrics.untrusted_headers.labels(header) for header in GATEWAY_HEADERS}
    trust = GatewayTrust.from_environment(config.gateway.secret_env, on_untrusted=lambda h: untrusted[h].inc())
    authenticator = Authenticator(config.tenants, config.jwt)
    return RequestGate(config, authenticator, rate_limiter, admission, ingress, trust)


def _build_router(
    config: InferlineConfig,
    app: App,
    executor: CoalescingExecutor,
    features: FeaturesService | None,
    post: PostprocessService | None,
    degradation: DegradationService | None,
    model_available: Callable[[], bool],
    triton_metrics_url: str | None,
    route_check: CheckReport | None = None,
) -> RequestGate:
    services = config.services
    credentials: ServiceCredentials | None = None
    if any((services.features, services.postprocess, services.degradation)):
        secret = service_secret(services.secret_env)
        credentials = ServiceCredentials(ServiceTokenSigner(secret, ROUTER, services.token_lifetime_s))
    feature_client: FeatureClient
    if features is None and services.features:
        feature_client = GrpcFeatureClient(_channel(services.features, app, services.tls, credentials), config.routes)
    else:
        feature_client = LocalFeatureClient(features or _features(config, app))
    post_client: PostprocessClient
    if post is None and services.postprocess:
        post_client = GrpcPostprocessClient(_channel(services.postprocess, app, services.tls, credentials))
    else:
        post_client = LocalPostprocessClient(post or PostprocessService(config.routes))
    degradation_client: DegradationClient
    if degradation is None and services.degradation:
        channel = _channel(services.degradation, app, services.tls, credentials)
        degradation_client = GrpcDegradationClient(channel, config.routes)
    else:
        if degradation is None:
            degradation = build_degradation_service(config, executor)
            app.closers.append(degradation.close)
        degradation_client = LocalDegradationClient(degradation)
    app.closers.append(degradation_client.close)
    metrics = ServingMetrics(app.registry)
    metrics.declare_config(config, front_door=app.triton is not None)  # zeros, not "no data", from the start

    def on_breaker(model: str, old: BreakerState, new: BreakerState) -> None:
        metrics.breaker_open.labels(model).set(0 if new is BreakerState.CLOSED else 1)
        logger.info("circuit breaker of %s: %s -> %s", model, old.value, new.value)

    app.recovery = RecoveryTracker(lambda model, s: metrics.recovery.labels(model).observe(s), time.monotonic)
    breakers = BreakerRegistry(config.breaker, on_transition=on_breaker)
    is_ready = _model_readiness(config, app)

    def variant_available(ref: str) -> bool:
        """Route selection may pick variant ``ref``: Triton up, the model (version) loaded, its circuit not open."""
        return model_available() and is_ready(ref) and breakers.get(ref).state is not BreakerState.OPEN

    # An open circuit is a passing fault, not a reason to take the route out of a balancer.
    disabled = route_check.routes_with_errors() if route_check is not None else {}
    app.route_health = RouteHealth(config.routes, lambda model: model_available() and is_ready(model), disabled)

    class_map = ClassModelMap(config.triton.class_copies)

    def model_for_class(model: str, traffic_class: str) -> str:
        """The traffic class's copy of ``model`` (its own batching window) once Triton has it loaded."""
        copy = class_map.resolve(model, traffic_class)
        return copy if copy == model or is_ready(copy) else model

    stats = StatsRegistry()
    plans = dict(build_route_plans(config, variant_available, stats))
    for route, models in (route_check.blocked_models() if route_check is not None else {}).items():
        # A route whose variant does not match its model never calls that model.
        alone = config.model_copy(update={"routes": {route: config.routes[route]}})
        blocked = functools.partial(_unblocked, variant_available, models)
        plans.update(build_route_plans(alone, blocked, stats))
    gate = _gate(config, app, metrics)
    router = RouterService(
        feature_client, executor, post_client, degradation_client, plans,
        breakers, model_available, app.recovery, model_for_class, is_ready,
        variant_gone=app.readiness.mark_unready if app.readiness is not None else lambda ref: None,
    )  # fmt: skip
    tracer = build_tracer(config.tracing)
    if tracer is not None:
        app.closers.append(tracer.close)  # flushes the queued spans
    inference = InferenceServicer(router, config, plans, metrics, gate, tracer)
    app.registrations.insert(
        0,
        ServiceRegistration(
            "inferline.v1.Inference", lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(inference, s)
        ),
    )
    if app.triton is not None:
        if triton_metrics_url is None and config.triton.metrics_port:
            # A Triton run elsewhere: its metrics port only if configured.
            triton_host = (config.triton.url or "127.0.0.1").rpartition(":")[0] or "127.0.0.1"
            triton_metrics_url = f"http://{triton_host}:{config.triton.metrics_port}/metrics"
        statistics = TritonStatisticsCollector(app.triton, config, metrics, metrics_url=triton_metrics_url)
        app.registry.register(statistics)
        app.starters.append(statistics.start)  # after the Triton warm-up: its first snapshot is the cost baseline
        app.closers.append(statistics.stop)
        model_quota = build_model_quota(config)
        if model_quota is not None:
            app.closers.append(model_quota.close)
        forwarder = TensorCoalescer(
            app.triton,
            config.triton.coalesce_max_concurrent,
            config.triton.coalesce_max_batch_rows,
            on_merged=lambda model, n: metrics.merged_requests.labels(model).inc(n),
        )
        app.closers.append(forwarder.close)  # closers run in reverse: before the executor's
        app.starters.append(functools.partial(forwarder.learn, config.served_models))
        front_door = KServeFrontDoor(config, gate, app.triton, metrics, model_quota, forwarder)
        _register(
            app,
            "inference.GRPCInferenceService",
            lambda s: kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(front_door, s),
        )
    return gate
