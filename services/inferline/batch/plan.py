"""Everything checked before a job does any work: options against the config, the input, the output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inferline.batch.errors import BatchInputError, BatchJobFailed
from inferline.batch.scoring import ModelTarget
from inferline.batch.source import InputFile
from inferline.batch.spec import BatchJobSpec
from inferline.batch.variant_choice import Candidate, measure_rate
from inferline.core.config import InferlineConfig, RouteConfig
from inferline.core.errors import DependencyUnavailable
from inferline.triton.class_copies import ClassModelMap
from inferline.triton.executor import TritonExecutor


@dataclass(frozen=True)
class JobPlan:
    spec: BatchJobSpec
    route: RouteConfig
    input: InputFile
    offline: bool
    """Point-in-time features from Feast's offline store (else the online store)."""

    def identity(self) -> dict[str, Any]:
        """What a resumed run must agree on (written to the job's state)."""
        spec = self.spec
        return {
            "route": spec.route,
            "input": str(self.input.path.resolve()),
            "input_fingerprint": self.input.fingerprint(),
            "chunk_rows": spec.chunk_rows,
            "shard": f"{spec.shard.index}/{spec.shard.count}",
            "timestamp_column": self.input.columns.timestamp,
            "features": "offline" if self.offline else "online",
            "traffic_class": spec.traffic_class,
        }


def plan_job(config: InferlineConfig, spec: BatchJobSpec) -> JobPlan:
    """Check ``spec`` against ``config`` and open the input.

    Raises:
        BatchInputError: naming the option, route, tenant or column at fault.
    """
    route = config.routes.get(spec.route)
    if route is None:
        raise BatchInputError(f"--route {spec.route!r}: no such route (routes: {', '.join(config.routes)})")
    if spec.traffic_class not in config.traffic_classes:
        raise BatchInputError(f"--class {spec.traffic_class!r}: no such traffic class")
    if spec.publish_cache:
        _check_publish(config, spec)
    detect = spec.features_from != "online"
    source = InputFile.open(spec.input_path, route, spec.timestamp_column, detect_timestamp=detect)
    has_ts = source.columns.timestamp is not None
    if spec.features_from == "offline" and not has_ts:
        raise BatchInputError(
            f"--features offline needs event times: input {spec.input_path} has no 'event_timestamp' column "
            "(name another with --timestamp-column)"
        )
    offline = spec.features_from == "offline" or (spec.features_from == "auto" and has_ts)
    if offline and spec.publish_cache:
        raise BatchInputError(
            "--publish-cache with point-in-time features: scores of past feature values are not current scores; "
            "run with --features online to publish"
        )
    return JobPlan(spec, route, source, offline)


def _check_publish(config: InferlineConfig, spec: BatchJobSpec) -> None:
    tenant = config.tenants.get(spec.tenant or "")
    if tenant is None:
        raise BatchInputError(f"--tenant {spec.tenant!r}: no such tenant")
    if spec.route not in tenant.routes:
        raise BatchInputError(f"--tenant {spec.tenant!r} may not call route {spec.route!r}")
    if config.score_cache.backend != "redis":
        raise BatchInputError(
            "--publish-cache needs score_cache.backend: redis (the in-memory cache lives inside a router process)"
        )


class JobVariants:
    """A job's view of its route's full-quality variants: which Triton has ready now (each
    through its copy for the job's class, if any) and how fast one scores for the job."""

    def __init__(self, config: InferlineConfig, plan: JobPlan, executor: TritonExecutor) -> None:
        self._config = config
        self._plan = plan
        self._executor = executor
        self._defaults = {f.name: f.default for f in plan.route.features}

    async def ready(self, *, first_only: bool = False) -> list[Candidate]:
        """The ready variants, cheapest first (``first_only``: stop at the first).

        Raises:
            BatchJobFailed: Triton does not answer, or no variant of the route is ready.
        """
        config, spec, route = self._config, self._plan.spec, self._plan.route
        priority = config.traffic_classes[spec.traffic_class].priority
        copies = ClassModelMap(config.triton.class_copies)
        candidates: list[Candidate] = []
        tried = []
        by_cost = sorted(route.full_variants, key=lambda v: config.device_classes[v.device].cost_per_hour)
        for variant in by_cost:
            model = copies.resolve(variant.model, spec.traffic_class)
            try:
                if not await self._executor.model_ready(model):
                    tried.append(model)
                    continue
                max_batch = int((await self._executor.model_config(model)).config.max_batch_size)
            except DependencyUnavailable as err:
                raise BatchJobFailed(f"Triton did not answer: {err}") from err
            request_rows = spec.request_rows or max(max_batch, 1)
            if max_batch > 0:
                request_rows = min(request_rows, max_batch)
            target = ModelTarget(
                variant=variant.model,
                model=model,
                input_name=variant.input_name,
                output_name=variant.output_name,
                features=tuple(variant.features),
                priority=priority,
                request_rows=request_rows,
                device=variant.device,
            )
            candidates.append(Candidate(target, config.device_classes[variant.device].cost_per_hour))
            if first_only:
                break  # the cheapest is all that is needed: stop asking Triton about the rest
        if not candidates:
            raise BatchJobFailed(f"route {spec.route}: no variant ready on Triton (tried {', '.join(tried)})")
        return candidates

    async def measure(self, target: ModelTarget) -> float:
        """Rows/s ``target`` scores at now for the job (``measure_rate``, the job's concurrency)."""
        row = np.array([self._defaults[name] for name in target.features], dtype=np.float32)
        return await measure_rate(self._executor, target, row, self._plan.spec.concurrency)
