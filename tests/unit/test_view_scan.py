"""When a batch job reads its feature views whole, and how a scan's slices become rows."""

from __future__ import annotations

import numpy as np
import pytest

from inferline.batch.view_scan import SCAN_ROWS_PER_ENTITY, ScanMode, ScanPolicy, scan_matrix
from inferline.features.scan import ScanPart


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(mode: ScanMode = "auto", ttl_s: float = 30.0, max_entities: int = 1000) -> tuple[ScanPolicy, Clock]:
    clock = Clock()
    return ScanPolicy(mode, ttl_s, max_entities, timer=clock), clock


def test_auto_scans_when_the_rows_left_are_twice_the_entities_or_more() -> None:
    scan, _ = policy()
    assert SCAN_ROWS_PER_ENTITY == 2
    assert scan.due(rows_left=2000, entities=1000)
    assert not scan.due(rows_left=1999, entities=1000)
    assert not scan.due(rows_left=None, entities=10)  # rows unknown: reads as before


@pytest.mark.parametrize(
    ("mode", "ttl_s", "max_entities", "entities"),
    [
        ("never", 30.0, 1000, 10),
        ("always", 0.0, 1000, 10),  # no cache to hold the rows
        ("always", 30.0, 0, 10),
        ("always", 30.0, 1000, 1001),  # the store does not fit the cache
        ("always", 30.0, 1000, None),  # the store cannot be scanned
        ("always", 30.0, 1000, 0),  # nothing to scan
    ],
)
def test_no_scan_without_a_store_to_scan_or_a_cache_to_hold_it(
    mode: ScanMode, ttl_s: float, max_entities: int, entities: int | None
) -> None:
    scan, _ = policy(mode, ttl_s, max_entities)
    assert not scan.due(rows_left=10**9, entities=entities)


def test_possible_says_whether_the_store_need_be_asked_at_all() -> None:
    assert policy("auto")[0].possible and policy("always")[0].possible
    assert not policy("never")[0].possible
    assert not policy("auto", ttl_s=0)[0].possible
    assert not policy("auto", max_entities=0)[0].possible


def test_always_scans_whatever_the_rows() -> None:
    scan, _ = policy("always")
    assert scan.due(rows_left=1, entities=1000)
    assert scan.due(rows_left=None, entities=1000)


def test_a_scan_is_made_again_once_its_rows_have_expired() -> None:
    scan, clock = policy(ttl_s=30.0)
    assert scan.due(rows_left=5000, entities=1000) and not scan.fresh()
    scan.scanned(started=clock.now)
    clock.now += 29.9
    assert not scan.due(rows_left=5000, entities=1000) and scan.fresh()
    clock.now += 0.1
    assert scan.due(rows_left=5000, entities=1000) and not scan.fresh()
    assert not scan.due(rows_left=1000, entities=1000)  # but not for the few rows left


def part(ids: list[object], columns: list[int], values: list[float]) -> ScanPart:
    dtype = np.int64 if all(isinstance(i, int) for i in ids) else object
    return ScanPart(np.array(ids, dtype=dtype), np.array(columns, np.int32), np.array(values, np.float32))


def test_an_entitys_values_from_several_slices_make_one_row() -> None:
    first = part([7, 7, 3], [0, 2, 1], [0.5, 9.0, 0.25])
    second = part([7, 11], [1, 0], [4.0, 1.5])
    ids, rows = scan_matrix([first, second], width=3)
    assert ids == [7, 3, 11]
    np.testing.assert_array_equal(rows, np.array([[0.5, 4.0, 9.0], [np.nan, 0.25, np.nan], [1.5, np.nan, np.nan]]))
    assert rows.dtype == np.float32


def test_string_ids_and_empty_scans() -> None:
    ids, rows = scan_matrix([part(["b", "a", "b"], [0, 0, 1], [1.0, 2.0, 3.0])], width=2)
    assert ids == ["b", "a"]
    np.testing.assert_array_equal(rows, [[1.0, 3.0], [2.0, np.nan]])
    ids, rows = scan_matrix([], width=2)
    assert ids == [] and rows.shape == (0, 2)
    ids, rows = scan_matrix([part([], [], [])], width=2)
    assert ids == [] and rows.shape == (0, 2)
