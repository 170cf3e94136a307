"""DeadlineChoice: the cheapest variant, or with a deadline the cheapest whose measured rate keeps it."""

from __future__ import annotations

import math

from inferline.batch.scoring import ModelTarget
from inferline.batch.variant_choice import Candidate, DeadlineChoice


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
