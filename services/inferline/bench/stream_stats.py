"""The numbers of the stream benchmark, from the output entries alone (pure functions).

Every figure comes from two server clocks written into the stream entries: an event's
time (its entry id's milliseconds on Redis, the server's receive time on JetStream, carried
in each output as ``event_time_ms``) and its output's append time (the output entry's id
or receive time). The producer's and worker's own clocks, and their scheduling on a busy
machine, do not enter: what is measured is "event appended → result appended".
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from inferline.bench.loadgen import LatencySummary


@dataclass(frozen=True, slots=True)
class StreamOutput:
    """One output entry as the benchmark reads it back."""

    event_id: str
    event_time_ms: int
    output_ms: int
    served_by: str


def drain_rate(outputs: Sequence[StreamOutput], trim: float = 0.1) -> float:
    """Events/s of a worker draining a backlog: outputs per second between the ``trim`` and
    ``1 - trim`` quantiles of the output append times. The worker's start-up (connections,
    the first reads and model calls) and the last stragglers are left out: what remains is
    the rate it sustains while it always has work."""
    times = sorted(o.output_ms for o in outputs)
    first, last = int(len(times) * trim), math.ceil(len(times) * (1 - trim)) - 1
    if last - first < 1:
        return math.nan
    span_s = (times[last] - times[first]) / 1000
    return (last - first) / span_s if span_s > 0 else math.nan


def offered_rate(outputs: Sequence[StreamOutput]) -> float:
    """Events/s the producer actually appended (from the events' own times): what a phase offered,
    which on a busy machine can fall short of the rate it aimed at."""
    if len(outputs) < 2:
        return math.nan
    times = [o.event_time_ms for o in outputs]
    span_s = (max(times) - min(times)) / 1000
    return (len(outputs) - 1) / span_s if span_s > 0 else math.nan


def latency(outputs: Iterable[StreamOutput]) -> LatencySummary:
    """Event appended → result appended, per event (ms resolution: the engines' clocks)."""
    return LatencySummary.of(max(0, o.output_ms - o.event_time_ms) / 1000 for o in outputs)


def recovery_s(burst: Sequence[StreamOutput]) -> float:
    """Seconds from the burst's last event appended to the last output of its events: how long
    the backlog the burst left took to drain (0 when the worker kept up)."""
    if not burst:
        return math.nan
    end_ms = max(o.event_time_ms for o in burst)
    return max(0, max(o.output_ms for o in burst) - end_ms) / 1000


def served_by_shares(outputs: Sequence[StreamOutput]) -> dict[str, float]:
    """Share of the outputs per ``served_by`` (PRIMARY unless the worker degraded some)."""
    counts = Counter(o.served_by for o in outputs)
    return {k: round(v / len(outputs), 4) for k, v in sorted(counts.items())} if outputs else {}
