"""Admission policies alone: adaptive limits, the per-route controller, the loop-lag signal."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferline.core.config import AdmissionConfig, TrafficClassConfig
from inferline.core.decaying import DecayingAverage
from inferline.core.errors import Shed
from inferline.router.admission import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    PROTECTED_MISS_MIN_WAIT_S,
    AdmissionController,
    Verdict,
)
from inferline.router.limits import AimdLimit, GradientLimit, build_limit
from inferline.router.loop_lag import LoopLagMonitor

CLASSES = {
    "critical": TrafficClassConfig(priority=1, default_deadline_ms=100, sheddable=False, queue_wait_target_ms=100),
    "standard": TrafficClassConfig(priority=2, default_deadline_ms=250, limit_share=0.8, queue_wait_target_ms=30),
    "batch": TrafficClassConfig(priority=3, default_deadline_ms=2000, limit_share=0.5, queue_wait_target_ms=15),
}


class FixedLimit:
    """A limit that never moves, so the controller's own rules are tested alone."""

    def __init__(self, limit: int, saturated: bool = True) -> None:
        self.limit = limit
        self.saturated = saturated
        self.long_rtt_s = 0.0
        self.samples: list[tuple[float, int, bool]] = []

    def on_sample(self, rtt_s: float, in_flight: int, dropped: bool) -> None:
        self.samples.append((rtt_s, in_flight, dropped))


def controller(
    limit: int = 10, queue_wait_s: float = 0.0, saturated: bool = True, **config: object
) -> tuple[AdmissionController, FixedLimit]:
    fixed = FixedLimit(limit, saturated)
    wait = [queue_wait_s]
    ctl = AdmissionController("r", AdmissionConfig(**config), CLASSES, lambda: wait[0], limit=fixed)  # type: ignore[arg-type]
    return ctl, fixed


def fill(ctl: AdmissionController, traffic_class: str, n: int) -> list[object]:
    return [ctl.admit(traffic_class) for _ in range(n)]


# --- the controller ---------------------------------------------------------------------


def test_lowest_class_is_shed_first_as_in_flight_grows() -> None:
    ctl, _ = controller(limit=10)
    fill(ctl, "critical", 5)  # batch may fill 50% of 10
    with pytest.raises(Shed):
        ctl.admit("batch")
    assert ctl.admit("standard").verdict is Verdict.ADMIT  # standard may fill 80%
    fill(ctl, "standard", 2)
    with pytest.raises(Shed):
        ctl.admit("standard")
    assert ctl.admit("critical").verdict is Verdict.ADMIT
    assert ctl.in_flight == 9
    assert ctl.shed_count == 2


def test_critical_over_the_limit_is_degraded_not_shed() -> None:
    ctl, _ = controller(limit=4)
    fill(ctl, "critical", 4)
    permit = ctl.admit("critical")
    assert permit.verdict is Verdict.DEGRADE
    assert ctl.in_flight == 4, "a degraded request holds no slot"
    assert ctl.degraded_count == 1
    permit.release()  # harmless
    assert ctl.in_flight == 4


def test_critical_with_no_degraded_answer_runs_over_the_limit_and_holds_a_slot() -> None:
    ctl, fixed = controller(limit=4)
    fill(ctl, "critical", 4)
    permit = ctl.admit("critical", degradable=False)
    assert permit.verdict is Verdict.ADMIT
    assert ctl.in_flight == 5, "it runs, so it counts"
    assert (ctl.over_limit_count, ctl.degraded_count, ctl.shed_count) == (1, 0, 0)
    with pytest.raises(Shed):  # the sheddable classes are still refused at their shares
        ctl.admit("batch", degradable=False)
    permit.release()
    assert ctl.in_flight == 4 and len(fixed.samples) == 1


def test_critical_with_no_degraded_answer_is_shed_when_the_route_does_not_degrade() -> None:
    ctl, _ = controller(limit=2, degrade_over_limit=False)
    fill(ctl, "critical", 2)
    with pytest.raises(Shed):
        ctl.admit("critical", degradable=False)


def test_critical_is_shed_when_the_route_does_not_degrade() -> None:
    ctl, _ = controller(limit=2, degrade_over_limit=False)
    fill(ctl, "critical", 2)
    with pytest.raises(Shed):
        ctl.admit("critical")


def test_queue_wait_over_the_class_target_sheds_that_class_only() -> None:
    ctl, _ = controller(limit=100, queue_wait_s=0.020)  # between batch (15 ms) and standard (30 ms)
    with pytest.raises(Shed) as shed:
        ctl.admit("batch")
    assert "queue wait 20.0 ms" in shed.value.message
    assert ctl.admit("standard").verdict is Verdict.ADMIT
    assert ctl.admit("critical").verdict is Verdict.ADMIT


def test_a_request_that_waited_long_before_its_handler_is_judged_by_its_own_wait() -> None:
    ctl, _ = controller(limit=100)  # the route's signal says no wait
    with pytest.raises(Shed) as shed:
        ctl.admit("batch", waited_s=0.020)
    assert "queue wait 20.0 ms" in shed.value.message
    assert ctl.admit("standard", waited_s=0.020).verdict is Verdict.ADMIT
    assert ctl.admit("critical", waited_s=0.200).verdict is Verdict.DEGRADE  # over its 100 ms target: degraded
    assert ctl.admit("batch").verdict is Verdict.ADMIT  # the next request is judged by its own wait


def test_a_request_whose_queue_something_upstream_bounds_is_shed_only_over_its_share() -> None:
    # The gateway's in-flight limit bounds the wait: shedding after it would only be slow.
    ctl, _ = controller(limit=10, queue_wait_s=0.020)
    assert ctl.admit("batch", waited_s=0.050, queue_wait=False).verdict is Verdict.ADMIT
    assert ctl.overloaded() == "batch"  # the gateway still hears of the wait
    fill(ctl, "critical", 4)
    with pytest.raises(Shed):  # 5 of 10 in flight: batch's 50 % share
        ctl.admit("batch", queue_wait=False)


def test_overloaded_names_the_classes_admit_would_refuse_lowest_first() -> None:
    ctl, _ = controller(limit=10)
    assert ctl.overloaded() == ""
    fill(ctl, "critical", 5)
    assert ctl.overloaded() == "batch"  # at batch's 50 % share
    fill(ctl, "critical", 3)
    assert ctl.overloaded() == "batch,standard"  # and at standard's 80 %
    fill(ctl, "critical", 2)
    assert ctl.overloaded() == "batch,standard"  # critical is never named: it is degraded, not shed


def test_shares_signal_overload_only_while_the_path_is_saturated() -> None:
    # A burst over batch's share while latency stays flat: the limit has not grown to the
    # load yet, nobody waits. The gateway must not be told to shed, and a gateway request
    # whose queue the gateway bounds is admitted; a direct call is still held to its share.
    ctl, fixed = controller(limit=10, saturated=False)
    fill(ctl, "critical", 8)
    assert ctl.overloaded() == ""
    assert ctl.admit("batch", queue_wait=False).verdict is Verdict.ADMIT
    with pytest.raises(Shed):
        ctl.admit("batch")
    fixed.saturated = True  # the limit saw queuing: now the shares count for the gateway too
    assert ctl.overloaded() == "batch,standard"
    with pytest.raises(Shed):
        ctl.admit("batch", queue_wait=False)


def test_queue_wait_signals_overload_whether_or_not_the_limit_saw_queuing() -> None:
    ctl, _ = controller(limit=100, queue_wait_s=0.020, saturated=False)
    assert ctl.overloaded() == "batch"


def test_overloaded_follows_the_queue_wait_signal() -> None:
    ctl, _ = controller(limit=100, queue_wait_s=0.020)
    assert ctl.overloaded() == "batch"
    ctl, _ = controller(limit=100, queue_wait_s=0.040)
    assert ctl.overloaded() == "batch,standard"
    ctl, _ = controller(limit=100, queue_wait_s=10.0, enabled=False)
    assert ctl.overloaded() == ""  # admission off: the gateway is never told to shed


def test_release_frees_the_slot_and_feeds_the_limit() -> None:
    ctl, fixed = controller(limit=2)
    first = ctl.admit("critical")
    ctl.admit("critical")
    assert ctl.admit("critical").verdict is Verdict.DEGRADE
    first.release(dropped=True)
    first.release()  # a second release does nothing
    assert ctl.in_flight == 1
    assert ctl.admit("critical").verdict is Verdict.ADMIT
    assert len(fixed.samples) == 1
    rtt, in_flight, dropped = fixed.samples[0]
    assert 0 <= rtt < 1 and in_flight == 1 and dropped


def test_release_without_sample_leaves_the_limit_alone() -> None:
    ctl, fixed = controller()
    ctl.admit("standard").release(sample=False)
    assert ctl.in_flight == 0 and fixed.samples == []


def test_retry_hint_is_bounded() -> None:
    ctl, _ = controller(limit=100, queue_wait_s=5.0)
    with pytest.raises(Shed) as shed:
        ctl.admit("batch")
    assert shed.value.retry_after_s == MAX_RETRY_AFTER_S
    ctl, _ = controller(limit=1)
    ctl.admit("critical")
    with pytest.raises(Shed) as shed:
        ctl.admit("batch")
    assert shed.value.retry_after_s == MIN_RETRY_AFTER_S


def test_disabled_admission_admits_everything() -> None:
    ctl, _ = controller(limit=1, queue_wait_s=10.0, enabled=False)
    assert all(p.verdict is Verdict.ADMIT for p in fill(ctl, "batch", 50))  # type: ignore[attr-defined]


QUEUED_S = PROTECTED_MISS_MIN_WAIT_S
"""A wait before the handler that makes a protected request's miss count."""


def test_protected_misses_shed_every_sheddable_class_until_critical_is_in_time_again() -> None:
    ctl, _ = controller(limit=100)
    ctl.admit("critical").release(missed=False)
    ctl.admit("critical", QUEUED_S).release(missed=True)  # one miss: a share of 0.02, at the threshold
    assert not ctl.protecting and ctl.overloaded() == ""
    ctl.admit("critical", QUEUED_S).release(missed=True)
    assert ctl.protecting
    assert ctl.overloaded() == "batch,standard"  # the gateway is told, lowest first
    with pytest.raises(Shed, match="yielding to classes that miss their deadline"):
        ctl.admit("standard")
    # A gateway call of a class the gateway bounds has waited already: the gateway sheds the
    # rest of its class on the signal, fast, and this one is served.
    assert ctl.admit("batch", queue_wait=False).verdict is Verdict.ADMIT
    assert ctl.admit("critical").verdict is Verdict.ADMIT  # the protected class itself runs on
    for _ in range(60):
        ctl.admit("critical").release(missed=False)
    assert not ctl.protecting and ctl.overloaded() == ""
    assert ctl.admit("standard").verdict is Verdict.ADMIT


def test_a_dropped_protected_answer_is_a_miss_and_a_lower_class_miss_is_not() -> None:
    ctl, _ = controller(limit=100)
    for _ in range(5):
        ctl.admit("standard", QUEUED_S).release(dropped=True)  # the lower classes' misses never protect anyone
    assert not ctl.protecting
    for _ in range(2):
        ctl.admit("critical", QUEUED_S).release(dropped=True)  # a dropped answer is a miss too
    assert ctl.protecting


def test_misses_no_queueing_explains_never_make_the_router_shed_the_lower_classes() -> None:
    # Short deadlines on an idle router: every protected answer misses (degraded for the
    # deadline, or DEADLINE_EXCEEDED), and none of it is the lower classes' doing.
    ctl, _ = controller(limit=100, queue_wait_s=0.0004)
    for _ in range(50):
        ctl.admit("critical", 0.0002).release(dropped=True)
        ctl.admit("critical").release(missed=True)
    assert ctl.protected_misses.value == 0.0 and not ctl.protecting
    assert ctl.overloaded() == "" and ctl.admit("standard").verdict is Verdict.ADMIT
    # While the route queues, a deadline shorter than an idle router's need still never counts:
    # 1 ms short of it once the call's wait (a direct call's: the route's) is given back.
    ctl, _ = controller(limit=100, queue_wait_s=QUEUED_S)
    for _ in range(50):
        ctl.admit("critical", slack_s=-(QUEUED_S + 0.001)).release(dropped=True)
        ctl.admit("critical", 0.010, slack_s=-0.011).release(missed=True)
    assert not ctl.protecting
    # One whose deadline was long enough before it waited counts: queueing made it miss.
    ctl.admit("critical", 0.010, slack_s=-0.009).release(missed=True)
    ctl.admit("critical", slack_s=0.0).release(missed=True)
    assert ctl.protecting and ctl.overloaded() == "batch,standard"


def test_protection_off_leaves_shedding_to_the_queue_wait_and_shares() -> None:
    ctl, _ = controller(limit=100, protected_miss_rate=None)
    for _ in range(10):
        ctl.admit("critical", QUEUED_S).release(missed=True)
    assert ctl.protected_misses.value > 0.1
    assert not ctl.protecting and ctl.overloaded() == ""
    assert ctl.admit("batch").verdict is Verdict.ADMIT


def test_protected_miss_share_decays_when_no_answer_comes() -> None:
    now = [0.0]
    misses = DecayingAverage(alpha=0.5, half_life_s=1.0, clock=lambda: now[0])
    misses.observe(1.0)
    assert misses.value == pytest.approx(0.5)
    now[0] = 2.0  # two half-lives without an answer
    assert misses.value == pytest.approx(0.125)
    misses.observe(0.0)
    assert misses.value == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        DecayingAverage(alpha=0.0, half_life_s=1.0)


# --- the limits -------------------------------------------------------------------------


def feed(
    limit: GradientLimit | AimdLimit, rtt_s: float, n: int, in_flight: int | None = None, dropped: bool = False
) -> None:
    """``n`` samples; ``in_flight`` None: every permit in use (the route is busy)."""
    for _ in range(n):
        limit.on_sample(rtt_s, limit.limit if in_flight is None else in_flight, dropped)


def gradient(initial: int, min_limit: int = 5, max_limit: int = 200) -> GradientLimit:
    """A Gradient2 limit whose windows are sample-counted (10 samples), not timed."""
    return GradientLimit(initial, min_limit, max_limit, window_s=0.0)


def test_gradient_grows_while_latency_is_flat_and_use_is_high() -> None:
    limit = gradient(20)
    feed(limit, 0.005, n=500)
    assert limit.limit > 40


def test_gradient_grows_no_further_than_twice_the_use() -> None:
    limit = gradient(20)
    feed(limit, 0.005, n=500, in_flight=30)
    assert 55 <= limit.limit <= 61


def test_gradient_does_not_grow_an_idle_route() -> None:
    limit = gradient(20)
    feed(limit, 0.005, n=500, in_flight=2)
    assert limit.limit == 20


def test_gradient_shrinks_when_latency_rises_and_stops_at_the_minimum() -> None:
    limit = gradient(100, min_limit=8)
    feed(limit, 0.005, n=200)
    grown = limit.limit
    feed(limit, 0.050, n=100)  # queuing: 10x the latency
    assert limit.limit < grown / 2
    feed(limit, 0.500, n=500)
    assert limit.limit == 8


def test_gradient_shrinks_on_drops_even_when_latency_looks_fine() -> None:
    limit = gradient(100)
    feed(limit, 0.005, n=50)
    before = limit.limit
    feed(limit, 0.001, n=100, dropped=True)
    assert limit.limit < before


def test_gradient_is_saturated_only_after_a_window_of_queuing_or_drops() -> None:
    limit = gradient(50)
    feed(limit, 0.005, n=200)
    assert not limit.saturated  # busy, latency flat
    feed(limit, 0.020, n=10)  # one window at 4x the long-term latency (tolerance 1.5)
    assert limit.saturated
    feed(limit, 0.005, n=200)
    assert not limit.saturated
    feed(limit, 0.001, n=10, dropped=True)
    assert limit.saturated


def test_aimd_is_saturated_for_a_while_after_a_slow_or_dropped_request() -> None:
    now = [0.0]
    limit = AimdLimit(20, 5, 200, latency_threshold_s=0.05, saturation_memory_s=0.1, clock=lambda: now[0])
    limit.on_sample(0.01, 20, False)
    assert not limit.saturated
    limit.on_sample(0.09, 20, False)
    assert limit.saturated
    now[0] += 0.2
    assert not limit.saturated
    limit.on_sample(0.01, 20, True)
    assert limit.saturated


def test_gradient_windows_span_time_not_only_samples() -> None:
    now = [0.0]
    limit = GradientLimit(20, 5, 200, window_s=0.1, clock=lambda: now[0])
    feed(limit, 0.005, n=1000)  # no time passes: one open window, nothing decided
    assert limit.limit == 20
    for _ in range(50):
        now[0] += 0.1
        feed(limit, 0.005, n=10)
    assert limit.limit > 20


def test_aimd_backs_off_on_drop_or_slow_and_grows_at_high_use() -> None:
    limit = AimdLimit(initial=20, min_limit=4, max_limit=30, latency_threshold_s=0.05, backoff=0.5)
    limit.on_sample(0.01, 20, dropped=True)
    assert limit.limit == 10
    limit.on_sample(0.2, 10, dropped=False)
    assert limit.limit == 5
    feed(limit, 0.01, n=100)
    assert limit.limit == 30
    feed(limit, 0.01, n=10, in_flight=1)  # low use: no growth, no shrink
    assert limit.limit == 30
    feed(limit, 0.01, n=20, dropped=True)
    assert limit.limit == 4


def test_build_limit_follows_the_config() -> None:
    assert isinstance(build_limit(AdmissionConfig(algorithm="aimd")), AimdLimit)
    gradient = build_limit(AdmissionConfig(initial_limit=33))
    assert isinstance(gradient, GradientLimit) and gradient.limit == 33


def test_admission_config_rejects_unordered_limits() -> None:
    with pytest.raises(ValueError, match="min_limit <= initial_limit <= max_limit"):
        AdmissionConfig(initial_limit=4, min_limit=8)


# --- the queue-wait signal --------------------------------------------------------------


def test_loop_lag_average_rises_and_decays() -> None:
    monitor = LoopLagMonitor(alpha=0.5)
    monitor.observe(0.040)
    monitor.observe(0.040)
    assert monitor.queue_wait_s == pytest.approx(0.030)
    for _ in range(20):
        monitor.observe(-0.001)  # early wake-ups count as no lag
    assert monitor.queue_wait_s < 0.0001


async def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    tick_s, block_s, alpha = 0.002, 0.05, 0.5
    monitor = LoopLagMonitor(tick_s=tick_s, alpha=alpha)
    seen: list[tuple[float, float]] = []
    """Each reading the monitor folds in, with its average just after."""
    fold = monitor.observe

    def observe(lag_s: float) -> None:
        fold(lag_s)
        seen.append((lag_s, monitor.queue_wait_s))

    monitor.observe = observe  # type: ignore[method-assign]
    monitor.start()
    await asyncio.sleep(0.02)
    time.sleep(block_s)  # noqa: ASYNC251 - block the loop, as a saturated router would
    # The tick that was due during the block fires at least block - tick late. Wait for that
    # reading (more ticks may follow before this test runs again on a busy machine, and
    # decay the average: what it was right after that reading is what is checked).
    deadline = time.monotonic() + 10
    while not any(lag >= block_s - tick_s for lag, _ in seen):
        assert time.monotonic() < deadline, f"no late tick seen: {seen[-5:]}"
        await asyncio.sleep(tick_s)
    await monitor.stop()
    average = next(average for lag, average in seen if lag >= block_s - tick_s)
    assert average >= alpha * (block_s - tick_s) > 0.02
