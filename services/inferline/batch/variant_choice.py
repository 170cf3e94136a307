"""Which of a route's full-quality variants scores a job: the cheapest that keeps its deadline.

Without a deadline (``--deadline-s``) the job takes the cheapest variant Triton has ready,
as route selection does for ``prefer_cheapest`` classes. With one, a cost alone says
nothing about time: the same model may run on a busy CPU pool or an idle GPU. So each
ready variant, cheapest first, is measured where it runs now — ``PROBE_REQUESTS`` requests
of the job's size, the job's concurrency in flight, at the job's priority — and the first
whose rate finishes the job's rows within ``DEADLINE_SHARE`` of the deadline is taken
(the rest of the deadline absorbs the feature reads, the writing and the online traffic
the job yields to). When none does, the fastest measured is taken and the summary says
the deadline is not expected to be met (the job still runs: a late refresh beats none).
A probe that fails counts the variant out.

While the job runs, ``DeadlineChoice.recheck`` looks again whenever the run falls behind: at
its recent rate on its variant (pauses for online traffic left out) the rows left would not be
scored in the time left. The job's time per row is split into its variant's scoring (the
rate measured for it) and the rest (feature reads, writing, Triton's other traffic), which a
variant does not change; each other ready variant's measured rate gives the job's rate on it.
The cheapest whose projected rate keeps the deadline is taken; when none does, the fastest if
it is at least ``SWITCH_GAIN`` faster than the job now is — a switch that would not speed the
job up (the time goes elsewhere) is not made. A variant is measured at most once a run and
never taken again once left, so a job switches at most once per variant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferline.batch.scoring import ModelTarget
from inferline.core.deadline import Deadline
from inferline.triton.executor import ModelCallFailed, ModelExecutor

logger = logging.getLogger(__name__)

DEADLINE_SHARE = 0.8
"""The share of the deadline the scoring alone may take at the measured rate."""
PROBE_REQUESTS = 8
"""Measured requests per variant (after one unmeasured warm-up request)."""
PROBE_TIMEOUT_S = 10.0
"""Wait for one probe request (Triton's queue timeout too)."""
SWITCH_GAIN = 1.2
"""When no variant keeps the deadline, the fastest replaces the running one only if the job's
projected rate on it is at least this many times its rate now."""


@dataclass(frozen=True)
class Candidate:
    target: ModelTarget
    cost_per_hour: float


@dataclass(frozen=True)
class Choice:
    """The variant taken, and why."""

    target: ModelTarget
    reason: str
    deadline_met: bool | None = None
    """None without a deadline (nothing measured); else whether the measured rate keeps it."""
    rates: dict[str, float] = field(default_factory=dict)
    """Rows/s measured per variant model, in the order measured (NaN: the probe failed)."""

    def summary(self) -> dict[str, Any]:
        return {
            "variant": self.target.variant,
            "reason": self.reason,
            "deadline_met": self.deadline_met,
            "measured_rows_per_s": {k: None if np.isnan(v) else round(v, 1) for k, v in self.rates.items()},
        }


Measure = Callable[[ModelTarget], Awaitable[float]]
"""Rows/s a variant scores at now; NaN when it could not be measured."""


@dataclass(frozen=True)
class Course:
    """Where a running job stands against its deadline."""

    rate: float
    """Rows/s the job committed recently on its variant, time paused for online traffic left out."""
    rows_left: int
    time_left_s: float

    @property
    def behind(self) -> bool:
        """At ``rate`` the rows left would not be done in the time left."""
        return self.rows_left > 0 and (self.rate <= 0 or self.rows_left / self.rate > self.time_left_s)


@dataclass(frozen=True)
class Switch:
    """A variant the running job changes to, and why."""

    candidate: Candidate
    reason: str
    deadline_met: bool
    """Whether the projected rate on it scores the rows left in the time left."""

    @property
    def target(self) -> ModelTarget:
        return self.candidate.target


class DeadlineChoice:
    """The policy: cheapest variant, or with a deadline the cheapest whose measured rate keeps it."""

    def __init__(self, share: float = DEADLINE_SHARE) -> None:
        self._share = share

    async def choose(
        self, candidates: Sequence[Candidate], rows: int | None, deadline_s: float | None, measure: Measure
    ) -> Choice:
        """``candidates``: the ready variants (at least one); ``rows``: the job's rows still to
        score (None: unknown, e.g. a CSV not yet scanned: then no rate can be judged)."""
        ranked = sorted(candidates, key=lambda c: c.cost_per_hour)  # stable: config order breaks ties
        if deadline_s is None or rows is None:
            return Choice(ranked[0].target, "cheapest ready variant (no deadline)")
        rates: dict[str, float] = {}
        for candidate in ranked:
            rate = await measure(candidate.target)
            rates[candidate.target.model] = rate
            if rate > 0 and rows / rate <= self._share * deadline_s:
                return Choice(
                    candidate.target,
                    f"cheapest variant whose measured {rate:,.0f} rows/s scores {rows:,} rows in "
                    f"{rows / rate:,.1f} s, within {self._share:.0%} of the {deadline_s:,.0f} s deadline",
                    True,
                    rates,
                )
        measured = [c for c in ranked if rates[c.target.model] > 0]
        if not measured:
            return Choice(ranked[0].target, "no variant could be measured; cheapest ready variant", False, rates)
        fastest = max(measured, key=lambda c: rates[c.target.model])
        rate = rates[fastest.target.model]
        return Choice(
            fastest.target,
            f"no variant keeps the {deadline_s:,.0f} s deadline: the fastest measured, {rate:,.0f} rows/s, "
            f"needs {rows / rate:,.1f} s for {rows:,} rows",
            False,
            rates,
        )

    async def recheck(
        self,
        candidates: Sequence[Candidate],
        current: ModelTarget,
        course: Course,
        rates: dict[str, float],
        measure: Measure,
        left: Collection[str] = (),
    ) -> Switch | None:
        """The variant a job that is ``course.behind`` changes to, or None (stay).

        ``candidates``: the variants ready now; ``rates``: the rows/s measured so far this
        run, by model (the current variant's among them), completed here for the variants
        measured now; ``left``: models the run has left already (never taken again).
        """
        if not course.behind or course.rate <= 0:
            return None
        # Per row: the current variant's scoring (unmeasured: none, so all of it is the rest)
        # and the rest, which no variant changes.
        scoring_s = 1 / rates[current.model] if rates.get(current.model, 0) > 0 else 0.0
        rest_s = max(0.0, 1 / course.rate - scoring_s)
        behind = (
            f"behind the deadline at {course.rate:,.0f} rows/s "
            f"({course.rows_left:,} rows, {course.time_left_s:,.1f} s left)"
        )
        projected: list[tuple[Candidate, float]] = []
        for candidate in sorted(candidates, key=lambda c: c.cost_per_hour):
            model = candidate.target.model
            if model == current.model or model in left:
                continue
            if model not in rates:
                rates[model] = await measure(candidate.target)
            rate = rates[model]
            if not rate > 0:
                continue
            job_rate = 1 / (rest_s + 1 / rate)
            if course.rows_left / job_rate <= self._share * course.time_left_s:
                return Switch(
                    candidate,
                    f"{behind}: {model} measured {rate:,.0f} rows/s, the job about {job_rate:,.0f} on it, "
                    f"within {self._share:.0%} of the time left",
                    True,
                )
            projected.append((candidate, job_rate))
        if not projected:
            return None
        fastest, job_rate = max(projected, key=lambda p: p[1])
        if job_rate < SWITCH_GAIN * course.rate:
            return None  # the time goes elsewhere: another variant would not speed the job up
        return Switch(
            fastest,
            f"{behind} and no variant keeps it: the fastest, {fastest.target.model}, "
            f"about {job_rate:,.0f} rows/s for the job",
            False,
        )


async def measure_rate(
    executor: ModelExecutor, target: ModelTarget, row: np.ndarray, concurrency: int, requests: int = PROBE_REQUESTS
) -> float:
    """Rows/s of ``target`` for requests of ``target.request_rows`` copies of ``row``, ``concurrency``
    in flight; NaN when a request fails (the variant is then passed over)."""
    batch = np.tile(np.asarray(row, dtype=np.float32), (target.request_rows, 1))
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            await executor.infer(
                target.model,
                batch,
                deadline=Deadline.after(PROBE_TIMEOUT_S),
                priority=target.priority,
                input_name=target.input_name,
                output_name=target.output_name,
            )

    try:
        await one()  # warm-up: the first call may set up the connection or the model instance
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
    except ModelCallFailed as err:
        logger.warning("batch: could not measure model %s: %s", target.model, err)
        return float("nan")
    return requests * target.request_rows / (time.perf_counter() - started)
