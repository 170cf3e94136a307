"""The arithmetic of ``benchmarks/batch.py --service`` (``inferline.bench.service_jobs``)."""

from __future__ import annotations

import math

from inferline.bench.loadgen import LatencySummary, LoadResult
from inferline.bench.service_jobs import p99_ratio, phase_summary


def load_result(response_ms: list[float], errors: dict[str, int]) -> LoadResult:
    summary = LatencySummary.of([ms / 1000 for ms in response_ms])
    return LoadResult(
        rate=100.0, duration_s=1.0, deadline_s=0.1, offered_rate=100.0, achieved_rate=100.0, goodput=90.0,
        sent=len(response_ms) + sum(errors.values()), ok=len(response_ms), ok_within_deadline=len(response_ms) - 1,
        missed_deadline=1, latency=summary, response_time=summary, errors=errors, start_lag_p50_ms=0.1,
        start_lag_p99_ms=0.2, start_lag_max_ms=0.3, fell_behind=False, generator_cpu=0.1,
    )  # fmt: skip


def test_a_phase_reports_nearest_rank_response_times_in_time_answers_and_errors() -> None:
    phase = phase_summary(load_result([float(ms) for ms in range(1, 101)], {"DEADLINE_EXCEEDED": 2, "UNAVAILABLE": 1}))
    assert phase == {
        "sent": 103,
        "ok_in_time": 99,
        "p50_ms": 50.0,
        "p99_ms": 99.0,
        "errors": 3,
        "generator_fell_behind": False,
    }


def test_the_ratio_is_median_p99_beside_a_job_over_median_p99_alone() -> None:
    phases = [
        {"name": "alone", "p99_ms": 10.0},
        {"name": "job", "p99_ms": 30.0},
        {"name": "alone", "p99_ms": 20.0},
        {"name": "job", "p99_ms": 12.0},
        {"name": "alone", "p99_ms": 16.0},
    ]
    assert p99_ratio(phases) == round(21.0 / 16.0, 3)


def test_no_ratio_without_answers_on_both_sides() -> None:
    assert p99_ratio([{"name": "alone", "p99_ms": 10.0}]) is None
    assert p99_ratio([{"name": "alone", "p99_ms": 10.0}, {"name": "job", "p99_ms": math.nan}]) is None
