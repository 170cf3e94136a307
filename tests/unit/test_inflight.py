"""InFlightLimit and its Permit: a non-blocking bound on calls in flight, released exactly once."""

from __future__ import annotations

import pytest

from inferline.router.inflight import InFlightLimit


@pytest.mark.parametrize("limit", [1, 3, 64])
def test_admits_up_to_the_limit_then_refuses_at_once(limit: int) -> None:
    bound = InFlightLimit(limit)
    assert [bound.try_acquire() for _ in range(limit + 2)] == [True] * limit + [False, False]
    assert bound.in_flight == limit


def test_release_makes_room_for_one_more() -> None:
    bound = InFlightLimit(2)
    assert bound.try_acquire() and bound.try_acquire()
    bound.release()
    assert bound.in_flight == 1
    assert bound.try_acquire()
    assert not bound.try_acquire()


def test_release_without_acquire_is_an_error() -> None:
    bound = InFlightLimit(1)
    with pytest.raises(RuntimeError, match="without a matching"):
        bound.release()


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InFlightLimit(limit)


def test_permit_is_none_at_the_limit() -> None:
    bound = InFlightLimit(1)
    assert bound.permit() is not None
    assert bound.permit() is None


def test_permit_releases_exactly_once() -> None:
    bound = InFlightLimit(2)
    permit = bound.permit()
    other = bound.permit()
    assert permit is not None and other is not None
    permit.release()
    permit.release()
    assert permit.released
    assert bound.in_flight == 1


def test_permit_releases_on_leaving_with_block_even_on_error() -> None:
    bound = InFlightLimit(1)
    permit = bound.permit()
    assert permit is not None
    with pytest.raises(KeyError), permit:
        assert bound.in_flight == 1
        raise KeyError("model failed")
    assert bound.in_flight == 0


async def test_permit_releases_on_leaving_async_with_block() -> None:
    bound = InFlightLimit(1)
    permit = bound.permit()
    assert permit is not None
    async with permit as held:
        assert held is permit
        assert bound.in_flight == 1
    assert bound.in_flight == 0
    assert bound.permit() is not None


async def test_early_release_inside_with_block_is_not_repeated_on_exit() -> None:
    bound = InFlightLimit(2)
    first, second = bound.permit(), bound.permit()
    assert first is not None and second is not None
    async with first:
        first.release()
    assert bound.in_flight == 1  # `second` still holds its slot
