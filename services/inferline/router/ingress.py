"""``IngressWait``: how long a request waited before the router's handler ran, and the gateway signal.

Under overload the backlog forms in gRPC's transport, before any handler runs: the
event-loop lag (``LoopLagMonitor``) and the in-flight count stay low while calls wait tens of
milliseconds (measured at 2× the knee: ~95 ms waits, loop lag ≤ 1.5 ms). No timer inside the
process sees that wait, but the deadline does: the router's deadline is the caller's
``grpc-timeout`` counted from when the transport took the call. The gateway copies that
``grpc-timeout`` into ``x-inferline-ingress-timeout`` (gRPC consumes the original: a handler
never sees it), so at the handler::

    waited = ingress timeout - context.time_remaining()

with no clock shared between hosts. Requests that did not come through the gateway carry no
such header and give no reading, and the header counts only on calls that authenticated and
carry the gateway's secret (``router.gateway_trust``): anyone else's copy is ignored. A
reading is clamped to [0, the call's own deadline] and to ``MAX_WAIT_S``.

The other direction: every answer to an authenticated gateway request carries ``x-inferline-overloaded``,
the sheddable classes the route's admission would refuse right now ("" when none). The
gateway sheds those classes with a probability it raises on each answer that names them and
lowers on each that does not (``inferline.gateway``), so the lower classes are turned away
in Envoy's C++ before they cost the router a shed of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from inferline.core.decaying import DecayingAverage
from inferline.core.headers import INGRESS_TIMEOUT

_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
MAX_WAIT_S = 1.0
"""Largest wait one reading may report. Admission compares the average with queue-wait
targets of tens of ms, so a longer reading says nothing more, and the cap keeps one odd
reading (a gateway bug, a clock jump) from holding the average up for more than a few
half-lives."""


def parse_grpc_timeout(value: str | bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``"100m"``: 0.1), None when it is not one.

    The wire format (gRPC over HTTP/2): at most 8 digits, then one unit of H M S m u n.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit() and unit in _GRPC_TIMEOUT_UNITS):
        return None
    return int(digits) * _GRPC_TIMEOUT_UNITS[unit]


class IngressWait(DecayingAverage):
    """Measures each gateway request's wait before its handler and keeps a recent average.

    The average is exponential over requests (``alpha``) and decays with time when no
    request comes (``half_life_s``): one late reading after an idle minute must not hold
    admission shut.
    """

    def __init__(
        self, alpha: float = 0.1, half_life_s: float = 0.1, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(alpha, half_life_s, clock)

    @property
    def recent_s(self) -> float:
        """The recent average wait (seconds), decayed for the time since the last reading."""
        return self.value

    def observe(self, waited_s: float) -> None:
        """Fold one request's wait in."""
        super().observe(max(0.0, waited_s))

    def measure(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, time_remaining_s: float | None
    ) -> float | None:
        """The wait of one request, folded in; None when it did not come through the gateway.

        ``time_remaining_s``: the handler's ``context.time_remaining()`` (None: no deadline).
        """
        if time_remaining_s is None or not metadata:
            return None
        for key, value in metadata:
            if key == INGRESS_TIMEOUT:
                timeout_s = parse_grpc_timeout(value)
                if timeout_s is None:
                    return None
                # A wait never exceeds the deadline the call arrived with, nor MAX_WAIT_S.
                waited_s = min(max(0.0, timeout_s - time_remaining_s), timeout_s, MAX_WAIT_S)
                self.observe(waited_s)
                return waited_s
        return None
