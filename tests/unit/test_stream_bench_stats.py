"""The stream benchmark's figures from output entries: drain rate, offered rate, latency, recovery."""

from __future__ import annotations

import math

import pytest

from inferline.bench.stream_stats import (
    StreamOutput,
    drain_rate,
    latency,
    offered_rate,
    recovery_s,
    served_by_shares,
)


def out(event_ms: int, output_ms: int, served_by: str = "PRIMARY") -> StreamOutput:
    return StreamOutput(f"{event_ms}-0", event_ms, output_ms, served_by)


def test_drain_rate_leaves_out_the_workers_start_and_the_stragglers() -> None:
    start_up = [out(0, 1_000), out(0, 4_000)]  # a first output, then a stall while it warms up
    steady = [out(0, 5_000 + 2 * i) for i in range(16)]  # 500 events/s
    backlog = [*start_up, *steady, out(0, 9_000), out(0, 12_000)]  # and two stragglers
    assert drain_rate(backlog) == pytest.approx(500.0)
    assert drain_rate(backlog, trim=0) == pytest.approx(19 / 11)  # first to last output
    assert math.isnan(drain_rate(backlog[:1]))
    assert math.isnan(drain_rate([out(0, 7), out(0, 7)], trim=0))  # no time between them: no rate


def test_offered_rate_is_what_the_events_times_say() -> None:
    assert offered_rate([out(1000 + 4 * i, 9_999) for i in range(251)]) == pytest.approx(250.0)


def test_latency_is_output_append_minus_event_time() -> None:
    summary = latency([out(100, 100 + ms) for ms in range(1, 101)])  # 1..100 ms
    assert (summary.count, summary.p50_ms, summary.p99_ms, summary.max_ms) == (100, 50.0, 99.0, 100.0)
    assert latency([out(100, 99)]).max_ms == 0.0  # clocks a millisecond apart: not negative


def test_recovery_runs_from_the_bursts_last_event_to_its_last_output() -> None:
    burst = [out(10_000, 10_500), out(20_000, 31_250), out(15_000, 31_000)]
    assert recovery_s(burst) == 11.25
    assert recovery_s([out(20_000, 19_999)]) == 0.0
    assert math.isnan(recovery_s([]))


def test_served_by_shares() -> None:
    outputs = [out(0, 1), out(0, 1), out(0, 1, "LIGHT"), out(0, 1, "PRIMARY")]
    assert served_by_shares(outputs) == {"LIGHT": 0.25, "PRIMARY": 0.75}
    assert served_by_shares([]) == {}
