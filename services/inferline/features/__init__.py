"""The features service: Feast online store, hot-entity cache, defaults and request-time features."""

from __future__ import annotations

from inferline.features.client import FeatureClient, GrpcFeatureClient, LocalFeatureClient
from inferline.features.hot_cache import HotCache
from inferline.features.service import FeaturesService
from inferline.features.store import FeastOnlineStore, OnlineStore
from inferline.features.vector import EntityId, FeatureVector

__all__ = [
    "EntityId",
    "FeastOnlineStore",
    "FeatureClient",
    "FeatureVector",
    "FeaturesService",
    "GrpcFeatureClient",
    "HotCache",
    "LocalFeatureClient",
    "OnlineStore",
]
