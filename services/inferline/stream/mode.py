"""``LagSwitch``: primary or light model, from the consumer group's lag, with hysteresis.

Light when the lag rises above ``high``; primary again only when it falls below ``low``.
The gap keeps the worker from flapping around one threshold: the light model drains
the backlog faster, which lowers the lag, which would switch it straight back.
"""

from __future__ import annotations


class LagSwitch:
    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError("need 0 <= low < high")
        self._high = high
        self._low = low
        self.light = False

    def update(self, lag: int) -> bool:
        """Take a new lag reading; True while the light model is in use."""
        if not self.light and lag > self._high:
            self.light = True
        elif self.light and lag < self._low:
            self.light = False
        return self.light
