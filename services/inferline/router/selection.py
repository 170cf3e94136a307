"""Route selection: which variant of a route serves a request, by predicted latency, availability and cost."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from inferline.core.config import CanaryConfig, DeviceClassConfig, RouteConfig, VariantConfig

ChoiceReason = Literal["pinned", "canary", "preferred", "spill", "cheapest", "best_effort"]

DEFAULT_ALPHA = 0.2
"""Weight of the newest latency sample in the EWMA: about the last 1/alpha = 5 calls dominate."""

REPROBE_AFTER_S = 1.0
"""An idle variant with no call this long is tried again (see ``VariantStats``)."""

CANARY_BUCKETS = 10_000
"""Request keys are bucketed modulo this; a canary of share s takes the first round(s × buckets)."""


class VariantStats:
    """What route selection knows about one model: its recent latency and its calls in flight.

    Algorithm: an exponentially weighted moving average of observed model latency,
    ``ewma ← alpha × sample + (1 − alpha) × ewma``, seeded with the first sample (before
    it the latency is unknown). An EWMA, not a window or a percentile, because it is O(1)
    in time and memory on the hot path and follows a variant that slows down (or recovers)
    within a handful of calls, while one outlier moves it by only ``alpha``.

    Prediction for the next call::

        predicted = ewma × (1 + max(0, in_flight + 1 − parallelism) / parallelism)

    The variant serves ``parallelism`` calls at once; each call beyond that waits in
    Triton's queue, and every further ``parallelism`` of them adds one whole service time.
    An unknown EWMA predicts 0: optimistic, so that an untried variant gets tried and
    learns its latency instead of never being chosen.

    A variant that has been idle with no call for ``reprobe_after_s`` also predicts 0 once
    (until its next call ends): without it a variant judged slow would never be chosen
    again, so it could never be seen to recover.

    Shared by every route that uses the model (see ``StatsRegistry``), so the in-flight
    count is the model's, not one route's. Invariant: ``in_flight ≥ 0``; ``finished``
    without a matching ``started`` is a bug and raises. Not thread-safe: use from one
    event loop.
    """

    __slots__ = ("_alpha", "_clock", "_ewma_s", "_in_flight", "_last_observed", "_parallelism", "_reprobe_after_s")

    def __init__(
        self,
        parallelism: int,
        *,
        alpha: float = DEFAULT_ALPHA,
        reprobe_after_s: float = REPROBE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, got {parallelism}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._parallelism = parallelism
        self._alpha = alpha
        self._ewma_s: float | None = None
        self._in_flight = 0
        self._reprobe_after_s = reprobe_after_s
        self._clock = clock
        self._last_observed = clock()

    @property
    def parallelism(self) -> int:
        return self._parallelism

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ewma_latency_s(self) -> float | None:
        """Smoothed model latency in seconds; None until the first observation."""
        return self._ewma_s

    def started(self) -> None:
        """Count a call to the model as in flight (call it right before sending the call)."""
        self._in_flight += 1

    def finished(self, latency_s: float | None) -> None:
        """Count a call as done and, if it has a latency, fold it into the EWMA.

        Args:
            latency_s: how long the model took, in seconds. None for a call whose duration
                says nothing about the model's speed (it failed fast, the caller cancelled it):
                only the in-flight count changes. A call cut off by its deadline took *at
                least* its elapsed time; pass that, so a variant that has slowed down is seen
                as slow rather than keeping its old, fast EWMA.

        Raises:
            RuntimeError: no call is in flight (more ``finished`` than ``started``).
            ValueError: ``latency_s`` is negative or not finite (nothing is changed).
        """
        if self._in_flight == 0:
            raise RuntimeError("VariantStats.finished() without a matching started()")
        if latency_s is not None:
            if not (latency_s >= 0 and math.isfinite(latency_s)):
                raise ValueError(f"latency_s must be finite and non-negative, got {latency_s}")
            ewma = self._ewma_s
            self._ewma_s = latency_s if ewma is None else ewma + self._alpha * (latency_s - ewma)
        self._last_observed = self._clock()
        self._in_flight -= 1

    def predicted_latency_s(self) -> float:
        """Predicted latency of one more call started now, in seconds (0 while untried)."""
        ewma = self._ewma_s
        if ewma is None:
            return 0.0
        if self._in_flight == 0 and self._clock() - self._last_observed > self._reprobe_after_s:
            return 0.0  # idle long enough: worth one probe, it may have recovered
        p = self._parallelism
        queued = self._in_flight + 1 - p
        return ewma if queued <= 0 else ewma * (1 + queued / p)


class StatsRegistry:
    """One ``VariantStats`` per variant ``ref`` (model, or model:version), shared by every
    route (and selector) that uses it.

    Two routes on the same Triton model load the same instances, so they must see one
    in-flight count and one latency history; keeping stats per route would let each route
    believe the model is idle while the other fills it. Two versions of a model run on
    instances of their own, so each pinned version has its own stats.
    """

    def __init__(self, *, alpha: float = DEFAULT_ALPHA) -> None:
        self._alpha = alpha
        self._stats: dict[str, VariantStats] = {}

    def for_variant(self, variant: VariantConfig) -> VariantStats:
        """The model's stats, created on first use with the variant's parallelism.

        Raises:
            ValueError: the model is already registered with a different parallelism
                (parallelism is a property of the Triton model, so two routes must agree).
        """
        ref = variant.ref
        stats = self._stats.get(ref)
        if stats is None:
            stats = self._stats[ref] = VariantStats(variant.parallelism, alpha=self._alpha)
        elif stats.parallelism != variant.parallelism:
            raise ValueError(
                f"model {ref!r} is configured with parallelism {variant.parallelism} "
                f"on one route and {stats.parallelism} on another"
            )
        return stats

    def get(self, model: str) -> VariantStats | None:
        """The stats of a variant ref (a model, or model:version), or None if no route uses it
        (for metrics and tests)."""
        return self._stats.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self._stats


def cost_per_request(cost_per_hour: float, stats: VariantStats) -> float:
    """Device cost of one call to the variant, used only to rank variants by cheapness.

    ``cost_per_hour / 3600 × ewma_latency_s / parallelism``: one call occupies the device
    for about its service time, shared with ``parallelism - 1`` others. Queueing is left
    out on purpose: waiting costs the caller time, not the device money. It ignores
    batching gains and idle capacity, so it is not a bill; it orders GPU against CPU. An
    untried variant costs 0 (optimistic, as its predicted latency is).
    """
    ewma = stats.ewma_latency_s
    if ewma is None:
        return 0.0
    return cost_per_hour / 3600.0 * ewma / stats.parallelism


@dataclass(frozen=True, slots=True)
class Choice:
    """The variant a request will run on, its shared stats (call ``started``/``finished``), and why."""

    variant: VariantConfig
    stats: VariantStats
    reason: ChoiceReason


@dataclass(frozen=True, slots=True)
class _Entry:
    variant: VariantConfig
    stats: VariantStats
    cost_per_hour: float
    is_primary: bool


class RouteSelector:
    """Chooses among a route's full-quality variants (``primary``, then ``alternates``) per request.

    Algorithm, first rule that applies wins:

    1. **pinned**: the tenant's pinned variant if it is available, even when its predicted
       latency exceeds the budget (the tenant asked for that model; an unavailable pin falls
       through rather than failing the request).
    2. **canary**: ``request_key % 10_000 < round(share × 10_000)`` and the canary variant is
       available and its prediction fits the budget. Keyed on the request, so a retry of the
       same request lands on the same variant, and exactly ``share`` of keys go to the canary.
    3. Candidates: available variants whose predicted latency ≤ ``budget_s``.
       ``prefer_cheapest`` (batch traffic) → the cheapest candidate by ``cost_per_request``,
       ties in preference order (**cheapest**). Otherwise the first candidate in preference
       order: **preferred** if it is the primary, else **spill** (a burst spilled from the
       preferred variant to the next, e.g. GPU → CPU).
    4. **best_effort**: nothing fits but something is available → the available variant with
       the lowest predicted latency. Not a degradation: the prediction is an estimate and the
       router still passes the remaining budget to Triton, so a call that would have been
       degraded may yet answer in time, and if it does not the router degrades then.
    5. Nothing available → None (the router degrades: MODEL_UNAVAILABLE / CIRCUIT_OPEN).

    Cost: one pass over the variants, one ``available`` call per variant at most (the
    non-cheapest path stops at the first that fits), one ``Choice`` allocated. No I/O and no
    clock; ``available(ref)`` is the router's combination of Triton readiness and breakers.

    Variants are told apart by their ``ref`` (``model``, or ``model:version`` for a pinned
    version), so one model's versions can be different variants of a route: a tenant's canary
    of ``ranker:2`` beside a primary pinned to ``ranker:1``.
    """

    def __init__(
        self,
        route_name: str,
        route: RouteConfig,
        device_classes: Mapping[str, DeviceClassConfig],
        available: Callable[[str], bool],
        registry: StatsRegistry,
    ) -> None:
        self._route_name = route_name
        self._available = available
        entries: list[_Entry] = []
        for i, variant in enumerate([route.primary, *route.alternates]):
            device = device_classes.get(variant.device)
            if device is None:
                raise ValueError(
                    f"routes.{route_name}: variant {variant.model!r} runs on unknown device {variant.device!r}"
                )
            entries.append(_Entry(variant, registry.for_variant(variant), device.cost_per_hour, i == 0))
        self._entries = tuple(entries)
        self._by_model = {e.variant.ref: e for e in reversed(entries)}  # first listed wins on duplicates

    @property
    def route_name(self) -> str:
        return self._route_name

    @property
    def variants(self) -> tuple[VariantConfig, ...]:
        """The route's full-quality variants in preference order (primary first)."""
        return tuple(e.variant for e in self._entries)

    def cost_per_request(self, variant: VariantConfig) -> float:
        """``cost_per_request`` of one of this route's variants (see the module function).

        Raises:
            KeyError: the variant is not one of this route's.
        """
        entry = self._by_model[variant.ref]
        return cost_per_request(entry.cost_per_hour, entry.stats)

    def select(
        self,
        *,
        tenant_pin: str | None,
        canary: CanaryConfig | None,
        request_key: int,
        budget_s: float,
        prefer_cheapest: bool,
    ) -> Choice | None:
        """Choose the variant for one request.

        Args:
            tenant_pin: variant ref the tenant pinned for this route (``TenantConfig.pin``), or
                None. A ref that is not a variant of the route is treated as unavailable
                (config validation already rejects it).
            canary: the tenant's canary for this route (``TenantConfig.canary``, a variant ref), or None.
            request_key: a stable non-negative hash of the request id (stable across
                processes, e.g. CRC32, not Python's salted ``hash``), for the canary split.
            budget_s: model-layer budget left for this request, in seconds.
            prefer_cheapest: the traffic class's ``prefer_cheapest``.

        Returns:
            The chosen variant with its stats and reason, or None when no variant is available.
        """
        available = self._available
        if tenant_pin is not None:
            entry = self._by_model.get(tenant_pin)
            if entry is not None and available(tenant_pin):
                return Choice(entry.variant, entry.stats, "pinned")
        if canary is not None and request_key % CANARY_BUCKETS < round(canary.share * CANARY_BUCKETS):
            entry = self._by_model.get(canary.model)
            if entry is not None and entry.stats.predicted_latency_s() <= budget_s and available(canary.model):
                return Choice(entry.variant, entry.stats, "canary")

        cheapest: _Entry | None = None
        cheapest_cost = math.inf
        fastest: _Entry | None = None
        fastest_s = math.inf
        for entry in self._entries:
            # Prediction first: it is arithmetic, `available` may consult breakers.
            predicted_s = entry.stats.predicted_latency_s()
            if predicted_s <= budget_s:
                if not available(entry.variant.ref):
                    continue
                if not prefer_cheapest:
                    return Choice(entry.variant, entry.stats, "preferred" if entry.is_primary else "spill")
                cost = cost_per_request(entry.cost_per_hour, entry.stats)
                if cheapest is None or cost < cheapest_cost:
                    cheapest, cheapest_cost = entry, cost
            elif (fastest is None or predicted_s < fastest_s) and available(entry.variant.ref):
                fastest, fastest_s = entry, predicted_s
        if cheapest is not None:
            return Choice(cheapest.variant, cheapest.stats, "cheapest")
        if fastest is not None:
            return Choice(fastest.variant, fastest.stats, "best_effort")
        return None
