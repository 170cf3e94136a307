"""The load-step benchmark's arithmetic: time to added capacity, instance-seconds, cost per 1K,
windowed p99, busy time across a restart, and the scenario syntax."""

from __future__ import annotations

import math

import pytest

from inferline.bench.autoscale import (
    Scenario,
    StepPlan,
    busy_seconds,
    cost_per_1k,
    instance_seconds,
    p99_window_ms,
    time_to_capacity,
)
from inferline.bench.loadgen import OK, RequestRecord
from inferline.triton.autoscaler import QueueSample, ScalingEvent
from inferline.triton.statistics import ModelTotals

SAMPLE = QueueSample(queue_ms=9.0, requests=50)


def event(before: int, after: int, decided: float, ready: float) -> ScalingEvent:
    return ScalingEvent("m", before, after, SAMPLE, decided, ready)


def test_time_to_capacity_is_the_first_increase_decided_after_the_step() -> None:
    events = [event(1, 2, 5.0, 5.5), event(2, 3, 12.0, 12.8), event(3, 4, 20.0, 21.0)]
    assert time_to_capacity(10.0, events) == pytest.approx((2.0, 2.8))
    assert time_to_capacity(25.0, events) == (None, None)
    assert time_to_capacity(0.0, [event(2, 1, 3.0, 3.1)]) == (None, None)  # a removal adds nothing


def test_instance_seconds_count_each_change_from_when_it_was_ready() -> None:
    events = [event(1, 2, 4.0, 5.0), event(2, 3, 7.0, 8.0)]
    # [0, 5): 1 instance, [5, 8): 2, [8, 10): 3
    assert instance_seconds(1, events, 0.0, 10.0) == pytest.approx(5 + 6 + 6)
    # a window after the first change starts at its count
    assert instance_seconds(1, events, 6.0, 10.0) == pytest.approx(2 * 2 + 3 * 2)
    assert instance_seconds(2, [], 0.0, 3.0) == pytest.approx(6.0)
    assert instance_seconds(2, [], 3.0, 3.0) == 0.0


def test_cost_per_1k_prices_seconds_per_thousand_requests() -> None:
    assert cost_per_1k(3600.0, 0.20, 1000) == pytest.approx(0.20)
    assert cost_per_1k(36.0, 3.00, 500) == pytest.approx(0.06)
    assert math.isnan(cost_per_1k(1.0, 0.2, 0))


def test_p99_window_uses_response_time_of_ok_answers_in_the_window() -> None:
    records = [RequestRecord(i, i * 0.01, 0.001, 0.010, OK) for i in range(100)]  # 11 ms each, 0..0.99 s
    records.append(RequestRecord(100, 0.5, 0.0, 5.0, "DEADLINE_EXCEEDED"))  # errors do not count
    records.append(RequestRecord(101, 2.0, 0.0, 9.0, OK))  # outside the window
    assert p99_window_ms(records, 0.0, 1.0) == pytest.approx(11.0)
    slow = [*records, *(RequestRecord(200 + i, 0.2, 0.1, 0.1, OK) for i in range(3))]  # 3 of 103 at 200 ms
    assert p99_window_ms(slow, 0.0, 1.0) == pytest.approx(200.0)
    assert math.isnan(p99_window_ms(records, 5.0, 6.0))


def test_busy_seconds_are_zero_across_a_restart() -> None:
    assert busy_seconds(ModelTotals(busy_ns=1_000_000_000), ModelTotals(busy_ns=3_500_000_000)) == 2.5
    assert busy_seconds(ModelTotals(busy_ns=5), ModelTotals(busy_ns=1)) == 0.0
    assert busy_seconds(None, ModelTotals(busy_ns=1)) == 0.0


def test_scenarios_parse_and_refuse_clearly() -> None:
    assert Scenario.parse("off:1") == Scenario("off, 1 instance", 1, 1, controller=False)
    assert Scenario.parse("on:2:4") == Scenario("on, warm pool 2, max 4", 2, 4, controller=True)
    for spec in ("off", "off:0", "on:3:2", "on:1", "auto:1:2", "on:a:2"):
        with pytest.raises(ValueError, match="off:N or on:MIN:MAX"):
            Scenario.parse(spec)


def test_the_step_rates_are_fractions_of_the_knee() -> None:
    plan = StepPlan(knee=1000.0)
    assert (plan.low_rate, plan.high_rate) == (300.0, 900.0)
