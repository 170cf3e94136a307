"""``RecoveryTracker``: time from a dependency being healthy again to the first PRIMARY answer.

Operators need to know how long an outage really lasted for callers, not only for the
process supervisor: a Triton that is ready again still serves nobody until channels
reconnect and breakers close. ``healthy()`` marks the moment the dependency came back
(supervisor: Triton ready); ``primary_answered()`` closes the interval once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class RecoveryTracker:
    def __init__(self, observe: Callable[[str, float], None], clock: Clock = time.monotonic) -> None:
        self._observe = observe
        self._clock = clock
        self._healthy_since: dict[str, float] = {}
        self.last_recovery_s: float | None = None

    def healthy(self, model: str, at: float | None = None) -> None:
        """The model's dependency is healthy again (after an outage) as of ``at``."""
        self._healthy_since[model] = self._clock() if at is None else at

    def primary_answered(self, model: str) -> None:
        since = self._healthy_since.pop(model, None)
        if since is not None:
            self.last_recovery_s = self._clock() - since
            self._observe(model, self.last_recovery_s)
