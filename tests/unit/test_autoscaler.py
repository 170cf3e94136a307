"""ScalingPolicy: up at once on a long queue, down after a quiet spell, within the warm pool and the
maximum; the ``autoscale`` config section; the controller's loop over a fake Triton."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.core.config import ConfigError, load_config
from inferline.triton.autoscaler import (
    AutoscalerConfig,
    InstanceAutoscaler,
    ModelScalingConfig,
    QueueSample,
    ScalingEvent,
    ScalingPolicy,
    parse_model_bounds,
)

DEFAULT = pathlib.Path("deploy/local/inferline.yaml")


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


def test_scale_up_after_waits_for_the_queue_to_stay_long(clock: Clock) -> None:
    policy = ScalingPolicy(BOUNDS, CONFIG.model_copy(update={"scale_up_after_s": 1.0}), clock)
    assert policy.decide(2, LONG) == 2  # long from now
    clock.now += 0.5
    assert policy.decide(2, LONG) == 2
    clock.now += 0.5
    assert policy.decide(2, BETWEEN) == 2  # the spell is broken: a blip, not a step
    clock.now += 0.5
    assert policy.decide(2, LONG) == 2
    clock.now += 0.5
    assert policy.decide(2, LONG) == 2
    clock.now += 0.5
    assert policy.decide(2, LONG) == 3  # long for 1 s
    clock.now += CONFIG.up_cooldown_s
    assert policy.decide(3, LONG) == 3  # the new count must be long for 1 s again
    clock.now += 1.0
    assert policy.decide(3, LONG) == 4


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
    with pytest.raises(ValidationError, match=r"scale_down_queue_ms \(1.0\) must be below"):
        AutoscalerConfig(models={"m": BOUNDS}, scale_up_queue_ms=1.0, scale_down_queue_ms=1.0)
    with pytest.raises(ValidationError, match="extra"):
        AutoscalerConfig.model_validate({"models": {"m": {}}, "interval": 1})
    with pytest.raises(ValidationError, match="at least 1 item"):
        AutoscalerConfig(models={})


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


def _config_with(tmp_path: pathlib.Path, autoscale: Any) -> pathlib.Path:
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["autoscale"] = autoscale
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_autoscale_section_is_off_unless_present(tmp_path: pathlib.Path) -> None:
    assert load_config(DEFAULT).autoscale is None
    section = {"models": {"driver_ranker": {"min_instances": 2, "max_instances": 6}}, "scale_up_queue_ms": 8}
    config = load_config(_config_with(tmp_path, section)).autoscale
    assert config is not None and config.enabled
    assert config.models["driver_ranker"] == ModelScalingConfig(min_instances=2, max_instances=6)
    assert config.scale_up_queue_ms == 8 and config.down_cooldown_s == 60.0
    off = load_config(_config_with(tmp_path, section), environ={"INFERLINE_AUTOSCALE__ENABLED": "false"})
    assert off.autoscale is not None and not off.autoscale.enabled


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"models": {"driver_ranker": {}}, "interval": 1}, r"autoscale\.interval: Extra inputs"),
        ({"models": {"driver_ranker": {"min_instances": 3, "max_instances": 2}}}, r"autoscale\.models\.driver_ranker:"),
        ({"models": {"driver_ranker": {"min_instances": 0}}}, r"autoscale\.models\.driver_ranker\.min_instances"),
        ({"models": {"ghost": {}}}, r"autoscale\.models: unknown model 'ghost' \(.*driver_ranker"),
        ({"models": {}}, r"autoscale\.models: List should have at least 1 item|autoscale\.models: Dictionary"),
        (
            {"models": {"driver_ranker": {}}, "scale_up_queue_ms": 1, "scale_down_queue_ms": 2},
            r"autoscale: .*scale_down_queue_ms \(2\.0\) must be below scale_up_queue_ms",
        ),
    ],
)
def test_a_bad_autoscale_section_is_named(tmp_path: pathlib.Path, section: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config_with(tmp_path, section))


class FakeTriton:
    """A Triton of one model: its instance count, statistics and whether it has a warm-up."""

    def __init__(self, count: int, warmup: bool = True) -> None:
        self.count = count
        self.warmup = warmup
        self.queue_ns = 0
        self.requests = 0
        self.loads: list[int] = []

    async def instance_count(self, model: str) -> int:
        return self.count

    async def set_instance_count(self, model: str, count: int) -> None:
        self.loads.append(count)
        self.count = count

    async def queue_totals(self, model: str) -> tuple[int, int]:
        return self.queue_ns, self.requests

    async def has_warmup(self, model: str) -> bool:
        return self.warmup


async def test_the_controller_restores_the_warm_pool_after_triton_reset_the_count(clock: Clock) -> None:
    triton = FakeTriton(count=1)
    events: list[ScalingEvent] = []
    autoscaler = InstanceAutoscaler(CONFIG, triton, clock, on_change=events.append)
    await autoscaler.start()
    try:
        assert triton.loads == [2] and autoscaler.counts == {"m": 2}
        triton.count = 1  # a restarted Triton loads the repository's count
        clock.now += 1
        assert await autoscaler.step() == {"m": 2}
        assert triton.loads == [2, 2]
        triton.queue_ns, triton.requests = 100 * 20_000_000, 100  # 20 ms a request
        clock.now += CONFIG.up_cooldown_s  # the restore was a change: the next waits its cool-down
        assert await autoscaler.step() == {"m": 3}
        assert [(e.before, e.after) for e in events] == [(1, 2), (1, 2), (2, 3)]
        assert events[-1].sample == QueueSample(20.0, 100) and events[-1].ready_s >= events[-1].decided_s
    finally:
        await autoscaler.stop()


async def test_the_controller_warns_of_a_model_without_warm_up(caplog: pytest.LogCaptureFixture) -> None:
    autoscaler = InstanceAutoscaler(CONFIG, FakeTriton(count=2, warmup=False))
    with caplog.at_level(logging.WARNING, logger="inferline.triton.autoscaler"):
        await autoscaler.start()
    await autoscaler.stop()
    assert "model m has no model_warmup" in caplog.text
