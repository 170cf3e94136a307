"""``DegradationService``: an answer when the primary path cannot give one, and the cache behind it.

Transport-agnostic: the gRPC servicer and ``LocalDegradationClient`` both call it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from inferline.core.config import RouteConfig
from inferline.core.deadline import Clock, Deadline
from inferline.core.entities import EntityId, check_entity_ids
from inferline.core.errors import InvalidInput, ModelOutputInvalid, RouteNotFound
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation.baseline import Baseline
from inferline.degradation.cache import CachedScore, ScoreCache, WriteBehind
from inferline.degradation.light import LightModel
from inferline.features.vector import FeatureVector

logger = logging.getLogger(__name__)

_LIGHT_FIRST = frozenset({Reason.FEATURES_DEGRADED, Reason.OVERLOAD})
"""Reasons for which the light model is tried before the cache (see ``DegradationService``)."""

LIGHT_HEADROOM = 1.5
"""The light model is tried only if ``predicted latency × LIGHT_HEADROOM + LIGHT_MARGIN_S`` fits."""
LIGHT_MARGIN_S = 0.0005
"""Kept back from the light model's deadline for composing the answer (and the cache after it)."""
DEFAULT_CACHE_TIMEOUT_S = 0.005
DEFAULT_MAX_PENDING_WRITES = 1000
WRITE_TIMEOUT_S = 1.0
"""Bound of one background write, so a hung cache cannot hold a pending slot for long."""
CLOSE_GRACE_S = 1.0
"""How long ``close`` waits for pending writes before cancelling them."""
OUTAGE_AFTER_FAILURES = 3
"""Light-model failures in a row that are logged as an outage (each one is counted)."""


@dataclass(frozen=True, slots=True)
class DegradedAnswer:
    """Scores ``[N]`` (request order), who produced them, and the oldest cached score's age."""

    scores: npt.NDArray[np.float32]
    served_by: ServedBy
    model_name: str
    """The light model's name when ``served_by`` is LIGHT, else empty."""
    cache_age_ms: float
    """Age of the oldest cached score used; 0 when none was used."""


@dataclass(slots=True)
class DegradationCounters:
    """Plain counters until metrics are wired (degradations are counted, not logged)."""

    cache_read_errors: int = 0
    """Cache lookups that raised or ran out of time (served as all-miss)."""
    cache_write_errors: int = 0
    """Background writes that raised or ran out of time."""
    writes_dropped: int = 0
    """``record`` calls dropped because ``max_pending_writes`` writes were in flight."""
    light_errors: int = 0
    """Light-model calls that failed, ran out of time or returned invalid scores."""
    light_skipped: int = 0
    """Light model not tried: its predicted latency did not fit the time left."""


class _RoutePlan:
    """What ``degrade`` needs about one route, derived once from its config."""

    def __init__(self, name: str, route: RouteConfig, light: LightModel | None) -> None:
        self.name = name
        self.route = route
        self.max_staleness_s = route.degradation.max_staleness_s
        self.baseline = Baseline(route.degradation.baseline, [f.name for f in route.features])
        self.light = light
        self.light_features = tuple(route.light.features) if route.light is not None else ()
        self.score_min, self.score_max = route.postprocess.score_min, route.postprocess.score_max


class DegradationService:
    """Answers from the score cache, the light model or the safe baseline; never fails on a dependency.

    Policy of ``degrade`` (README, "Deadlines and degradation"):

    1. Cache: every entity has a cached score no older than ``max_staleness_s`` → CACHE.
       The lookup is bounded by ``min(cache_timeout_s, time left)``; failure = all-miss.
    2. Light model, when the route has one, features are given and hold its columns, and
       ``predicted_latency × 1.5 + 0.5 ms`` fits the time left → LIGHT. Failure, timeout
       or invalid output (wrong size, non-finite, outside the route's score range)
       falls through. With reason FEATURES_DEGRADED or OVERLOAD steps 1 and 2 swap: the
       light model is preferred over possibly older cached answers — on its reduced
       feature set, or because the main path is merely busy and the light model is the
       route's cheaper way to a fresh, model-based answer.
    3. Per entity: its fresh cached score, else the baseline → BASELINE when any baseline
       score was used, else CACHE. The baseline needs nothing, so an answer always comes.

    ``record`` writes good answers through to the cache off the critical path: one
    background task per call, at most ``max_pending_writes`` in flight (more are dropped
    and counted), each bounded and observed so no exception goes unretrieved.
    """

    def __init__(
        self,
        routes: Mapping[str, RouteConfig],
        cache: ScoreCache,
        light_models: Mapping[str, LightModel],
        clock: Clock = time.monotonic,
        *,
        cache_timeout_s: float = DEFAULT_CACHE_TIMEOUT_S,
        max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
    ) -> None:
        """
        Args:
            routes: Route configs by name.
            cache: The score cache; the service closes it in ``close``.
            light_models: Light model by route name; routes without one skip step 2.
            clock: Monotonic clock (how long a light-model outage lasted, in the log).
            cache_timeout_s: Longest wait for a cache lookup.
            max_pending_writes: Background writes in flight at most.

        Raises:
            ValueError: a light model is given for a route unknown or without ``light``.
        """
        for name in light_models:
            if name not in routes or routes[name].light is None:
                raise ValueError(f"light model given for route {name!r}, which has no light variant")
        self._plans = {name: _RoutePlan(name, route, light_models.get(name)) for name, route in routes.items()}
        self._cache = cache
        self._clock = clock
        self._cache_timeout_s = cache_timeout_s
        self._writes = WriteBehind(cache, max_pending_writes, WRITE_TIMEOUT_S)
        self._light_failures: dict[str, tuple[int, float]] = {}  # route → (failures in a row, since)
        self._counters = DegradationCounters()

    @property
    def counters(self) -> DegradationCounters:
        """A snapshot of the counters."""
        return replace(self._counters, writes_dropped=self._writes.dropped, cache_write_errors=self._writes.errors)

    @property
    def pending_writes(self) -> int:
        return self._writes.pending

    async def degrade(
        self,
        tenant: str,
        route: str,
        ids: Sequence[EntityId],
        features: FeatureVector | None,
        reason: Reason,
        *,
        deadline: Deadline,
    ) -> DegradedAnswer:
        """The best answer the cache, the light model or the baseline can give in time.

        Args:
            tenant: Namespace of cached answers.
            route: Route name.
            ids: Entity keys, in request order.
            features: The entities' feature matrix the caller holds (rows = ids), or None.
            reason: Why the primary path was abandoned; FEATURES_DEGRADED and OVERLOAD prefer the light model.
            deadline: The caller's deadline; steps that cannot fit are skipped.

        Raises:
            RouteNotFound: unknown route.
            InvalidInput: no ids, more than ``max_entities``, a key of the wrong type, or
                feature rows ≠ ids.
        """
        plan = self._plan(route)
        n = len(ids)
        check_entity_ids(plan.route, ids)
        if features is not None and features.rows != n:
            raise InvalidInput("features", f"{features.rows} feature rows for {n} entities")
        cached: list[CachedScore | None] | None = None
        if reason not in _LIGHT_FIRST:
            cached = await self._lookup(tenant, plan, ids, deadline)
            if all(c is not None for c in cached):
                return self._compose(plan, cached, features, n)
        answer = await self._light(plan, features, n, deadline)
        if answer is not None:
            return answer
        if cached is None:  # the cache comes after the light model
            cached = await self._lookup(tenant, plan, ids, deadline)
        return self._compose(plan, cached, features, n)

    def record(self, tenant: str, route: str, ids: Sequence[EntityId], scores: Sequence[float] | np.ndarray) -> None:
        """Write a good primary answer through to the cache, in the background (never blocks).

        Must be called from a coroutine (a running loop). Dropped and counted when
        ``max_pending_writes`` writes are already in flight or the service is closed.

        Raises:
            RouteNotFound: unknown route.
            InvalidInput: bad ids (as in ``degrade``), ``scores`` and ``ids`` differ in
                length, or a score is not finite.
        """
        check_entity_ids(self._plan(route).route, ids)
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(ids):
            raise InvalidInput("scores", f"{values.shape[0]} scores for {len(ids)} entities")
        if not np.isfinite(values).all():
            raise InvalidInput("scores", "scores must be finite")
        self._writes.submit(tenant, route, list(ids), values.tolist())

    async def close(self) -> None:
        """Let pending writes finish (``CLOSE_GRACE_S`` at most), cancel the rest, close the cache."""
        await self._writes.close(CLOSE_GRACE_S)
        await self._cache.close()

    def _plan(self, route: str) -> _RoutePlan:
        plan = self._plans.get(route)
        if plan is None:
            raise RouteNotFound(route)
        return plan

    async def _lookup(
        self, tenant: str, plan: _RoutePlan, ids: Sequence[EntityId], deadline: Deadline
    ) -> list[CachedScore | None]:
        """Fresh cached scores (stale ones as None); all None when the cache failed or was slow."""
        try:
            # asyncio.timeout, not wait_for: no extra task, and a cache that never suspends
            # (in memory) still answers even with no time left.
            async with asyncio.timeout(min(self._cache_timeout_s, deadline.remaining_s())):
                found = await self._cache.get_many(tenant, plan.name, ids)
            if len(found) != len(ids):
                raise ValueError(f"cache returned {len(found)} entries for {len(ids)} ids")
        except Exception:
            self._counters.cache_read_errors += 1
            logger.debug("score cache lookup failed", exc_info=True)
            return [None] * len(ids)
        max_age_s = plan.max_staleness_s
        return [c if c is not None and c.age_s <= max_age_s else None for c in found]

    async def _light(
        self, plan: _RoutePlan, features: FeatureVector | None, n: int, deadline: Deadline
    ) -> DegradedAnswer | None:
        """The light model's answer, or None when it does not apply, does not fit, or fails."""
        model = plan.light
        if model is None or features is None:
            return None
        try:
            inputs = features.select(plan.light_features).values
        except ValueError:  # the caller's matrix lacks the light model's columns
            return None
        if model.predicted_latency_s() * LIGHT_HEADROOM + LIGHT_MARGIN_S > deadline.remaining_s():
            self._counters.light_skipped += 1
            return None
        try:
            scores = np.array(await model.score(inputs, deadline=deadline.split(LIGHT_MARGIN_S)), dtype=np.float32)
            _check_scores(scores, n, plan)
        except Exception as err:
            self._counters.light_errors += 1
            failures, since = self._light_failures.get(plan.name, (0, self._clock()))
            self._light_failures[plan.name] = (failures + 1, since)
            if failures + 1 == OUTAGE_AFTER_FAILURES:
                logger.warning("light model %s of route %s failing: %r", model.model_name, plan.name, err)
            return None
        failures, since = self._light_failures.pop(plan.name, (0, 0.0))
        if failures >= OUTAGE_AFTER_FAILURES:
            logger.info("light model %s recovered after %.1f s", model.model_name, self._clock() - since)
        return DegradedAnswer(scores, ServedBy.LIGHT, model.model_name, 0.0)

    @staticmethod
    def _compose(
        plan: _RoutePlan, cached: list[CachedScore | None], features: FeatureVector | None, n: int
    ) -> DegradedAnswer:
        """Fresh cached scores where present, the baseline elsewhere."""
        hits = [c for c in cached if c is not None]
        oldest_ms = max(c.age_s for c in hits) * 1000 if hits else 0.0
        if len(hits) == n:
            return DegradedAnswer(np.array([c.score for c in hits], np.float32), ServedBy.CACHE, "", oldest_ms)
        scores = plan.baseline.scores(features, n)
        if hits:
            where = [i for i, c in enumerate(cached) if c is not None]
            scores[where] = [c.score for c in hits]
        return DegradedAnswer(scores, ServedBy.BASELINE, "", oldest_ms)


def _check_scores(scores: npt.NDArray[np.float32], n: int, plan: _RoutePlan) -> None:
    """Raise ModelOutputInvalid unless ``scores`` are ``n`` values in the route's (finite) range."""
    if scores.shape != (n,):
        raise ModelOutputInvalid(f"light model returned shape {scores.shape} for {n} entities")
    low, high = float(scores.min()), float(scores.max())
    if not (plan.score_min <= low and high <= plan.score_max):  # NaN compares False: refused too
        raise ModelOutputInvalid(f"light model scores outside [{plan.score_min}, {plan.score_max}] or not finite")
