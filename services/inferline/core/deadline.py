"""``Deadline``: the caller's time budget as a monotonic absolute expiry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute expiry on a monotonic clock (seconds).

    Built from the caller's gRPC deadline so every layer asks the same question,
    "how much time is left?", against one clock that never jumps.
    """

    expires_at: float
    clock: Clock = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    @classmethod
    def from_context(
        cls, context: grpc.aio.ServicerContext[Any, Any], default_s: float, clock: Clock = time.monotonic
    ) -> Deadline:
        """The caller's deadline, or ``default_s`` from now when the caller set none."""
        remaining = context.time_remaining()
        # grpc reports "no deadline" as None or as a huge number (~ years); treat both as unset.
        if remaining is None or remaining > 10 * 365 * 86400:
            remaining = default_s
        return cls(clock() + remaining, clock)

    def remaining_s(self) -> float:
        return max(0.0, self.expires_at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.expires_at

    def split(self, reserve_s: float) -> Deadline:
        """A deadline that expires ``reserve_s`` earlier, keeping that reserve for later steps."""
        return Deadline(self.expires_at - reserve_s, self.clock)


def deadline_passed(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the caller's gRPC deadline has run out (False when it set none).

    A cancelled handler whose deadline has passed was cancelled by that deadline: no answer
    came in time. One whose deadline has not passed was cancelled by its caller.
    """
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
