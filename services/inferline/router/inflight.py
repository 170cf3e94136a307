"""``InFlightLimit``: a non-blocking bound on the calls in flight to one model."""

from __future__ import annotations

from types import TracebackType


class InFlightLimit:
    """At most ``limit`` calls in flight; over the limit a caller is refused at once.

    Algorithm: a counter. ``try_acquire`` increments it when it is below ``limit`` and
    returns True, else returns False without waiting; ``release`` decrements it. Unlike
    a semaphore nothing queues here: a refused caller degrades immediately (docs/triton.md,
    "Never cancel a call in flight": bounding the calls in flight keeps Triton's queue from growing
    without bound, and a call already in flight is never cancelled).

    Invariant: ``0 ≤ in_flight ≤ limit``. Releasing more than was acquired is a bug and
    raises; ``permit()`` hands out a ``Permit`` that releases exactly once, which is the
    safe way to pair the two. Not thread-safe: use from one event loop. It has no clock:
    nothing in it depends on time.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._in_flight = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot if one is free.

        Returns:
            True when a slot was taken (give it back with ``release``); False at the limit.
        """
        if self._in_flight >= self._limit:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by ``try_acquire``.

        Raises:
            RuntimeError: no slot is taken (more releases than acquisitions).
        """
        if self._in_flight == 0:
            raise RuntimeError("InFlightLimit.release() without a matching try_acquire()")
        self._in_flight -= 1

    def permit(self) -> Permit | None:
        """A slot wrapped in a ``Permit``, or None at the limit.

        Usage::

            permit = limit.permit()
            if permit is None:
                return degrade()
            async with permit:  # or `with permit:`; released on exit, even on error
                return await call_model()
        """
        return Permit(self) if self.try_acquire() else None


class Permit:
    """One slot of an ``InFlightLimit``, released exactly once: by ``release()`` or on leaving a ``with`` block."""

    __slots__ = ("_limit",)

    def __init__(self, limit: InFlightLimit) -> None:
        self._limit: InFlightLimit | None = limit

    @property
    def released(self) -> bool:
        return self._limit is None

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.release()

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
