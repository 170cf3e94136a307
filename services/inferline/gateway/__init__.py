"""The Envoy ingress in front of the router replicas: its config, rendered from ``InferlineConfig``."""

from __future__ import annotations

from inferline.gateway.render import ROUTER_CLUSTER, SHED_MESSAGE, STAT_PREFIX, TRAFFIC_CLASS_HEADER, render_envoy

__all__ = ["ROUTER_CLUSTER", "SHED_MESSAGE", "STAT_PREFIX", "TRAFFIC_CLASS_HEADER", "render_envoy"]
