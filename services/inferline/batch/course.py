"""``DeadlineCourse``: where a running job with a deadline stands, for ``DeadlineChoice.recheck``.

The job's rate is taken over the rows committed since its variant was taken, which the
variant scored, over the time since then less the time the job was paused for online traffic
(``AdjustableGate.paused_s``): a pause says nothing about how fast a variant lets the job run,
and counting it would make every variant look like no help.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from inferline.batch.variant_choice import Course

RECHECK_S = 1.0
"""Least time between two looks at the job's course."""


class DeadlineCourse:
    """Counts a run's committed rows against its deadline (seconds from ``started``)."""

    def __init__(
        self,
        deadline_s: float,
        rows_left: int,
        model: str,
        paused_s: Callable[[], float],
        *,
        started: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rows_left``: the run's input rows still to score; ``model``: the variant scoring
        them now; ``paused_s``: the job's time paused so far; ``started``: the run's start, on
        ``clock``."""
        self._deadline_s = deadline_s
        self._rows_left = rows_left
        self._paused_s = paused_s
        self._clock = clock
        self._started = started
        self._last_look = clock()
        self.model = model
        self._rows = 0
        self._since = self._last_look
        self._paused_at_since = paused_s()

    def committed(self, input_rows: int, model: str) -> None:
        """A chunk of ``input_rows`` is committed, scored by ``model``."""
        self._rows_left -= input_rows
        if model == self.model:
            self._rows += input_rows

    def due(self) -> Course | None:
        """The course, when it is time to look again (``RECHECK_S`` since the last look, and a
        chunk committed on the current variant since it was taken); else None."""
        now = self._clock()
        if now - self._last_look < RECHECK_S or self._rows == 0 or self._rows_left <= 0:
            return None
        self._last_look = now
        running_s = now - self._since - (self._paused_s() - self._paused_at_since)
        rate = self._rows / running_s if running_s > 0 else float("inf")
        return Course(rate, self._rows_left, self._deadline_s - (now - self._started))

    def switched(self, model: str) -> None:
        """The job now scores on ``model``: its rate is counted afresh."""
        self.model = model
        self._rows = 0
        self._since = self._clock()
        self._paused_at_since = self._paused_s()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    @property
    def kept(self) -> bool:
        """Whether the run is still within its deadline."""
        return self.elapsed_s <= self._deadline_s
