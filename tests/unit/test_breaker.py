"""CircuitBreaker and BreakerRegistry: one behaviour per test on a fake clock, plus a seeded simulation."""

from __future__ import annotations

import random

import pytest

from inferline.core.config import BreakerConfig
from inferline.router.breaker import BreakerRegistry, BreakerState, CircuitBreaker, FailureKind, WindowCounts

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
CONFIG = BreakerConfig(window_s=10.0, min_calls=10, failure_rate=0.5, open_s=1.0, half_open_probes=3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(fake_clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(CONFIG, clock=fake_clock)


def feed(breaker: CircuitBreaker, successes: int, failures: int) -> None:
    """Record outcomes in CLOSED, failures last."""
    for _ in range(successes):
        breaker.record_success()
    for _ in range(failures):
        breaker.record_failure("error")


def trip(breaker: CircuitBreaker) -> None:
    feed(breaker, 0, CONFIG.min_calls)
    assert breaker.state is OPEN


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(CONFIG.open_s)
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize(
    ("config", "successes", "failures"),
    [
        (CONFIG, 5, 5),  # exactly at the rate and at min_calls
        (CONFIG, 0, 10),
        (CONFIG, 20, 20),
        (BreakerConfig(min_calls=10, failure_rate=0.3), 7, 3),  # 3 / 10 is not below 0.3 in floating point
        (BreakerConfig(min_calls=1, failure_rate=1.0), 0, 1),
    ],
)
def test_opens_when_failure_rate_reached(
    fake_clock: FakeClock, config: BreakerConfig, successes: int, failures: int
) -> None:
    breaker = CircuitBreaker(config, clock=fake_clock)
    feed(breaker, successes, failures)
    assert breaker.state is OPEN
    assert not breaker.allow()


@pytest.mark.parametrize(("successes", "failures"), [(6, 4), (11, 9), (100, 49)])
def test_stays_closed_below_failure_rate(breaker: CircuitBreaker, successes: int, failures: int) -> None:
    feed(breaker, successes, failures)
    assert breaker.state is CLOSED


@pytest.mark.parametrize(("successes", "failures"), [(0, 9), (4, 5), (0, 1)])
def test_stays_closed_below_min_calls(breaker: CircuitBreaker, successes: int, failures: int) -> None:
    feed(breaker, successes, failures)
    assert breaker.state is CLOSED
    assert breaker.allow()


def test_opens_on_a_success_that_reaches_min_calls(breaker: CircuitBreaker) -> None:
    feed(breaker, 0, 9)
    breaker.record_success()  # 9 / 10 failed, now judged
    assert breaker.state is OPEN


@pytest.mark.parametrize("age_s", [CONFIG.window_s, CONFIG.window_s + 0.5, 1000.0])
def test_old_failures_leave_the_window(breaker: CircuitBreaker, fake_clock: FakeClock, age_s: float) -> None:
    feed(breaker, 0, 9)
    fake_clock.advance(age_s)
    breaker.record_failure("error")
    assert breaker.window_counts() == WindowCounts(calls=1, failures=1, timeouts=0)
    assert breaker.state is CLOSED


def test_recent_failures_stay_in_the_window(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    feed(breaker, 0, 9)
    fake_clock.advance(CONFIG.window_s * 0.85)  # less than window_s - one bucket
    breaker.record_failure("error")
    assert breaker.state is OPEN


@pytest.mark.parametrize(("timeouts", "errors", "successes"), [(10, 0, 0), (5, 0, 5), (3, 2, 5)])
def test_timeouts_count_as_failures(breaker: CircuitBreaker, timeouts: int, errors: int, successes: int) -> None:
    feed(breaker, successes, errors)
    for _ in range(timeouts):
        breaker.record_failure("timeout")
    assert breaker.state is OPEN


def test_timeouts_are_counted_apart_in_the_window(breaker: CircuitBreaker) -> None:
    breaker.record_failure("timeout")
    breaker.record_failure("error")
    breaker.record_success()
    assert breaker.window_counts() == WindowCounts(calls=3, failures=2, timeouts=1)


def test_unknown_failure_kind_is_refused(breaker: CircuitBreaker) -> None:
    with pytest.raises(ValueError, match="failure kind"):
        breaker.record_failure("slow")  # type: ignore[arg-type]


@pytest.mark.parametrize("wait_s", [0.0, 0.5, CONFIG.open_s - 0.001])
def test_open_refuses_until_open_s_has_passed(breaker: CircuitBreaker, fake_clock: FakeClock, wait_s: float) -> None:
    trip(breaker)
    fake_clock.advance(wait_s)
    assert not breaker.allow()
    assert breaker.state is OPEN


def test_half_open_admits_limited_probes(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    half_open(breaker, fake_clock)
    admitted = [breaker.allow() for _ in range(CONFIG.half_open_probes + 2)]
    assert admitted == [True] * CONFIG.half_open_probes + [False, False]
    assert breaker.probes_in_flight == CONFIG.half_open_probes


@pytest.mark.parametrize("outcome", ["success", "ignored"])
def test_finished_probe_frees_its_slot(breaker: CircuitBreaker, fake_clock: FakeClock, outcome: str) -> None:
    half_open(breaker, fake_clock)
    while breaker.allow():
        pass
    if outcome == "success":
        breaker.record_success()
    else:
        breaker.record_ignored()
    assert breaker.allow()
    assert not breaker.allow()


def test_closes_after_successful_probes(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    half_open(breaker, fake_clock)
    for _ in range(CONFIG.half_open_probes):
        assert breaker.allow()
        breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.window_counts() == WindowCounts(0, 0, 0)


def test_ignored_probes_do_not_close(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    half_open(breaker, fake_clock)
    for _ in range(CONFIG.half_open_probes * 2):
        assert breaker.allow()
        breaker.record_ignored()
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize("kind", ["error", "timeout"])
def test_probe_failure_reopens(breaker: CircuitBreaker, fake_clock: FakeClock, kind: FailureKind) -> None:
    half_open(breaker, fake_clock)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow()
    breaker.record_failure(kind)
    assert breaker.state is OPEN
    assert breaker.last_opened_at == fake_clock.now
    fake_clock.advance(CONFIG.open_s)
    assert breaker.state is HALF_OPEN


def test_outcomes_of_calls_admitted_before_opening_are_ignored(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    trip(breaker)
    breaker.record_success()  # late answers of calls let through while closed
    fake_clock.advance(CONFIG.open_s)
    assert breaker.state is HALF_OPEN
    for _ in range(CONFIG.half_open_probes):
        breaker.record_success()  # no probe outstanding: cannot close the breaker
    assert breaker.state is HALF_OPEN


def test_transitions_are_reported(fake_clock: FakeClock) -> None:
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(CONFIG, clock=fake_clock, on_transition=lambda old, new: seen.append((old, new)))
    half_open(breaker, fake_clock)
    assert breaker.allow()
    breaker.record_failure("error")
    fake_clock.advance(CONFIG.open_s)
    for _ in range(CONFIG.half_open_probes):
        assert breaker.allow()
        breaker.record_success()
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_recovery_time_runs_from_first_probe_to_close(breaker: CircuitBreaker, fake_clock: FakeClock) -> None:
    trip(breaker)
    opened_at = fake_clock.now
    fake_clock.advance(CONFIG.open_s + 0.25)
    assert breaker.allow()
    first_probe_at = fake_clock.now
    for _ in range(CONFIG.half_open_probes - 1):
        fake_clock.advance(0.1)
        breaker.record_success()
        assert breaker.allow()
    fake_clock.advance(0.1)
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.last_opened_at == opened_at
    assert breaker.last_closed_at == fake_clock.now
    assert breaker.recovery_time_s == pytest.approx(fake_clock.now - first_probe_at)


def test_recovery_time_is_none_before_first_close(breaker: CircuitBreaker) -> None:
    trip(breaker)
    assert (breaker.recovery_time_s, breaker.last_closed_at) == (None, None)


def test_registry_keeps_one_breaker_per_variant(fake_clock: FakeClock) -> None:
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    registry = BreakerRegistry(CONFIG, fake_clock, on_transition=lambda *change: seen.append(change))
    assert registry.get("a") is registry.get("a")
    trip(registry.get("b"))
    assert registry.states() == {"a": CLOSED, "b": OPEN}
    assert seen == [("b", CLOSED, OPEN)]


# Seeded simulation with the shipped defaults (window 10 s in 10 buckets, min_calls 20,
# failure_rate 0.5, open 1 s, 3 probes) and Poisson arrivals of 50 calls/s (~500 in the window).
SIM_CONFIG = BreakerConfig()
SIM_RATE_PER_S = 50.0
BUCKET_S = SIM_CONFIG.window_s / 10


class Simulation:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(SIM_CONFIG, clock=self.clock)

    def call(self, failure_p: float) -> bool:
        """One call after an exponential gap, answered at once; returns whether it was allowed."""
        self.clock.advance(self.rng.expovariate(SIM_RATE_PER_S))
        if not self.breaker.allow():
            return False
        if self.rng.random() < failure_p:
            self.breaker.record_failure("timeout" if self.rng.random() < 0.5 else "error")
        else:
            self.breaker.record_success()
        return True

    def run(self, seconds: float, failure_p: float) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.call(failure_p)

    def burst_until_open(self) -> tuple[int, float]:
        """Calls that all fail until the breaker opens; returns (calls, seconds) it took."""
        started_at, calls = self.clock.now, 0
        while self.breaker.state is CLOSED:
            assert self.call(failure_p=1.0)
            calls += 1
        return calls, self.clock.now - started_at


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_ten_percent_failures_stay_closed(seed: int) -> None:
    sim = Simulation(seed)
    sim.run(seconds=120, failure_p=0.1)  # ~6,000 calls
    assert sim.breaker.last_opened_at is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_failure_burst_on_an_idle_variant_opens_after_min_calls(seed: int) -> None:
    sim = Simulation(seed)
    sim.run(seconds=30, failure_p=0.1)
    sim.clock.advance(SIM_CONFIG.window_s)  # no traffic for a whole window
    calls, _ = sim.burst_until_open()
    assert calls == SIM_CONFIG.min_calls


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_failure_burst_under_load_opens_once_it_outweighs_the_window(seed: int) -> None:
    # A busy window must be outweighed, not just reach min_calls: with p0 failing before the
    # burst, failures reach the rate r after about window_s * (r - p0) / (1 - p0) seconds
    # (~4.4 s here), give or take a bucket since old outcomes leave a bucket at a time.
    sim = Simulation(seed)
    sim.run(seconds=30, failure_p=0.1)
    before = sim.breaker.window_counts()
    p0, r = before.failures / before.calls, SIM_CONFIG.failure_rate
    _, seconds = sim.burst_until_open()
    expected_s = SIM_CONFIG.window_s * (r - p0) / (1 - p0)
    assert expected_s - BUCKET_S <= seconds <= expected_s + BUCKET_S
    assert seconds <= SIM_CONFIG.window_s  # always: by then the window holds nothing but the burst


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_recovery_closes_within_open_s_plus_probes(seed: int) -> None:
    sim = Simulation(seed)
    sim.run(seconds=30, failure_p=0.1)
    sim.burst_until_open()
    opened_at = sim.clock.now
    arrivals_after_open_s: list[float] = []
    while sim.breaker.state is not CLOSED:
        sim.call(failure_p=0.0)
        if sim.clock.now >= opened_at + SIM_CONFIG.open_s:
            arrivals_after_open_s.append(sim.clock.now)
    # Calls are answered at once here, so the breaker closes on the answer of the
    # half_open_probes-th call arriving after open_s: open_s plus those arrivals.
    assert len(arrivals_after_open_s) == SIM_CONFIG.half_open_probes
    assert sim.breaker.last_closed_at == arrivals_after_open_s[-1]
    assert sim.breaker.recovery_time_s == arrivals_after_open_s[-1] - arrivals_after_open_s[0]
