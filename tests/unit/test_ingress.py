"""The wait before a request's handler, read off the gateway's copy of its grpc-timeout."""

from __future__ import annotations

import pytest

from inferline.core.headers import INGRESS_TIMEOUT
from inferline.router.ingress import MAX_WAIT_S, IngressWait, parse_grpc_timeout


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("100m", 0.1), ("2S", 2.0), ("1H", 3600.0), ("3M", 180.0), ("250000u", 0.25), ("5000000n", 0.005), (b"7m", 0.007)],
)
def test_grpc_timeout_values_parse_to_seconds(value: str | bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "m", "100", "100x", "-5m", "123456789m", "1.5S", " 5m"])
def test_values_that_are_not_grpc_timeouts_give_none(value: str) -> None:
    assert parse_grpc_timeout(value) is None


def test_wait_is_the_timeout_less_what_remains_at_the_handler() -> None:
    ingress = IngressWait()
    waited = ingress.measure([("authorization", "Bearer k"), (INGRESS_TIMEOUT, "100m")], time_remaining_s=0.070)
    assert waited == pytest.approx(0.030)
    assert ingress.recent_s == pytest.approx(0.003, rel=0.05)  # one reading moves the average by alpha (0.1)


def test_no_reading_without_the_gateway_header_a_deadline_or_a_valid_value() -> None:
    ingress = IngressWait()
    assert ingress.measure([("authorization", "Bearer k")], time_remaining_s=0.05) is None
    assert ingress.measure([(INGRESS_TIMEOUT, "100m")], time_remaining_s=None) is None
    assert ingress.measure([(INGRESS_TIMEOUT, "soon")], time_remaining_s=0.05) is None
    assert ingress.measure(None, time_remaining_s=0.05) is None
    assert ingress.recent_s == 0.0


def test_a_call_that_had_its_full_timeout_left_waited_zero() -> None:
    # The router's clock starts when its transport takes the call, a little after the gateway's.
    assert IngressWait().measure([(INGRESS_TIMEOUT, "100m")], time_remaining_s=0.1004) == 0.0


def test_the_average_follows_readings_and_decays_with_time() -> None:
    clock = Clock()
    ingress = IngressWait(alpha=0.5, half_life_s=0.1, clock=clock)
    ingress.observe(0.040)
    ingress.observe(0.040)
    assert ingress.recent_s == pytest.approx(0.030)
    clock.now += 0.1  # one half-life without a request
    assert ingress.recent_s == pytest.approx(0.015)
    clock.now += 10.0
    assert ingress.recent_s < 1e-9  # an idle router does not keep shedding on an old reading


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        IngressWait(alpha=0.0)
    with pytest.raises(ValueError):
        IngressWait(half_life_s=0.0)


def test_a_reading_never_exceeds_the_calls_own_deadline_nor_the_cap() -> None:
    ingress = IngressWait()
    # A timeout far beyond any real one, with little left at the handler: capped, not 99999999 s.
    assert ingress.measure([(INGRESS_TIMEOUT, "99999999S")], time_remaining_s=0.05) == MAX_WAIT_S
    # A forged 200 ms with nothing left: at most the 200 ms the call claims to have had.
    assert IngressWait().measure([(INGRESS_TIMEOUT, "200m")], time_remaining_s=0.0) == pytest.approx(0.2)
