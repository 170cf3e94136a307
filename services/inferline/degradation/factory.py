"""``build_degradation_service``: the degradation service of a config (cache backend, light models)."""

from __future__ import annotations

import logging
import pathlib

from inferline.core.config import InferlineConfig, VariantConfig
from inferline.degradation.cache import InMemoryScoreCache, RedisScoreCache, ScoreCache
from inferline.degradation.light import LightModel, OnnxLightModel, TritonLightModel
from inferline.degradation.service import DegradationService
from inferline.triton.executor import ModelExecutor

logger = logging.getLogger(__name__)

LIGHT_PRIORITY = 1
"""Triton priority of light-model calls: a degraded answer is already due within the
fallback reserve, so it must not queue behind primary traffic on the CPU pool."""


def build_degradation_service(config: InferlineConfig, executor: ModelExecutor | None) -> DegradationService:
    """The service with the configured cache backend and each route's light model.

    Args:
        config: The whole configuration (routes, score cache, Triton model repository).
        executor: Runs light models that are not in-process; may be None when every
            route's light model is in-process or absent.

    Raises:
        ValueError: a route's light model must run on Triton but ``executor`` is None.
        FileNotFoundError: an in-process light model has no ONNX file in the repository.
    """
    ttl_s = {name: route.degradation.cache_ttl_s for name, route in config.routes.items()}
    settings = config.score_cache
    timeout_s = settings.timeout_ms / 1000
    cache: ScoreCache
    if settings.backend == "redis":
        cache = RedisScoreCache(settings.redis_url, settings.key_prefix, ttl_s, timeout_s)
    else:
        cache = InMemoryScoreCache(settings.max_entries, ttl_s)
    light_models: dict[str, LightModel] = {}
    for name, route in config.routes.items():
        if route.light is None:
            continue
        if route.degradation.light_in_process:
            path = onnx_path(config.triton.model_repository, route.light)
            light_models[name] = OnnxLightModel(path, route.light)
            logger.info("route %s: light model %s in-process from %s", name, route.light.model, path)
        elif executor is None:
            raise ValueError(f"route {name!r}: light model {route.light.model!r} runs on Triton, but no executor")
        else:
            light_models[name] = TritonLightModel(executor, route.light, LIGHT_PRIORITY)
    return DegradationService(config.routes, cache, light_models, cache_timeout_s=timeout_s)


def onnx_path(repository: pathlib.Path, variant: VariantConfig) -> pathlib.Path:
    """``<repository>/<model>/<version>/model.onnx``; no version means the highest numbered one
    (Triton's default "latest" policy).

    Raises:
        FileNotFoundError: no such file.
    """
    model_dir = repository / variant.model
    version = variant.version
    if not version:
        numbered = [p.parent.name for p in model_dir.glob("*/model.onnx") if p.parent.name.isdigit()]
        version = max(numbered, key=int) if numbered else "1"
    path = model_dir / version / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"light model {variant.model!r}: no ONNX file at {path}")
    return path
