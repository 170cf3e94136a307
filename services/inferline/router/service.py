"""``RouterService``: one Predict request through features → model → post-processing,
answered from the degradation path whenever the main path cannot answer in time.

Transport-agnostic: the servicer translates protobuf to a ``PredictCall`` and back; the
other services are reached through their client ports (in-process or gRPC).

Budget (README, "Deadlines and degradation"): each layer gets ``min(its budget, time left −
what the later layers reserve)``; the fallback reserve is never spent by the main path,
so a degraded answer can still leave before the deadline. Every failure of the main path
(feature store, Triton, invalid output, open circuit, in-flight bound) ends in a
degraded answer, never in an error the caller sees.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from inferline.core.budget import layer_deadline
from inferline.core.config import CanaryConfig, VariantConfig
from inferline.core.deadline import Deadline
from inferline.core.entities import EntityId
from inferline.core.errors import DeadlineUnaffordable, DependencyUnavailable, InferlineError, ModelOutputInvalid
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation.baseline import Baseline
from inferline.degradation.client import DegradationClient
from inferline.degradation.service import DegradedAnswer
from inferline.features.client import FeatureClient
from inferline.features.vector import FeatureVector
from inferline.postprocess.client import PostprocessClient
from inferline.postprocess.service import PostprocessService, RankedScore
from inferline.router.breaker import BreakerRegistry, CircuitBreaker
from inferline.router.plan import IDLE_MODEL_NEED_S, RoutePlan
from inferline.router.recovery import RecoveryTracker
from inferline.router.selection import Choice, VariantStats
from inferline.triton.executor import InferResult, ModelCallFailed, ModelExecutor, ModelNotLoaded

logger = logging.getLogger(__name__)

# A model call needs at least this long to be worth starting.
MIN_MODEL_BUDGET_S = IDLE_MODEL_NEED_S


@dataclass(frozen=True, slots=True)
class PredictCall:
    """A validated, authenticated request, ready to run."""

    tenant: str
    route: RoutePlan
    ids: list[EntityId]
    request_features: Mapping[str, float]
    traffic_class: str
    priority: int
    top_k: int
    request_id: str
    pin: str | None = None
    """The variant the tenant pinned for this route, if any."""
    canary: CanaryConfig | None = None
    prefer_cheapest: bool = False
    """The traffic class asks for the cheapest variant that fits (batch)."""


@dataclass(slots=True)
class LayerTimes:
    routing_ms: float = 0.0
    features_ms: float = 0.0
    model_ms: float = 0.0
    post_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(slots=True)
class PredictOutcome:
    ranked: list[RankedScore]
    served_by: ServedBy
    model_name: str
    model_version: str
    defaulted: list[list[str]]
    """Per entity (request order): names of features that were defaulted."""
    features_degraded: bool
    reason: Reason | None = None
    cache_age_ms: float = 0.0
    timings: LayerTimes = field(default_factory=LayerTimes)


class _Degrade(Exception):
    """Internal: the main path gave up; carries why and what it had."""

    def __init__(self, reason: Reason, vector: FeatureVector | None) -> None:
        self.reason = reason
        self.vector = vector


class RouterService:
    """Runs the main path of a request under its deadline, and degrades when it must."""

    def __init__(
        self,
        features: FeatureClient,
        executor: ModelExecutor,
        postprocess: PostprocessClient,
        degradation: DegradationClient,
        routes: Mapping[str, RoutePlan],
        breakers: BreakerRegistry,
        model_available: Callable[[], bool] = lambda: True,
        recovery: RecoveryTracker | None = None,
        model_for_class: Callable[[str, str], str] = lambda model, traffic_class: model,
        model_ready: Callable[[str], bool] = lambda model: True,
        variant_gone: Callable[[str], None] = lambda ref: None,
    ) -> None:
        """``variant_gone(ref)``: Triton answered a call of that variant that its model
        (version) is not loaded; route selection should leave it out from now on."""
        self._model_for_class = model_for_class
        self._model_ready = model_ready
        self._variant_gone = variant_gone
        self._recovery = recovery
        self._features = features
        self._executor = executor
        self._postprocess = postprocess
        self._degradation = degradation
        self._breakers = breakers
        self._model_available = model_available
        # Last resorts that need no dependency at all: a local baseline and post-processing.
        self._baselines = {n: Baseline(p.config.degradation.baseline, [f.name for f in p.config.features])
                           for n, p in routes.items()}  # fmt: skip
        self._local_post = PostprocessService({n: p.config for n, p in routes.items()})

    async def predict(
        self, call: PredictCall, deadline: Deadline, started_at: float, *, overloaded: bool = False
    ) -> PredictOutcome:
        """Answer ``call`` before ``deadline``: from the primary path, or degraded.

        ``started_at`` is the ``time.perf_counter()`` at which the request arrived, so the
        routing layer's time (auth, validation) is included in the timings.
        ``overloaded``: admission found the route over its limit for a class that may not
        be shed; the request gets its features (the light model needs them) and then a
        degraded answer (OVERLOAD), without touching the primary model.

        Raises:
            DeadlineUnaffordable: less than the fallback reserve was left on arrival.
        """
        plan = call.route
        if deadline.remaining_s() < plan.fallback_reserve_s:
            raise DeadlineUnaffordable(
                f"{deadline.remaining_s() * 1000:.1f} ms left on arrival, below the "
                f"{plan.fallback_reserve_s * 1000:.1f} ms needed even for a degraded answer"
            )
        times = LayerTimes()
        t0 = time.perf_counter()
        times.routing_ms = (t0 - started_at) * 1000
        try:
            return await self._primary(call, deadline, times, t0, started_at, overloaded)
        except _Degrade as degrade:
            return await self._degraded(call, deadline, degrade.reason, degrade.vector, times, started_at)

    async def _primary(
        self, call: PredictCall, deadline: Deadline, times: LayerTimes, t0: float, started_at: float, overloaded: bool
    ) -> PredictOutcome:
        plan = call.route
        reserve_after_model = plan.post_budget_s + plan.fallback_reserve_s
        vector = await self._fetch_features(call, plan.features_deadline(deadline))
        t1 = time.perf_counter()
        times.features_ms = (t1 - t0) * 1000
        if vector.degraded:
            raise _Degrade(Reason.FEATURES_DEGRADED, vector)
        if overloaded:
            raise _Degrade(Reason.OVERLOAD, vector)
        if not self._model_available():
            raise _Degrade(Reason.MODEL_UNAVAILABLE, vector)
        model_deadline = layer_deadline(deadline, plan.model_budget_s, reserve_after_model)
        choice = plan.selector.select(
            tenant_pin=call.pin,
            canary=call.canary,
            request_key=zlib.crc32(call.request_id.encode()),
            budget_s=model_deadline.remaining_s(),
            prefer_cheapest=call.prefer_cheapest,
        )
        if choice is None:  # no variant may be called: each is not loaded or its circuit is open
            loaded = any(self._model_ready(v.ref) for v in plan.config.full_variants)
            raise _Degrade(Reason.CIRCUIT_OPEN if loaded else Reason.MODEL_UNAVAILABLE, vector)
        variant = choice.variant
        breaker = self._breakers.get(variant.ref)
        if not breaker.allow():
            raise _Degrade(Reason.CIRCUIT_OPEN, vector)
        if model_deadline.remaining_s() < MIN_MODEL_BUDGET_S:
            breaker.record_ignored()
            raise _Degrade(Reason.DEADLINE, vector)
        try:
            try:
                result = await self._infer(call, variant, choice.stats, vector, model_deadline, t1)
            except ModelNotLoaded:
                failover = self._failover(call, variant, model_deadline)
                if failover is None:
                    raise
                choice, breaker = failover
                variant = choice.variant
                result = await self._infer(call, variant, choice.stats, vector, model_deadline, t1)
            t2 = time.perf_counter()
            times.model_ms = (t2 - t1) * 1000
            ranked = await self._postprocess.process(
                plan.name,
                result.scores,
                len(call.ids),
                call.top_k,
                deadline=layer_deadline(deadline, plan.post_budget_s, plan.fallback_reserve_s),
            )
        except ModelCallFailed as err:
            if err.degradation_reason is Reason.OVERLOAD:
                breaker.record_ignored()  # shed before reaching the model: says nothing of its health
            else:
                breaker.record_failure("timeout" if err.is_timeout else "error")
            times.model_ms = (time.perf_counter() - t1) * 1000
            raise _Degrade(err.degradation_reason, vector) from err
        except ModelOutputInvalid as err:
            breaker.record_failure("error")
            raise _Degrade(Reason.INVALID_OUTPUT, vector) from err
        except DependencyUnavailable as err:  # a remote post-processing service failed
            raise _Degrade(Reason.MODEL_ERROR, vector) from err
        breaker.record_success()
        if self._recovery is not None:
            self._recovery.primary_answered(variant.model)
        t3 = time.perf_counter()
        times.post_ms = (t3 - t2) * 1000
        times.total_ms = (t3 - started_at) * 1000
        self._degradation.record(call.tenant, plan.name, call.ids, result.scores)
        return PredictOutcome(
            ranked=ranked,
            served_by=ServedBy.PRIMARY,
            model_name=result.model_name,
            model_version=result.model_version,
            defaulted=[vector.defaulted_names(i) for i in range(len(call.ids))],
            features_degraded=False,
            timings=times,
        )

    def _failover(
        self, call: PredictCall, gone: VariantConfig, deadline: Deadline
    ) -> tuple[Choice, CircuitBreaker] | None:
        """Triton says ``gone``'s model (version) is not loaded: it was unloaded since readiness
        last asked (a version ``inferline models load`` dropped). Take it out of selection now
        and choose once more within the same budget; None when nothing else may be called."""
        if not gone.version and self._model_for_class(gone.model, call.traffic_class) != gone.model:
            return None  # what is gone is the traffic class's copy, not the variant's model
        self._variant_gone(gone.ref)
        if deadline.remaining_s() < MIN_MODEL_BUDGET_S:
            return None
        choice = call.route.selector.select(
            tenant_pin=call.pin,
            canary=call.canary,
            request_key=zlib.crc32(call.request_id.encode()),
            budget_s=deadline.remaining_s(),
            prefer_cheapest=call.prefer_cheapest,
        )
        if choice is None or choice.variant.ref == gone.ref:
            return None
        breaker = self._breakers.get(choice.variant.ref)
        if not breaker.allow():
            return None
        self._breakers.get(gone.ref).record_failure("error")
        return choice, breaker

    async def _infer(
        self,
        call: PredictCall,
        variant: VariantConfig,
        stats: VariantStats,
        vector: FeatureVector,
        deadline: Deadline,
        started: float,
    ) -> InferResult:
        """Run the chosen variant (its traffic class's copy, if it has one), keeping its latency statistics.

        A variant pinned to a version calls that version of the model itself: a class copy
        keeps the versions of its own version_policy, not necessarily the pinned one."""
        model = self._model_for_class(variant.model, call.traffic_class) if not variant.version else variant.model
        stats.started()
        try:
            result = await self._executor.infer(
                model,
                vector.select(variant.features).values,
                deadline=deadline,
                priority=call.priority,
                input_name=variant.input_name,
                output_name=variant.output_name,
                version=variant.version,
            )
        except ModelCallFailed as err:
            # A timed-out call's elapsed time is a lower bound of the variant's latency: keep
            # it, or a variant that slowed down would keep its old, fast average.
            stats.finished(time.perf_counter() - started if err.is_timeout else None)
            raise
        except BaseException:
            stats.finished(None)
            raise
        stats.finished(time.perf_counter() - started)
        return result

    async def _fetch_features(self, call: PredictCall, deadline: Deadline) -> FeatureVector:
        try:
            return await self._features.get(call.route.name, call.ids, call.request_features, deadline=deadline)
        except InferlineError as err:
            if err.code.name == "INVALID_ARGUMENT":
                raise  # the caller's mistake, reported as such
            raise _Degrade(Reason.FEATURES_DEGRADED, None) from err

    async def _degraded(
        self,
        call: PredictCall,
        deadline: Deadline,
        reason: Reason,
        vector: FeatureVector | None,
        times: LayerTimes,
        started_at: float,
    ) -> PredictOutcome:
        plan = call.route
        try:
            answer = await self._degradation.degrade(
                call.tenant, plan.name, call.ids, vector, reason, deadline=deadline
            )
        except InferlineError:
            logger.debug("degradation service failed; answering from the local baseline", exc_info=True)
            scores = self._baselines[plan.name].scores(vector, len(call.ids))
            answer = DegradedAnswer(scores, ServedBy.BASELINE, "", 0.0)
        t = time.perf_counter()
        ranked = self._rank(plan, answer.scores, call)
        times.post_ms += (time.perf_counter() - t) * 1000
        times.total_ms = (time.perf_counter() - started_at) * 1000
        defaulted = [vector.defaulted_names(i) for i in range(len(call.ids))] if vector is not None else []
        return PredictOutcome(
            ranked=ranked,
            served_by=answer.served_by,
            model_name=answer.model_name,
            model_version="",
            defaulted=defaulted or [[] for _ in call.ids],
            features_degraded=vector is None or vector.degraded,
            reason=reason,
            cache_age_ms=answer.cache_age_ms,
            timings=times,
        )

    def _rank(self, plan: RoutePlan, scores: np.ndarray, call: PredictCall) -> list[RankedScore]:
        """Post-process degraded scores in-process: no remote hop on the fallback path."""
        try:
            return self._local_post.process(plan.name, scores, len(call.ids), call.top_k)
        except ModelOutputInvalid:
            baseline = self._baselines[plan.name].scores(None, len(call.ids))
            return self._local_post.process(plan.name, baseline, len(call.ids), call.top_k)
