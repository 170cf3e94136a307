"""EntityRowCache: the batch job's per-chunk cache of feature rows (TTL, size bound, misses)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferline.batch.entity_rows import EntityRowCache
from inferline.batch.job import defaulted_names


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


INDEXES = pytest.mark.parametrize("int_ids", [True, False], ids=["int-ids", "any-ids"])
"""Int64 ids found by binary search (``_IntSlots``), or any ids through a dict."""


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)


@INDEXES
def test_stored_rows_come_back_and_others_miss(int_ids: bool) -> None:
    cache = EntityRowCache(ttl_s=30, max_entities=10, width=2, timer=Clock(), int_ids=int_ids)
    cache.store([1, 2], rows(1, 2))
    got, hit = cache.lookup([2, 3, 1])
    assert hit.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[[0, 2]], rows(2, 1))
    assert np.isnan(got[1]).all()


def test_string_ids_and_all_nan_rows_are_cached() -> None:
    cache = EntityRowCache(ttl_s=30, max_entities=10, width=2, timer=Clock())
    missing = np.full((1, 2), np.nan, dtype=np.float32)
    cache.store(["a", "unknown"], np.concatenate([rows(1), missing]))
    _, hit = cache.lookup(["unknown", "a", "b"])
    assert hit.tolist() == [True, True, False]  # an entity the store lacks is not read again


@INDEXES
def test_rows_expire_after_the_ttl_and_a_new_read_restarts_it(int_ids: bool) -> None:
    clock = Clock()
    cache = EntityRowCache(ttl_s=30, max_entities=10, width=2, timer=clock, int_ids=int_ids)
    cache.store([1, 2], rows(1, 2))
    clock.now += 20
    cache.store([2], rows(9))  # re-read: new value, new TTL
    clock.now += 15
    got, hit = cache.lookup([1, 2])
    assert hit.tolist() == [False, True]
    np.testing.assert_array_equal(got[1], rows(9)[0])
    assert len(cache) == 2


@INDEXES
def test_past_the_bound_the_oldest_rows_go(int_ids: bool) -> None:
    clock = Clock()
    cache = EntityRowCache(ttl_s=1000, max_entities=4, width=2, timer=clock, int_ids=int_ids)
    for entity in range(4):
        cache.store([entity], rows(entity))
        clock.now += 1
    cache.store([10, 11], rows(10, 11))
    assert len(cache) <= 4
    got, hit = cache.lookup([0, 1, 2, 3, 10, 11])
    assert hit.tolist() == [False, False, True, True, True, True]
    np.testing.assert_array_equal(got[2:], rows(2, 3, 10, 11))


@INDEXES
def test_more_new_rows_than_the_bound_keeps_the_bound(int_ids: bool) -> None:
    cache = EntityRowCache(ttl_s=1000, max_entities=3, width=2, timer=Clock(), int_ids=int_ids)
    cache.store([1], rows(1))
    cache.store([5, 6, 7, 8, 9], rows(5, 6, 7, 8, 9))
    assert len(cache) == 3
    got, hit = cache.lookup([5, 6, 7])
    assert hit.all()
    np.testing.assert_array_equal(got, rows(5, 6, 7))


@pytest.mark.parametrize(("ttl_s", "size"), [(0, 10), (30, 0)])
def test_zero_ttl_or_size_disables_it(ttl_s: float, size: int) -> None:
    cache = EntityRowCache(ttl_s=ttl_s, max_entities=size, width=2, timer=Clock())
    cache.store([1], rows(1))
    assert not cache.enabled and len(cache) == 0
    assert not cache.lookup([1])[1].any()


def test_defaulted_names_per_row() -> None:
    defaulted = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    assert defaulted_names(defaulted, ["a", "b", "c"]).to_pylist() == ["b", "", "a,b,c", "b"]
    assert defaulted_names(np.zeros((0, 3), dtype=bool), ["a", "b", "c"]).to_pylist() == []
    none = defaulted_names(np.zeros((3, 3), dtype=bool), ["a", "b", "c"])
    assert none.type == pa.string() and none.to_pylist() == ["", "", ""]
    wide = np.random.default_rng(3).random((20, 70)) > 0.8  # past one int64 code per row
    names = [f"f{i}" for i in range(70)]
    want = [",".join(n for n, d in zip(names, row, strict=True) if d) for row in wide.tolist()]
    assert defaulted_names(wide, names).to_pylist() == want


@INDEXES
def test_a_whole_store_read_replaces_every_row_and_keeps_all_of_its_own(int_ids: bool) -> None:
    clock = Clock()
    cache = EntityRowCache(ttl_s=30, max_entities=4, width=2, timer=clock, int_ids=int_ids)
    cache.store([1, 2, 3], rows(1, 2, 3))
    clock.now += 10
    # Four rows into a cache of four that holds three: store() would drop the older half at once.
    assert cache.replace([3, 4, 5, 6], rows(30, 4, 5, 6))
    got, hit = cache.lookup([1, 2, 3, 4, 5, 6])
    assert hit.tolist() == [False, False, True, True, True, True] and len(cache) == 4
    np.testing.assert_array_equal(got[2:], rows(30, 4, 5, 6))
    clock.now += 29.9
    assert cache.lookup([6])[1].tolist() == [True]  # a new TTL from the replace


@INDEXES
def test_a_whole_store_read_larger_than_the_cache_leaves_it_as_it_was(int_ids: bool) -> None:
    cache = EntityRowCache(ttl_s=30, max_entities=2, width=2, timer=Clock(), int_ids=int_ids)
    cache.store([1], rows(1))
    assert not cache.replace([2, 3, 4], rows(2, 3, 4))
    assert cache.lookup([1, 2])[1].tolist() == [True, False]
    assert not EntityRowCache(ttl_s=0, max_entities=2, width=2, int_ids=int_ids).replace([1], rows(1))  # caching off


def test_int_ids_from_arrays_lists_and_either_end_of_int64() -> None:
    cache = EntityRowCache(ttl_s=30, max_entities=10, width=2, timer=Clock(), int_ids=True)
    extremes = np.array([2**63 - 1, -(2**63), 0, -5], dtype=np.int64)
    cache.store(extremes, rows(1, 2, 3, 4))
    got, hit = cache.lookup([-5, 7, 2**63 - 1, -(2**63) + 1])  # a list: ids as the job's callers pass them too
    assert hit.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(got[[0, 2]], rows(4, 1))
    assert not cache.lookup(np.array([], dtype=np.int64))[1].size


def test_close_int_ids_are_found_by_index_and_ids_far_outside_them_miss() -> None:
    """Ids close together take the by-index path; ids at either end of int64 must not wrap into it."""
    cache = EntityRowCache(ttl_s=30, max_entities=10, width=2, timer=Clock(), int_ids=True)
    cache.store(np.arange(100, 110, dtype=np.int64), rows(*range(10)))
    got, hit = cache.lookup([-(2**63), 2**63 - 1, 105, 110, 99, 100, 109])
    assert hit.tolist() == [False, False, True, False, False, True, True]
    np.testing.assert_array_equal(got[[2, 5, 6]], rows(5, 0, 9))
    cache.store([-(2**63)], rows(42))  # the span now far exceeds the ids held: binary search again
    got, hit = cache.lookup([105, -(2**63), 2**63 - 1])
    assert hit.tolist() == [True, True, False]
    np.testing.assert_array_equal(got[[0, 1]], rows(5, 42))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["store", "replace", "lookup", "tick"]),
            st.lists(st.integers(-50, 50), max_size=12, unique=True),
        ),
        max_size=30,
    )
)
def test_int_ids_answer_as_the_dict_does(operations: list[tuple[str, list[int]]]) -> None:
    """Any sequence of stores, replaces, lookups and time passing: both indexes agree."""
    clocks = Clock(), Clock()
    caches = [
        EntityRowCache(ttl_s=5, max_entities=16, width=2, timer=c, int_ids=i)
        for c, i in zip(clocks, (True, False), strict=True)
    ]
    for step, (operation, ids) in enumerate(operations):
        values = rows(*(float(step * 100 + i) for i in ids)) if ids else np.empty((0, 2), np.float32)
        if operation == "tick":
            for clock in clocks:
                clock.now += 1
            continue
        answers = []
        for cache in caches:
            if operation == "store":
                cache.store(ids, values)
            elif operation == "replace":
                answers.append(cache.replace(ids, values))
            got, hit = cache.lookup(ids)
            answers.append((hit.tolist(), np.nan_to_num(got, nan=-1).tolist(), len(cache)))
        assert answers[: len(answers) // 2] == answers[len(answers) // 2 :]
