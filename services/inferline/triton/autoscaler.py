"""``InstanceAutoscaler``: a model's Triton instance count follows its queue time, between a
warm minimum and a maximum, through Triton's model control.

Algorithm (``ScalingPolicy``, per model, on every sample of ``interval_s``):

* ``queue_ms`` = Δ queue time / Δ successful requests since the last sample (Triton's
  statistics, summed over the model's versions); no request in the interval counts as idle.
* **Up** when ``queue_ms > scale_up_queue_ms`` has held for ``scale_up_after_s`` (0: at
  once, on the first long interval): ``count + step_up`` (at most ``max_instances``), then no
  change for ``up_cooldown_s`` so the new instances show in the figures before the next decision.
* **Down** by one when ``queue_ms < scale_down_queue_ms`` (or idle) has held for
  ``scale_down_after_s`` and the last change is ``down_cooldown_s`` old, never below
  ``min_instances``.

``min_instances`` is the warm pool: those instances stay loaded and warmed up, so a step in
load meets ready capacity while more load. Scaling is asymmetric on purpose: capacity
missing costs deadlines at once, capacity idle costs only money for a while.

``TritonInstanceControl`` changes the count by loading the model with its own config and
only ``instance_group[0].count`` changed: Triton then adds or removes instances without
reloading the model, and new instances run the model's ``model_warmup`` before they take
requests (the model stays ready throughout; seen in Triton's verbose log: the new instance
runs the warm-up sample before the load call returns). A model without ``model_warmup``
would give its first requests to a cold instance: ``start`` says so in a warning, once.

Every sample re-reads each model's instance count from Triton instead of trusting the count
last set: a Triton restarted by its supervisor, or a model reloaded by hand, comes back with
the repository's count, and the next sample brings it back inside the bounds (the warm pool
is restored within one interval, not at the next scaling decision).

The configuration is the ``autoscale`` section (``inferline.core.config.AutoscalerConfig``);
``inferline up`` runs the controller when it is present, ``inferline triton autoscale`` runs
it beside a Triton of its own (a Kubernetes pod).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from inferline.core.background import BackgroundTask, every
from inferline.core.config import AutoscalerConfig, ConfigError, ModelScalingConfig, TlsClientConfig
from inferline.core.tls import tritonclient_kwargs

__all__ = [
    "AutoscalerConfig",
    "InstanceAutoscaler",
    "ModelScalingConfig",
    "OwnedAutoscaler",
    "QueueSample",
    "ScalingEvent",
    "ScalingPolicy",
    "TritonInstanceControl",
    "parse_model_bounds",
    "run_until_stopped",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


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
        self._long_since: float | None = None

    def decide(self, count: int, sample: QueueSample) -> int:
        """The instance count to have now, given the current ``count`` and the last interval."""
        now = self._clock()
        config, bounds = self._config, self._bounds
        wanted = min(max(count, bounds.min_instances), bounds.max_instances)  # back inside the bounds first
        quiet = sample.requests == 0 or sample.queue_ms < config.scale_down_queue_ms
        long = sample.requests > 0 and sample.queue_ms > config.scale_up_queue_ms
        if not quiet:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if not long:
            self._long_since = None
        elif self._long_since is None:
            self._long_since = now
        if wanted == count:
            if self._long_since is not None:
                if (
                    now - self._long_since >= config.scale_up_after_s
                    and now - self._last_change >= config.up_cooldown_s  # else: let the last change show first
                ):
                    wanted = min(count + config.step_up, bounds.max_instances)
            elif (
                self._quiet_since is not None
                and now - self._quiet_since >= config.scale_down_after_s
                and now - self._last_change >= config.down_cooldown_s
            ):
                wanted = max(count - 1, bounds.min_instances)
        if wanted != count:
            self._last_change = now
            self._quiet_since = None  # a new count must prove itself quiet (or short) again
            self._long_since = None
        return wanted


class InstanceControl(Protocol):
    async def instance_count(self, model: str) -> int: ...
    async def set_instance_count(self, model: str, count: int) -> None: ...
    async def queue_totals(self, model: str) -> tuple[int, int]: ...
    async def has_warmup(self, model: str) -> bool: ...


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

    async def has_warmup(self, model: str) -> bool:
        """Whether Triton warms the model's new instances up (a ``model_warmup`` in its config)."""
        return bool((await self._config(model)).get("model_warmup"))

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


@dataclass(frozen=True, slots=True)
class ScalingEvent:
    """One applied change: what the controller saw, and when the new count was ready."""

    model: str
    before: int
    after: int
    sample: QueueSample
    decided_s: float
    """Clock time of the decision."""
    ready_s: float
    """Clock time the load call returned: the added instances are loaded and warmed up."""


OnChange = Callable[[ScalingEvent], None]


class InstanceAutoscaler:
    """Samples every configured model, asks its ``ScalingPolicy``, and applies changes.

    ``on_change`` sees every applied change (the benchmark times capacity with it).
    """

    def __init__(
        self,
        config: AutoscalerConfig,
        control: InstanceControl,
        clock: Clock = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self._config = config
        self._control = control
        self._clock = clock
        self._on_change = on_change
        self._policies = {name: ScalingPolicy(bounds, config, clock) for name, bounds in config.models.items()}
        self._totals: dict[str, tuple[int, int]] = {}
        self._task = BackgroundTask("instance-autoscaler", every(config.interval_s, self.step, "instance autoscaler"))
        self.counts: dict[str, int] = {}
        """The count each model was last seen with or set to."""

    async def start(self) -> None:
        """Baseline the statistics and bring every model inside its bounds (loaded and warm when
        this returns, so a caller can start taking traffic after it), then sample in the background."""
        for model in self._policies:
            if not await self._control.has_warmup(model):
                logger.warning(
                    "model %s has no model_warmup in its config: instances the autoscaler adds take their "
                    "first requests cold (add a model_warmup sample to its config.pbtxt)",
                    model,
                )
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
            self.counts[model] = await self._control.instance_count(model)  # a restart resets it
            last_ns, last_requests = self._totals.get(model, (queue_ns, requests))
            self._totals[model] = (queue_ns, requests)
            delta = max(requests - last_requests, 0)  # statistics that went down: a restart, idle
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
                decided = self._clock()
                await self._control.set_instance_count(model, wanted)
                self.counts[model] = wanted
                if self._on_change is not None:
                    self._on_change(ScalingEvent(model, count, wanted, sample, decided, self._clock()))


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


class OwnedAutoscaler:
    """An ``InstanceAutoscaler`` with the Triton client it owns: what a serving process starts
    beside its other parts (``inferline up``) and stops at the end."""

    def __init__(self, autoscaler: InstanceAutoscaler, client: Any) -> None:
        self.autoscaler = autoscaler
        self._client = client

    @classmethod
    async def start(
        cls, config: AutoscalerConfig, triton_url: str, tls: TlsClientConfig | None = None
    ) -> OwnedAutoscaler:
        """Connect, bring every model to its warm pool (loaded and warmed up when this returns), and sample.

        Raises:
            ConfigError: Triton refused a model's load (not in explicit model-control mode, or
                a model it does not have), naming the ``autoscale`` key.
        """
        from tritonclient.grpc import aio as triton_aio
        from tritonclient.utils import InferenceServerException

        client = triton_aio.InferenceServerClient(triton_url, **tritonclient_kwargs(tls))
        autoscaler = InstanceAutoscaler(config, TritonInstanceControl(client))
        try:
            await autoscaler.start()
        except (InferenceServerException, ValueError) as err:
            await autoscaler.stop()
            await client.close()
            raise ConfigError(
                f"autoscale: cannot scale on the Triton at {triton_url} ({err}); it must run with "
                "--model-control-mode=explicit and have every model of autoscale.models"
            ) from err
        except BaseException:
            await autoscaler.stop()
            await client.close()
            raise
        logger.info("autoscaling %s on %s", ", ".join(f"{m}={c}" for m, c in autoscaler.counts.items()), triton_url)
        return cls(autoscaler, client)

    async def stop(self) -> None:
        await self.autoscaler.stop()
        await self._client.close()


async def run_until_stopped(
    config: AutoscalerConfig, triton_url: str, stop: asyncio.Event, tls: TlsClientConfig | None = None
) -> None:
    """Scale ``config.models`` on the Triton at ``triton_url`` until ``stop`` is set."""
    owned = await OwnedAutoscaler.start(config, triton_url, tls)
    try:
        await stop.wait()
    finally:
        await owned.stop()
