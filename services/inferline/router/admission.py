"""``AdmissionController``: admit, degrade or shed a request of a route before any work on it.

One controller per route. A request of class ``c`` is admitted while both hold:

* the route's in-flight requests are below ``limit × c.limit_share`` — the limit is the
  route's adaptive concurrency limit (``router.limits``), and lower classes have smaller
  shares, so as in-flight work grows they reach their ceiling first and are shed first;
* the router's queue wait is below ``c.queue_wait_target_ms`` — lower classes have lower
  targets, for the same reason. The queue wait is the larger of the route's signal (event-loop
  lag, recent waits before the handler: ``LoopLagMonitor``, ``IngressWait``) and this
  request's own wait before its handler, when the gateway let it be measured.

Otherwise a sheddable class is rejected (``Shed``: RESOURCE_EXHAUSTED with a retry
hint), and a class that may not be shed gets a degraded answer (cache, light model,
baseline; reason OVERLOAD) when the route allows it (``degrade_over_limit``), else it is
rejected too. A request with no degraded answer (a KServe call's raw tensors,
``admit(..., degradable=False)``) of a class that may not be shed runs over the limit
instead: the operator said the class is never shed, the lower classes' smaller shares have
already made room for it, and refusing it would only turn an answer that may still come in
time into a certain failure. Its model's in-flight bound (``max_in_flight``) still caps it.

When the route fails the classes that may not be shed — more than
``protected_miss_rate`` of their recent answers missed the deadline (a degraded answer for
it, or DEADLINE_EXCEEDED; ``protected_misses``) — every sheddable class is over, whatever the
queue wait says: in the gateway's signal, and for direct calls. The queue-wait targets hold
the queue where the lower classes' own deadlines are safe; the critical class shares that
queue (the transport is first come, first served), and when it alone is most of the load the
same queue's tail is past its deadline. Then the lower classes yield until it is answered in
time again. A gateway call of a class the gateway bounds is not shed for it: it has already
waited in the transport, so the router's shed would be a slow one (measured: shed p99 60–130 ms
at 2×–3× of the knee), while the gateway turns the rest of its class away at once.

Only a miss that queueing can explain counts: its request waited at least
``PROTECTED_MISS_MIN_WAIT_S`` before its handler, or arrived while the router's queue wait was
that long, and its deadline was long enough for the main path on an idle router (``slack_s``,
from the servicer, which knows the path's fixed needs). A deadline too short for the main path
(the demo's 10 ms critical calls answered from the cache) is the caller's choice, not the lower
classes' doing, and shedding them would not help it; counting it let any caller allowed a
protected class make the router shed every other tenant's lower classes by sending short
deadlines. (Counting only a gateway call's own wait, without the route's, was tried: six
interleaved pairs at 2×/3× of a 763 req/s knee, critical in time 97.3 / 78.4 % against 98.3 /
89.7 % with the route's wait counted too, medians.)

Through the gateway the shares count only while the path is *saturated* (the limit saw
queuing or drops in its last window, ``ConcurrencyLimit.saturated``): the gateway bounds the
shed classes' in-flight requests itself, so in flight over a share while latency stays flat
is a busy route whose limit has not yet grown to the load, not overload. Counting it made
the gateway shed on every passing burst — half the load of a router that could serve it.
That holds for the overload signal (``overloaded``) and for gateway requests of the classes
the gateway limits (``admit(..., queue_wait=False)``); direct calls, whose queue nobody else
bounds, are still refused at their share.

The decision is a few comparisons and counter updates — a shed request costs no feature
fetch, no model call, no allocation beyond the error — and nothing waits here: the
router's queue is the event loop, bounded by ``server.max_concurrent_rpcs``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping

from inferline.core.config import AdmissionConfig, TrafficClassConfig
from inferline.core.decaying import DecayingAverage
from inferline.core.errors import Shed
from inferline.router.limits import ConcurrencyLimit, GradientLimit, build_limit

PROTECTED_ALPHA = 0.02
"""Weight of one protected answer in ``protected_misses``: the share is over about the last 50."""
PROTECTED_MISS_MIN_WAIT_S = 0.005
"""A protected answer that missed counts toward ``protected_misses`` only if its request waited
at least this long in the router's queue (its own wait before the handler, or for a direct
call the route's queue wait when it arrived): an idle router's wait is well under a millisecond."""
PROTECTED_HALF_LIFE_S = 0.5
"""How fast the share fades with no protected answer: misses before a quiet spell must not
keep the lower classes shed after it."""
# Bounds of the retry hint sent with a shed request.
MIN_RETRY_AFTER_S = 0.01
MAX_RETRY_AFTER_S = 1.0


class Verdict(enum.Enum):
    ADMIT = "admit"
    """Run the main path."""
    DEGRADE = "degrade"
    """Answer from the degradation path at once (reason OVERLOAD)."""


class Permit:
    """An admitted request's slot; ``release`` it exactly once when the answer is sent."""

    __slots__ = ("_controller", "_counts_miss", "_in_flight", "_protected", "_started", "verdict")

    def __init__(
        self,
        controller: AdmissionController | None,
        verdict: Verdict,
        in_flight: int,
        protected: bool = False,
        counts_miss: bool = False,
    ) -> None:
        """``protected``: the class may not be shed, so its answers count (``protected_misses``);
        ``counts_miss``: queueing can explain a miss of this request (see the module
        docstring), which a miss needs to count."""
        self._controller = controller
        self.verdict = verdict
        self._in_flight = in_flight
        self._protected = protected
        self._counts_miss = counts_miss
        self._started = time.perf_counter()

    def release(self, dropped: bool = False, sample: bool = True, missed: bool = False) -> None:
        """Give the slot back. ``dropped``: the main path timed out or had no capacity;
        ``sample=False``: the latency says nothing about the path's capacity (an answer
        degraded before any model work); ``missed``: no answer came in time (DEADLINE_EXCEEDED,
        or cancelled past the deadline). For a class that may not be shed, an answer in time
        counts toward ``protected_miss_rate`` as a success, a dropped or missed one as a miss if
        queueing can explain it (``counts_miss``); any other miss is not counted either way."""
        controller, self._controller = self._controller, None
        if controller is not None:
            if self._protected and not (dropped or missed):
                controller.protected_misses.observe(0.0)
            elif self._protected and self._counts_miss:
                controller.protected_misses.observe(1.0)
            controller._release(time.perf_counter() - self._started, self._in_flight, dropped, sample)


_DEGRADED = Permit(None, Verdict.DEGRADE, 0)
"""Shared permit of requests degraded at the door: they hold no slot, so there is nothing to release."""


class AdmissionController:
    """Per-route admission: adaptive concurrency limit, class shares, queue-wait targets."""

    def __init__(
        self,
        route: str,
        config: AdmissionConfig,
        classes: Mapping[str, TrafficClassConfig],
        queue_wait_s: Callable[[], float] = lambda: 0.0,
        limit: ConcurrencyLimit | None = None,
    ) -> None:
        self._route = route
        self._config = config
        self._classes = classes
        self._queue_wait_s = queue_wait_s
        self._limiter = limit if limit is not None else build_limit(config)
        self._in_flight = 0
        self.protected_misses = DecayingAverage(alpha=PROTECTED_ALPHA, half_life_s=PROTECTED_HALF_LIFE_S)
        """The recent share of the protected classes' answers that missed their deadline
        (``AdmissionConfig.protected_miss_rate``)."""
        self.shed_count = 0
        self.degraded_count = 0
        self.over_limit_count = 0
        """Requests of a class that may not be shed, with no degraded answer, run over the limit."""
        # Lowest class first: the order the gateway is told to shed them in.
        self._sheddable = sorted(
            ((name, c) for name, c in classes.items() if c.sheddable), key=lambda item: -item[1].priority
        )

    @property
    def limit(self) -> int:
        return self._limiter.limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(
        self,
        traffic_class: str,
        waited_s: float | None = None,
        *,
        queue_wait: bool = True,
        degradable: bool = True,
        slack_s: float | None = None,
    ) -> Permit:
        """Decide for one request of ``traffic_class`` (a configured class).

        ``waited_s``: how long this request waited before its handler ran (None when unknown:
        a call that did not come through the gateway). ``slack_s``: the request's time left when
        its handler ran beyond what the main path needs on an idle router (None: no deadline);
        with its wait added back, below 0 means its own deadline, not queueing, would make it miss.
        ``queue_wait``: False when something upstream already bounds this request's queue
        (the gateway's in-flight limit): only the class's share of the limit can shed it
        then, and only while the path is saturated. A shed for queue wait comes after the
        wait, so it is never a fast one. ``degradable``: False when the request has no
        degraded answer; over the limit, a class that may not be shed is then admitted
        (counted in flight) instead of degraded.

        Returns:
            A ``Permit`` whose ``verdict`` says whether to run the main path or degrade.

        Raises:
            Shed: the class may be shed (or the route does not degrade), and the route is
                over the class's share of the limit or the queue wait over its target.
        """
        if not self._config.enabled:
            return Permit(None, Verdict.ADMIT, 0)
        cls = self._classes[traffic_class]
        limit = self._limiter.limit
        route_wait_s = self._queue_wait_s()
        wait_s = max(route_wait_s, waited_s or 0.0)
        queue_wait_s = wait_s if queue_wait else 0.0
        # Whether a miss of this request counts (module docstring): queueing, and a deadline the
        # main path could have kept without it (for a direct call the route's wait stands in
        # for its own, which nobody measured).
        own_wait_s = route_wait_s if waited_s is None else waited_s
        counts_miss = wait_s >= PROTECTED_MISS_MIN_WAIT_S and (slack_s is None or slack_s + own_wait_s >= 0)
        if not self._over(cls, limit, queue_wait_s, sustained=not queue_wait, protect=queue_wait):
            self._in_flight += 1
            return Permit(self, Verdict.ADMIT, self._in_flight, not cls.sheddable, counts_miss)
        if not cls.sheddable and self._config.degrade_over_limit:
            if not degradable:
                self.over_limit_count += 1
                self._in_flight += 1
                return Permit(self, Verdict.ADMIT, self._in_flight, True, counts_miss)
            self.degraded_count += 1
            return _DEGRADED
        self.shed_count += 1
        protecting = ", yielding to classes that miss their deadline" if cls.sheddable and self.protecting else ""
        raise Shed(
            f"route {self._route!r} is overloaded for traffic class {traffic_class!r} "
            f"({self._in_flight} in flight, limit {limit}, queue wait {queue_wait_s * 1000:.1f} ms{protecting})",
            self._retry_after_s(queue_wait_s),
        )

    def overloaded(self) -> str:
        """The sheddable classes a request would be refused in right now, lowest first, comma-separated.

        The queue-wait targets as in ``admit`` (without this request's own wait), and a
        class's share of the limit only while the path is saturated: the gateway acts on
        every answer's signal, so a burst that passes over a share while latency stays flat
        must not make it shed. "" when none, or when admission is off.
        """
        if not self._config.enabled:
            return ""
        limit, queue_wait_s = self._limiter.limit, self._queue_wait_s()
        return ",".join(
            name for name, c in self._sheddable if self._over(c, limit, queue_wait_s, sustained=True, protect=True)
        )

    @property
    def protecting(self) -> bool:
        """Whether the protected classes miss too often (``protected_miss_rate``): every
        sheddable class is over while they do."""
        threshold = self._config.protected_miss_rate
        return threshold is not None and self.protected_misses.value > threshold

    def _over(
        self, cls: TrafficClassConfig, limit: int, queue_wait_s: float, *, sustained: bool, protect: bool
    ) -> bool:
        """Whether the route is over ``cls``'s queue-wait target, or over its share of the limit
        (with ``sustained``: only while the limit says the path is saturated), or, for a
        sheddable class and with ``protect``, the protected classes miss too often."""
        if queue_wait_s * 1000 >= cls.queue_wait_target_ms:
            return True
        if protect and cls.sheddable and self.protecting:
            return True
        over_share = self._in_flight >= max(1, int(limit * cls.limit_share))
        return over_share and (not sustained or self._limiter.saturated)

    def _retry_after_s(self, queue_wait_s: float) -> float:
        """How long a shed caller should wait: about one latency of the path, or the queue wait if longer."""
        rtt = self._limiter.long_rtt_s if isinstance(self._limiter, GradientLimit) else 0.0
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, max(rtt, queue_wait_s)))

    def _release(self, rtt_s: float, in_flight: int, dropped: bool, sample: bool) -> None:
        self._in_flight -= 1
        if sample:
            self._limiter.on_sample(rtt_s, in_flight, dropped)
