"""``InstanceAutoscaler``: a model's Triton instance count follows its queue time, between a
warm minimum and a maximum, through Triton's model control.

Algorithm (``ScalingPolicy``, per model, on every sample of ``interval_s``):

* ``queue_ms`` = Δ queue time / Δ successful requests since the last sample (Triton's
  statistics, summed over the model's versions); no request in the interval counts as idle.
* **Up** at once when ``queue_ms > scale_up_queue_ms``: ``count + step_up`` (at most
  ``max_instances``), then no change for ``up_cooldown_s`` so the new instances show in the
  figures before the next decision.
* **Down** by one when ``queue_ms < scale_down_queue_ms`` (or idle) has held for
  ``scale_down_after_s`` and the last change is ``down_cooldown_s`` old, never below
  ``min_instances``.

``min_instances`` is the warm pool: those instances stay loaded and warmed up, so a step in
load meets ready capacity while more load. Scaling is asymmetric on purpose: capacity
missing costs deadlines at once, capacity idle costs only money for a while.

``TritonInstanceControl`` changes the count by loading the model with its own config and
only ``instance_group[0].count`` changed: Triton then adds or removes instances without
reloading the model, and new instances run the model's ``model_warmup`` before they take
requests (the model stays ready throughout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferline.core.background import BackgroundTask, every

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class ModelScalingConfig(BaseModel):
    """Bounds of one model's instance count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_instances: int = Field(1, ge=1)
    """The warm pool: instances always loaded and warmed up."""
    max_instances: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> ModelScalingConfig:
        if self.max_instances < self.min_instances:
            raise ValueError(f"max_instances ({self.max_instances}) < min_instances ({self.min_instances})")
        return self


class AutoscalerConfig(BaseModel):
    """How the controller samples and decides (the same rules for every model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelScalingConfig]
    """Triton model name → its bounds."""
    interval_s: float = Field(1.0, gt=0)
    scale_up_queue_ms: float = Field(5.0, gt=0)
    scale_down_queue_ms: float = Field(1.0, ge=0)
    scale_down_after_s: float = Field(60.0, ge=0)
    """How long the queue must stay short before an instance is removed."""
    up_cooldown_s: float = Field(5.0, ge=0)
    down_cooldown_s: float = Field(60.0, ge=0)
    step_up: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _thresholds(self) -> AutoscalerConfig:
        if self.scale_down_queue_ms >= self.scale_up_queue_ms:
            raise ValueError("scale_down_queue_ms must be below scale_up_queue_ms (else the count oscillates)")
        return self


@dataclass(frozen=True, slots=True)
class QueueSample:
    """Queue time and request count of one model since the previous sample."""

    queue_ms: float
    requests: int


class ScalingPolicy:
    """The decision of the module docstring for one model; pure but for its clock."""

    def __init__(self, bounds: ModelScalingConfig, config: AutoscalerConfig, clock: Clock = time.monotonic) -> None:
        self._bounds = bounds
        self._config = config
        self._clock = clock
        self._last_change = -float("inf")
        self._quiet_since: float | None = None

    def decide(self, count: int, sample: QueueSample) -> int:
        """The instance count to have now, given the current ``count`` and the last interval."""
        now = self._clock()
        config, bounds = self._config, self._bounds
        wanted = min(max(count, bounds.min_instances), bounds.max_instances)  # back inside the bounds first
        quiet = sample.requests == 0 or sample.queue_ms < config.scale_down_queue_ms
        if not quiet:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if wanted == count:
            if sample.requests and sample.queue_ms > config.scale_up_queue_ms:
                if now - self._last_change >= config.up_cooldown_s:  # else: let the last change show first
                    wanted = min(count + config.step_up, bounds.max_instances)
            elif (
                self._quiet_since is not None
                and now - self._quiet_since >= config.scale_down_after_s
                and now - self._last_change >= config.down_cooldown_s
            ):
                wanted = max(count - 1, bounds.min_instances)
        if wanted != count:
            self._last_change = now
            self._quiet_since = None  # a new count must prove itself quiet again
        return wanted


class InstanceControl(Protocol):
    async def instance_count(self, model: str) -> int: ...
    async def set_instance_count(self, model: str, count: int) -> None: ...
    async def queue_totals(self, model: str) -> tuple[int, int]: ...


class TritonInstanceControl:
    """Triton's model control and statistics through ``tritonclient.grpc.aio``."""

    def __init__(self, client: Any, *, timeout_s: float = 300.0) -> None:
        self._client = client
        self._timeout_s = timeout_s

    async def _config(self, model: str) -> dict[str, Any]:
        reply = await self._client.get_model_config(model, as_json=True, client_timeout=30.0)
        config: dict[str, Any] = reply["config"]
        groups = config.get("instance_group", [])
        if len(groups) != 1:
            raise ValueError(f"model {model!r} has {len(groups)} instance groups; the autoscaler scales exactly one")
        return config

    async def instance_count(self, model: str) -> int:
        return int((await self._config(model))["instance_group"][0].get("count", 1))

    async def set_instance_count(self, model: str, count: int) -> None:
        """Load ``model`` with its config and only its instance count changed; returns when loaded (warm)."""
        config = await self._config(model)
        config["instance_group"][0]["count"] = count
        await self._client.load_model(model, config=json.dumps(config), client_timeout=self._timeout_s)

    async def queue_totals(self, model: str) -> tuple[int, int]:
        """(cumulative queue ns, cumulative successful requests) over the model's versions."""
        reply = await self._client.get_inference_statistics(model_name=model, client_timeout=30.0)
        stats = [s.inference_stats for s in reply.model_stats]
        return sum(s.queue.ns for s in stats), sum(s.success.count for s in stats)


class InstanceAutoscaler:
    """Samples every configured model, asks its ``ScalingPolicy``, and applies changes."""

    def __init__(self, config: AutoscalerConfig, control: InstanceControl, clock: Clock = time.monotonic) -> None:
        self._config = config
        self._control = control
        self._policies = {name: ScalingPolicy(bounds, config, clock) for name, bounds in config.models.items()}
        self._totals: dict[str, tuple[int, int]] = {}
        self._task = BackgroundTask("instance-autoscaler", every(config.interval_s, self.step, "instance autoscaler"))
        self.counts: dict[str, int] = {}
        """The count each model was last seen with or set to."""

    async def start(self) -> None:
        """Baseline the statistics and bring every model inside its bounds, then sample in the background."""
        for model in self._policies:
            self._totals[model] = await self._control.queue_totals(model)
            self.counts[model] = await self._control.instance_count(model)
        await self._apply({m: QueueSample(0.0, 0) for m in self._policies}, initial=True)
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def step(self) -> Mapping[str, int]:
        """One sample of every model and the changes it calls for; the counts after it."""
        samples = {}
        for model in self._policies:
            queue_ns, requests = await self._control.queue_totals(model)
            last_ns, last_requests = self._totals.get(model, (queue_ns, requests))
            self._totals[model] = (queue_ns, requests)
            delta = max(requests - last_requests, 0)
            samples[model] = QueueSample((queue_ns - last_ns) / delta / 1e6 if delta else 0.0, delta)
        await self._apply(samples)
        return dict(self.counts)

    async def _apply(self, samples: Mapping[str, QueueSample], *, initial: bool = False) -> None:
        for model, sample in samples.items():
            count = self.counts[model]
            bounds = self._config.models[model]
            wanted = (
                min(max(count, bounds.min_instances), bounds.max_instances)
                if initial
                else self._policies[model].decide(count, sample)
            )
            if wanted != count:
                logger.info(
                    "model %s: %d -> %d instances (queue %.2f ms over %d requests)",
                    model,
                    count,
                    wanted,
                    sample.queue_ms,
                    sample.requests,
                )
                await self._control.set_instance_count(model, wanted)
                self.counts[model] = wanted


def parse_model_bounds(spec: str) -> tuple[str, ModelScalingConfig]:
    """``NAME=MIN:MAX`` (e.g. ``driver_ranker=2:8``) → (name, bounds).

    Raises:
        ValueError: naming what is wrong with ``spec``.
    """
    name, sep, bounds = spec.partition("=")
    low, colon, high = bounds.partition(":")
    if not sep or not colon or not name or not low.isdigit() or not high.isdigit():
        raise ValueError(f"--model must look like NAME=MIN:MAX (e.g. driver_ranker=2:8), got {spec!r}")
    return name, ModelScalingConfig(min_instances=int(low), max_instances=int(high))


async def run_until_stopped(config: AutoscalerConfig, triton_url: str, stop: asyncio.Event) -> None:
    """Scale ``config.models`` on the Triton at ``triton_url`` until ``stop`` is set."""
    from tritonclient.grpc import aio as triton_aio

    client = triton_aio.InferenceServerClient(triton_url)
    autoscaler = InstanceAutoscaler(config, TritonInstanceControl(client))
    try:
        await autoscaler.start()
        logger.info("autoscaling %s on %s", ", ".join(f"{m}={c}" for m, c in autoscaler.counts.items()), triton_url)
        await stop.wait()
    finally:
        await autoscaler.stop()
        await client.close()
