"""The degradation service: score cache, light model and safe baseline behind one client port."""

from __future__ import annotations

from inferline.degradation.baseline import Baseline
from inferline.degradation.cache import CachedScore, InMemoryScoreCache, RedisScoreCache, ScoreCache
from inferline.degradation.client import DegradationClient, GrpcDegradationClient, LocalDegradationClient
from inferline.degradation.factory import build_degradation_service
from inferline.degradation.light import LightModel, OnnxLightModel, TritonLightModel
from inferline.degradation.service import DegradationCounters, DegradationService, DegradedAnswer

__all__ = [
    "Baseline",
    "CachedScore",
    "DegradationClient",
    "DegradationCounters",
    "DegradationService",
    "DegradedAnswer",
    "GrpcDegradationClient",
    "InMemoryScoreCache",
    "LightModel",
    "LocalDegradationClient",
    "OnnxLightModel",
    "RedisScoreCache",
    "ScoreCache",
    "TritonLightModel",
    "build_degradation_service",
]
