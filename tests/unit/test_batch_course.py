"""DeadlineCourse: a running job's rate on its variant, pauses left out, and when to look again."""

from __future__ import annotations

import pytest

from inferline.batch.course import RECHECK_S, DeadlineCourse


def course(now: list[float], paused: list[float], rows_left: int = 10_000) -> DeadlineCourse:
    return DeadlineCourse(
        60.0, rows_left, "cpu", lambda: paused[0], started=now[0] - 5.0, clock=lambda: now[0]
    )  # the run started 5 s before: the first choice's probes


def test_the_rate_leaves_out_the_time_the_job_was_paused() -> None:
    now, paused = [100.0], [7.0]
    watch = course(now, paused)
    now[0] += 4.0
    paused[0] += 2.0  # half of it yielding to online traffic
    watch.committed(1_000, "cpu")
    seen = watch.due()
    assert seen is not None
    assert seen.rate == pytest.approx(500.0)  # 1,000 rows in the 2 s it ran
    assert seen.rows_left == 9_000
    assert seen.time_left_s == pytest.approx(60.0 - 9.0)


def test_it_looks_again_only_every_recheck_interval_and_after_rows_on_the_current_variant() -> None:
    now, paused = [0.0], [0.0]
    watch = course(now, paused)
    now[0] += RECHECK_S
    assert watch.due() is None  # no chunk committed yet: no rate
    watch.committed(300, "gpu")  # a chunk another variant scored: counts down, not toward the rate
    assert watch.due() is None
    watch.committed(300, "cpu")
    assert watch.due() is not None
    watch.committed(300, "cpu")
    assert watch.due() is None  # looked a moment ago
    now[0] += RECHECK_S
    seen = watch.due()
    assert seen is not None and seen.rows_left == 10_000 - 900


def test_a_switch_counts_the_rate_afresh_on_the_new_variant() -> None:
    now, paused = [0.0], [0.0]
    watch = course(now, paused)
    now[0] += 10.0
    watch.committed(1_000, "cpu")
    watch.switched("gpu")
    now[0] += 1.0
    watch.committed(500, "cpu")  # finished on the old variant after the switch: not the new one's
    watch.committed(2_000, "gpu")
    seen = watch.due()
    assert seen is not None and seen.rate == pytest.approx(2_000.0)
    assert watch.model == "gpu"


def test_nothing_to_look_at_once_every_row_is_done() -> None:
    now, paused = [0.0], [0.0]
    watch = course(now, paused, rows_left=100)
    now[0] += RECHECK_S
    watch.committed(100, "cpu")
    assert watch.due() is None


def test_the_deadline_is_kept_while_the_run_is_within_it() -> None:
    now, paused = [0.0], [0.0]
    watch = course(now, paused)  # started 5 s ago, 60 s deadline
    now[0] = 55.0
    assert watch.kept
    now[0] = 55.001
    assert not watch.kept
