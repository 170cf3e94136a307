"""ScalingPolicy: up at once on a long queue, down after a quiet spell, within the warm pool and the maximum."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.triton.autoscaler import (
    AutoscalerConfig,
    ModelScalingConfig,
    QueueSample,
    ScalingPolicy,
    parse_model_bounds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


BOUNDS = ModelScalingConfig(min_instances=2, max_instances=4)
CONFIG = AutoscalerConfig(
    models={"m": BOUNDS},
    scale_up_queue_ms=5.0,
    scale_down_queue_ms=1.0,
    scale_down_after_s=30.0,
    up_cooldown_s=5.0,
    down_cooldown_s=60.0,
)
LONG = QueueSample(queue_ms=20.0, requests=100)
SHORT = QueueSample(queue_ms=0.2, requests=100)
IDLE = QueueSample(queue_ms=0.0, requests=0)
BETWEEN = QueueSample(queue_ms=3.0, requests=100)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock: Clock) -> ScalingPolicy:
    return ScalingPolicy(BOUNDS, CONFIG, clock)


def test_long_queue_adds_an_instance_at_once(policy: ScalingPolicy) -> None:
    assert policy.decide(2, LONG) == 3


def test_up_waits_for_its_cool_down_then_goes_on_to_the_maximum(policy: ScalingPolicy, clock: Clock) -> None:
    assert policy.decide(2, LONG) == 3
    clock.now += 4.9
    assert policy.decide(3, LONG) == 3
    clock.now += 0.1
    assert policy.decide(3, LONG) == 4
    clock.now += 60
    assert policy.decide(4, LONG) == 4


def test_queue_between_the_thresholds_changes_nothing(policy: ScalingPolicy, clock: Clock) -> None:
    for _ in range(10):
        clock.now += 100
        assert policy.decide(3, BETWEEN) == 3


def test_down_needs_a_quiet_spell_and_the_down_cool_down(policy: ScalingPolicy, clock: Clock) -> None:
    assert policy.decide(2, LONG) == 3  # a change at t=1000
    clock.now += 1
    assert policy.decide(3, SHORT) == 3  # quiet from t=1001
    clock.now += 30
    assert policy.decide(3, SHORT) == 3  # quiet for 30 s, but the last change is only 31 s old
    clock.now += 29
    assert policy.decide(3, IDLE) == 2  # 60 s since the change, 59 s quiet


def test_a_busy_sample_restarts_the_quiet_spell(policy: ScalingPolicy, clock: Clock) -> None:
    clock.now += 100
    assert policy.decide(3, SHORT) == 3
    clock.now += 29
    assert policy.decide(3, BETWEEN) == 3
    clock.now += 29
    assert policy.decide(3, SHORT) == 3
    clock.now += 30
    assert policy.decide(3, SHORT) == 2


def test_never_below_the_warm_pool(policy: ScalingPolicy, clock: Clock) -> None:
    for _ in range(5):
        clock.now += 1000
        assert policy.decide(2, IDLE) == 2


def test_a_count_outside_the_bounds_is_brought_back(policy: ScalingPolicy) -> None:
    assert policy.decide(1, IDLE) == 2
    assert policy.decide(7, LONG) == 4


def test_step_up_adds_several_but_not_past_the_maximum(clock: Clock) -> None:
    config = CONFIG.model_copy(update={"step_up": 3})
    assert ScalingPolicy(BOUNDS, config, clock).decide(2, LONG) == 4


def test_config_refuses_bounds_and_thresholds_that_cannot_work() -> None:
    with pytest.raises(ValidationError, match="max_instances"):
        ModelScalingConfig(min_instances=3, max_instances=2)
    with pytest.raises(ValidationError, match="scale_down_queue_ms must be below"):
        AutoscalerConfig(models={}, scale_up_queue_ms=1.0, scale_down_queue_ms=1.0)
    with pytest.raises(ValidationError, match="extra"):
        AutoscalerConfig.model_validate({"models": {}, "interval": 1})


def test_model_bounds_parse_and_refuse_clearly() -> None:
    assert parse_model_bounds("driver_ranker=2:8") == (
        "driver_ranker",
        ModelScalingConfig(min_instances=2, max_instances=8),
    )
    for spec in ("driver_ranker", "m=2", "=1:2", "m=a:2", "m=2:-1"):
        with pytest.raises(ValueError, match="NAME=MIN:MAX"):
            parse_model_bounds(spec)
    with pytest.raises(ValueError, match="max_instances"):
        parse_model_bounds("m=3:2")


def test_cli_refuses_bad_bounds_before_connecting() -> None:
    result = CliRunner().invoke(cli, ["triton", "autoscale", "--triton-url", "127.0.0.1:1", "--model", "m=3:2"])
    assert result.exit_code == 2
    assert "max_instances (2) < min_instances (3)" in result.output
