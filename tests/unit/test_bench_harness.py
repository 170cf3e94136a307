"""Benchmark harness helpers: CPU lists for pinning, JSON-safe reports."""

from __future__ import annotations

import math
import os

import pytest

from inferline.bench.harness import json_safe, parse_cpus


def test_cpu_lists_parse_like_taskset() -> None:
    first = min(os.sched_getaffinity(0))
    assert parse_cpus(str(first)) == frozenset({first})
    every = sorted(os.sched_getaffinity(0))
    assert parse_cpus(",".join(map(str, every))) == frozenset(every)
    if every == list(range(every[0], every[-1] + 1)):
        assert parse_cpus(f"{every[0]}-{every[-1]}") == frozenset(every)


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "0,,1", "0.5"])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected numbers and ranges"):
        parse_cpus(text)


def test_cpus_this_process_may_not_use_are_refused() -> None:
    with pytest.raises(ValueError, match="this machine lets us use CPUs"):
        parse_cpus(str(max(os.sched_getaffinity(0)) + 1000))


def test_reports_write_sets_as_sorted_lists_and_missing_numbers_as_null() -> None:
    assert json_safe({"cpus": frozenset({3, 1}), "p99": math.nan, "runs": [{"x": math.inf}]}) == {
        "cpus": [1, 3],
        "p99": None,
        "runs": [{"x": None}],
    }
