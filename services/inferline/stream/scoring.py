"""``EventScorer``: one event's answer through the route, with the batch job's own pieces.

Features come from ``BatchFeatures`` (Feast online store, the hot-entity cache, defaults
for what is missing; concurrent events' reads merged by ``FeatureBatcher``), the model
call from ``BatchScorer`` (bounded in flight, retried, never cancelled), post-processing
from the route's range check, the cache refresh from ``CachePublisher``. Where the
primary cannot or should not answer, the online degradation ladder (``DegradationService``) does:

* event older than its time + budget → reason DEADLINE (cache, light, baseline);
* lag switched the worker to light mode → reason OVERLOAD (light model first);
* the model failed or answered out of range → MODEL_ERROR / INVALID_OUTPUT.
"""

from __future__ import annotations

import asyncio
import time

from inferline.batch.errors import BatchJobFailed
from inferline.batch.publish import CachePublisher
from inferline.batch.scoring import BatchScorer
from inferline.core.config import RouteConfig
from inferline.core.deadline import Deadline
from inferline.core.served_by import Reason, ServedBy
from inferline.degradation.service import DegradationService
from inferline.features.vector import FeatureVector
from inferline.stream.events import Event, Outcome
from inferline.stream.feature_batch import FeatureBatcher

DEGRADE_BUDGET_S = 0.5
"""Time the ladder gets for one event: enough for the in-process light model and a cache read."""
CACHE_WRITERS = 8
"""Cache refreshes in flight at most: well under the score cache client's pool, which fails
calls past its bound at once rather than queueing them."""


class EventScorer:
    def __init__(
        self,
        route_name: str,
        route: RouteConfig,
        features: FeatureBatcher,
        scorer: BatchScorer,
        degradation: DegradationService,
        publisher: CachePublisher | None,
        *,
        tenant: str | None,
        budget_ms: float,
    ) -> None:
        self._name = route_name
        self._route = route
        self._features = features
        self._scorer = scorer
        self._degradation = degradation
        self._publisher = publisher
        self._tenant = tenant or ""
        self._budget_ms = budget_ms
        self._columns = [features.names.index(n) for n in scorer.target.features]
        self._cache_writers = asyncio.Semaphore(CACHE_WRITERS)
        self.cache_errors = 0
        """Refreshes that failed: the answer stands; the online path reads an older score or none."""

    def expired(self, event: Event, now_ms: float | None = None) -> bool:
        """True when the event is older than its time + the stream budget."""
        now = time.time() * 1000 if now_ms is None else now_ms
        return now > event.time_ms + self._budget_ms

    async def score(self, event: Event, *, light: bool) -> Outcome:
        values, defaulted = await self._features.get(event)
        vector = FeatureVector(tuple(self._features.names), values, defaulted, False)
        if self.expired(event):
            outcome = await self._degrade(event, vector, Reason.DEADLINE)
        elif light:
            outcome = await self._degrade(event, vector, Reason.OVERLOAD)
        else:
            outcome = await self._primary(event, vector)
        if self._publisher is not None and outcome.served_by in (ServedBy.PRIMARY, ServedBy.LIGHT):
            await self._refresh(self._publisher, event, outcome.score)
        return outcome

    async def _refresh(self, publisher: CachePublisher, event: Event, score: float) -> None:
        """Best effort, like the online write-through: a cache outage does not hold up the stream."""
        try:
            async with self._cache_writers:
                await publisher.publish([event.entity], [score], time.time())
        except BatchJobFailed:
            self.cache_errors += 1

    async def _primary(self, event: Event, vector: FeatureVector) -> Outcome:
        try:
            scored = await self._scorer.score(vector.values[:, self._columns])
        except BatchJobFailed:
            return await self._degrade(event, vector, Reason.MODEL_ERROR)
        if not bool(scored.valid[0]):
            return await self._degrade(event, vector, Reason.INVALID_OUTPUT)
        target = self._scorer.target
        return Outcome(float(scored.scores[0]), ServedBy.PRIMARY, None, target.variant, scored.model_version)

    async def _degrade(self, event: Event, vector: FeatureVector, reason: Reason) -> Outcome:
        answer = await self._degradation.degrade(
            self._tenant, self._name, [event.entity], vector, reason, deadline=Deadline.after(DEGRADE_BUDGET_S)
        )
        return Outcome(float(answer.scores[0]), answer.served_by, reason, answer.model_name, "")
