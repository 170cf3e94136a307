"""Composition root: builds the services a process hosts and wires their clients.

``inferline up`` hosts router, features and post-processing in one process with
in-process clients; ``inferline serve <service>`` hosts one, and the router then
reaches the others over gRPC when their addresses are configured.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc
from prometheus_client import CollectorRegistry

from inferline.core.config import InferlineConfig
from inferline.core.grpc_server import ServiceRegistration
from inferline.core.metrics import ServingMetrics
from inferline.features.client import FeatureClient, GrpcFeatureClient, LocalFeatureClient
from inferline.features.service import FeaturesService
from inferline.features.servicer import FeaturesServicer
from inferline.features.store import FeastOnlineStore
from inferline.postprocess.client import GrpcPostprocessClient, LocalPostprocessClient, PostprocessClient
from inferline.postprocess.service import PostprocessService
from inferline.postprocess.servicer import PostprocessServicer
from inferline.router.plan import build_route_plans
from inferline.router.service import RouterService
from inferline.router.servicer import InferenceServicer
from inferline.triton.executor import TritonExecutor
from inferline.v1 import features_pb2_grpc, inference_pb2_grpc, postprocess_pb2_grpc

logger = logging.getLogger(__name__)

Role = Literal["router", "features", "postprocess"]


@dataclass
class App:
    """The services of one process, their gRPC registrations, and what to close on shutdown."""

    registrations: list[ServiceRegistration] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    starters: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

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
    app.closers.append(service.close)  # closers run in reverse: the service before its store
    # Feast's first read in a process takes ~230 ms of lazy set-up: pay it before SERVING.
    app.starters.append(service.warm_up)
    return service


def _channel(address: str, app: App) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(address)
    app.closers.append(lambda: channel.close(grace=None))
    return channel


def build_app(config: InferlineConfig, roles: set[Role], triton_url: str | None = None) -> App:
    """Build the services for ``roles``; the router needs ``triton_url``."""
    app = App()
    features: FeaturesService | None = None
    post: PostprocessService | None = None
    if "features" in roles:
        features = _features(config, app)
        servicer = FeaturesServicer(features, config.routes)
        app.registrations.append(
            ServiceRegistration(
                "inferline.v1.Features", lambda s: features_pb2_grpc.add_FeaturesServicer_to_server(servicer, s)
            )
        )
    if "postprocess" in roles:
        post = PostprocessService(config.routes)
        post_servicer = PostprocessServicer(post)
        app.registrations.append(
            ServiceRegistration(
                "inferline.v1.Postprocess",
                lambda s: postprocess_pb2_grpc.add_PostprocessServicer_to_server(post_servicer, s),
            )
        )
    if "router" in roles:
        if triton_url is None:
            raise ValueError("the router needs a Triton URL")
        feature_client: FeatureClient
        if features is not None:
            feature_client = LocalFeatureClient(features)
        elif config.services.features:
            feature_client = GrpcFeatureClient(_channel(config.services.features, app), config.routes)
        else:
            feature_client = LocalFeatureClient(_features(config, app))
        post_client: PostprocessClient
        if post is not None:
            post_client = LocalPostprocessClient(post)
        elif config.services.postprocess:
            post_client = GrpcPostprocessClient(_channel(config.services.postprocess, app))
        else:
            post_client = LocalPostprocessClient(PostprocessService(config.routes))
        executor = TritonExecutor(triton_url)
        app.closers.append(executor.close)
        models = {
            v.model: (len(v.features), v.input_name, v.output_name)
            for r in config.routes.values()
            for v in (r.primary, r.light)
            if v is not None
        }
        app.starters.append(lambda: executor.warm_up(models))
        plans = build_route_plans(config)
        router = RouterService(feature_client, executor, post_client)
        inference = InferenceServicer(router, config, plans, ServingMetrics(app.registry))
        app.registrations.insert(
            0,
            ServiceRegistration(
                "inferline.v1.Inference", lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(inference, s)
            ),
        )
    return app
