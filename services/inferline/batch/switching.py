"""``VariantSwitcher``: a running job with a deadline changes variant when it falls behind.

After each committed chunk it asks ``DeadlineCourse`` whether it is time to look again and,
when the job is behind its deadline, ``DeadlineChoice.recheck`` which ready variant to score
the rest on (``variant_choice``'s docstring says how). The chunks already in progress finish on
the variant they started with; each part's ``model`` column names the variant of its rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from inferline.batch.course import DeadlineCourse
from inferline.batch.errors import BatchJobFailed
from inferline.batch.plan import JobVariants
from inferline.batch.scoring import BatchScorer, ModelTarget
from inferline.batch.stats import BatchEfficiency
from inferline.batch.variant_choice import DeadlineChoice, Switch

logger = logging.getLogger(__name__)


class VariantSwitcher:
    """Changes ``scorer``'s variant when ``course`` falls behind and a ready variant helps."""

    def __init__(
        self,
        course: DeadlineCourse,
        variants: JobVariants,
        scorer: BatchScorer,
        efficiency: BatchEfficiency,
        rates: dict[str, float],
        cost_per_hour: float,
        label: str,
        on_switch: Callable[[str, str], None] | None = None,
    ) -> None:
        """``rates``: the rows/s measured for the first choice, by model; ``cost_per_hour``:
        the first variant's device cost; ``on_switch``: told each switch (from, to variant)."""
        self._course = course
        self._variants = variants
        self._scorer = scorer
        self._efficiency = efficiency
        self._rates = dict(rates)
        self._policy = DeadlineChoice()
        self._label = label
        self._on_switch = on_switch
        self._left: set[str] = set()
        self._looking = False
        self._rows = 0
        self._segments: list[tuple[float, float]] = [(cost_per_hour, time.monotonic())]
        self.looks = 0
        """Times the job was found behind its deadline and the variants looked at again."""
        self.switches: list[dict[str, Any]] = []

    async def committed(self, input_rows: int, model: str) -> None:
        """A chunk of ``input_rows`` scored on ``model`` is committed."""
        self._rows += input_rows
        self._course.committed(input_rows, model)
        if self._looking:
            return  # the other worker is looking already
        course = self._course.due()
        if course is None or not course.behind:
            return
        self._looking = True
        try:
            self.looks += 1
            try:
                candidates = await self._variants.ready()
            except BatchJobFailed as err:  # Triton busy or away: the scoring's retries deal with it
                logger.info("batch %s: behind the deadline, variants not listed: %s", self._label, err)
                return
            current = self._scorer.target
            switch = await self._policy.recheck(
                candidates, current, course, self._rates, self._variants.measure, self._left
            )
            if switch is None:
                return
            await self._switch(current, switch)
        finally:
            self._looking = False

    async def _switch(self, current: ModelTarget, switch: Switch) -> None:
        target = switch.target
        self._left.add(current.model)
        self._scorer.retarget(target)
        self._course.switched(target.model)
        await self._efficiency.track(target.model)
        self._segments.append((switch.candidate.cost_per_hour, time.monotonic()))
        self.switches.append(
            {
                "after_rows": self._rows,
                "after_s": round(self._course.elapsed_s, 3),
                "from": current.variant,
                "to": target.variant,
                "reason": switch.reason,
                "deadline_met": switch.deadline_met,
            }
        )
        logger.info("batch %s: variant %s -> %s: %s", self._label, current.variant, target.variant, switch.reason)
        if self._on_switch is not None:
            self._on_switch(current.variant, target.variant)

    def cost_per_hour(self) -> float:
        """The run's device cost per hour so far: each variant's, weighted by the time it scored."""
        ends = [start for _, start in self._segments[1:]] + [time.monotonic()]
        spans = [(cost, end - start) for (cost, start), end in zip(self._segments, ends, strict=True)]
        total = sum(span for _, span in spans)
        return sum(cost * span for cost, span in spans) / total if total > 0 else self._segments[-1][0]

    def summary(self) -> dict[str, Any]:
        return {"looks": self.looks, "switches": self.switches, "deadline_kept": self._course.kept}
