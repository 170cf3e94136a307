"""DeadlineChoice: the cheapest variant, or with a deadline the cheapest whose measured rate keeps it."""

from __future__ import annotations

import math

from inferline.batch.scoring import ModelTarget
from inferline.batch.variant_choice import Candidate, Course, DeadlineChoice


def candidate(model: str, cost: float) -> Candidate:
    target = ModelTarget(model, model, "features", "score", ("a",), priority=3, request_rows=128, device="cpu")
    return Candidate(target, cost)


CPU, GPU, TPU = candidate("cpu", 0.2), candidate("gpu", 2.0), candidate("tpu", 4.0)


class Rates:
    """Measured rows/s per model, recording which were measured (a stand-in for Triton)."""

    def __init__(self, **rates: float) -> None:
        self.rates = rates
        self.measured: list[str] = []

    async def __call__(self, target: ModelTarget) -> float:
        self.measured.append(target.model)
        return self.rates[target.model]


async def test_without_a_deadline_the_cheapest_and_nothing_measured() -> None:
    rates = Rates(cpu=10.0, gpu=1e6, tpu=1e6)
    choice = await DeadlineChoice().choose([GPU, TPU, CPU], 1_000_000, None, rates)
    assert choice.target.model == "cpu" and choice.deadline_met is None
    assert rates.measured == []


async def test_the_cheapest_that_keeps_the_deadline_measuring_no_further() -> None:
    # 100,000 rows in 100 s with 80 % for scoring: at least 1,250 rows/s.
    rates = Rates(cpu=1_000.0, gpu=2_000.0, tpu=50_000.0)
    choice = await DeadlineChoice().choose([TPU, GPU, CPU], 100_000, 100.0, rates)
    assert choice.target.model == "gpu" and choice.deadline_met is True
    assert rates.measured == ["cpu", "gpu"]  # cheapest first; the dearer TPU never probed
    assert choice.summary()["measured_rows_per_s"] == {"cpu": 1_000.0, "gpu": 2_000.0}


async def test_the_cheap_one_when_it_is_fast_enough() -> None:
    choice = await DeadlineChoice().choose([GPU, CPU], 1_000, 100.0, Rates(cpu=100.0, gpu=1e6))
    assert choice.target.model == "cpu" and choice.deadline_met is True


async def test_none_keeps_it_the_fastest_measured_and_says_so() -> None:
    rates = Rates(cpu=100.0, gpu=math.nan, tpu=300.0)
    choice = await DeadlineChoice().choose([CPU, GPU, TPU], 1_000_000, 60.0, rates)
    assert choice.target.model == "tpu" and choice.deadline_met is False
    assert "no variant keeps the 60 s deadline" in choice.reason
    assert choice.summary()["measured_rows_per_s"]["gpu"] is None  # the probe failed


async def test_nothing_measurable_falls_back_to_the_cheapest() -> None:
    choice = await DeadlineChoice().choose([GPU, CPU], 10, 60.0, Rates(cpu=math.nan, gpu=math.nan))
    assert choice.target.model == "cpu" and choice.deadline_met is False


async def test_unknown_row_count_takes_the_cheapest_unmeasured() -> None:
    rates = Rates(cpu=1.0, gpu=1.0)
    choice = await DeadlineChoice().choose([GPU, CPU], None, 60.0, rates)
    assert choice.target.model == "cpu" and choice.deadline_met is None and rates.measured == []


# --- a running job behind its deadline (DeadlineChoice.recheck) -----------------------------


async def test_a_job_on_course_keeps_its_variant_and_measures_nothing() -> None:
    rates = Rates(gpu=10_000.0)
    course = Course(rate=1_000.0, rows_left=50_000, time_left_s=60.0)  # 50 s of 60
    assert not course.behind
    assert await DeadlineChoice().recheck([CPU, GPU], CPU.target, course, {"cpu": 1_000.0}, rates) is None
    assert rates.measured == []


async def test_behind_it_takes_the_cheapest_variant_whose_projected_rate_keeps_the_deadline() -> None:
    # Scoring-bound: the job runs at its variant's measured rate, so nothing else takes time and
    # a variant's rate is the job's on it. 30,000 rows in 20 s, 80 %: at least 1,875 rows/s.
    course = Course(rate=1_000.0, rows_left=30_000, time_left_s=20.0)
    rates = Rates(gpu=2_000.0, tpu=50_000.0)
    known = {"cpu": 1_000.0}
    switch = await DeadlineChoice().recheck([TPU, GPU, CPU], CPU.target, course, known, rates)
    assert switch is not None and switch.target.model == "gpu" and switch.deadline_met
    assert rates.measured == ["gpu"]  # the dearer TPU is not probed
    assert known == {"cpu": 1_000.0, "gpu": 2_000.0}  # kept for the next look: measured once a run
    assert "behind the deadline at 1,000 rows/s" in switch.reason


async def test_time_spent_outside_scoring_stays_on_any_variant() -> None:
    # The variant scores 10,000 rows/s but the job commits 1,000: 0.9 ms of every row's 1 ms is
    # feature reads and writing. A variant 100x faster takes the job to ~1,110 rows/s only.
    course = Course(rate=1_000.0, rows_left=100_000, time_left_s=60.0)
    switch = await DeadlineChoice().recheck([CPU, GPU], CPU.target, course, {"cpu": 10_000.0}, Rates(gpu=1e6))
    assert switch is None


async def test_when_none_keeps_it_the_fastest_if_it_is_worth_switching() -> None:
    course = Course(rate=1_000.0, rows_left=1_000_000, time_left_s=60.0)
    rates = Rates(gpu=3_000.0, tpu=math.nan)
    switch = await DeadlineChoice().recheck([CPU, GPU, TPU], CPU.target, course, {"cpu": 1_000.0}, rates)
    assert switch is not None and switch.target.model == "gpu" and not switch.deadline_met
    assert "no variant keeps it" in switch.reason


async def test_variants_left_this_run_and_the_current_one_are_never_taken() -> None:
    course = Course(rate=1_000.0, rows_left=100_000, time_left_s=10.0)
    known = {"cpu": 1_000.0, "gpu": 1_000.0, "tpu": 1e6}
    switch = await DeadlineChoice().recheck([CPU, GPU, TPU], GPU.target, course, known, Rates(), left={"tpu"})
    assert switch is None  # the CPU is no faster; the TPU was left already


def test_a_course_with_no_time_left_is_behind_and_one_with_no_rows_left_is_not() -> None:
    assert Course(rate=1e9, rows_left=1, time_left_s=-1.0).behind
    assert not Course(rate=0.0, rows_left=0, time_left_s=-1.0).behind
