"""Envoy's own shed times from the gateway's access log (``inferline.bench.gateway_log``)."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from inferline.bench.gateway_log import read_access_log, shed_kind, shed_times

T0 = datetime.datetime(2026, 12, 6, 1, 0, 0, tzinfo=datetime.UTC)


def _line(at_s: float, details: str, duration_ms: int, flags: str = "-") -> dict[str, Any]:
    start = (T0 + datetime.timedelta(seconds=at_s)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"start_time": start, "details": details, "duration_ms": duration_ms, "flags": flags}


def test_each_part_of_the_gateway_that_sheds_is_told_apart_and_other_answers_are_not_sheds() -> None:
    assert shed_kind("fault_filter_abort", "FI") == "signal"
    assert shed_kind("admission_control", None) == "success_rate"
    assert shed_kind("reached_concurrency_limit", None) == "adaptive_limit"
    assert shed_kind("upstream_reset_before_response_started{overflow}", "UO") == "fixed_cap"
    for details, flags in (("max_duration_timeout", "UT"), ("http2.remote_reset", "DR"), ("no_healthy_upstream", "UH")):
        assert shed_kind(details, flags) is None


def test_shed_times_count_only_the_sheds_of_the_window() -> None:
    t0 = T0.timestamp()
    lines = [
        _line(0.5, "fault_filter_abort", 9),  # before the window
        *(_line(1.0 + i / 100, "fault_filter_abort", 0) for i in range(97)),
        _line(1.5, "reached_concurrency_limit", 2),
        _line(1.6, "upstream_reset_before_response_started{overflow}", 3, "UO"),
        _line(1.7, "fault_filter_abort", 4),
        _line(1.8, "max_duration_timeout", 100, "UT"),  # not a shed
        _line(2.0, "fault_filter_abort", 50),  # at the window's end: out
    ]
    times = shed_times(lines, t0 + 1.0, t0 + 2.0)
    assert times["count"] == 100
    assert times["by_kind"] == {"signal": 98, "adaptive_limit": 1, "fixed_cap": 1}
    assert (times["p50_ms"], times["p99_ms"], times["max_ms"]) == (0, 3, 4)
    assert shed_times(lines, t0 + 3.0, t0 + 4.0) == {
        "count": 0, "by_kind": {}, "p50_ms": None, "p99_ms": None, "max_ms": None,
    }  # fmt: skip


def test_a_missing_log_reads_empty_and_a_cut_line_is_skipped(tmp_path: pathlib.Path) -> None:
    assert read_access_log(tmp_path / "absent.log") == []
    path = tmp_path / "access.log"
    whole = _line(1.0, "fault_filter_abort", 0)
    path.write_text(json.dumps(whole) + "\n" + '{"start_time": "2026-12-0')
    assert read_access_log(path) == [whole]
