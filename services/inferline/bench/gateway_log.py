"""Envoy's own time for its sheds, from the gateway's access log (``gateway.access_log``).

A benchmark's shed latency is measured by its load generators, which share the machine's
cores with everything they load. The access log records Envoy's own time per call, from the
first byte it read to the last it wrote: what Envoy spends on a refusal, without the time the
call waited in its socket for Envoy's worker to get a core or the refusal waited for the
generator to read it. Both numbers are reported; neither alone is what a caller on a machine
of its own would see.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from collections.abc import Iterable
from typing import Any

ACCESS_LOG_ENV = "INFERLINE_GATEWAY__ACCESS_LOG__PATH"
"""Set for the process that renders the gateway (``inferline up``), its log goes there."""

SHED_DETAILS = {
    "fault_filter_abort": "signal",
    "admission_control": "success_rate",
    "reached_concurrency_limit": "adaptive_limit",
}
"""``response_code_details`` of Envoy's sheds → which part of the gateway shed; a fixed
in-flight cap's refusals are ``…{overflow}`` (flag ``UO``): ``fixed_cap``."""


def shed_kind(details: str, flags: str | None) -> str | None:
    """Which part of the gateway shed a call (``SHED_DETAILS``, ``fixed_cap``), None: not a shed."""
    if details in SHED_DETAILS:
        return SHED_DETAILS[details]
    if flags is not None and "UO" in flags.split(","):
        return "fixed_cap"
    return None


def read_access_log(path: pathlib.Path) -> list[dict[str, Any]]:
    """The log's lines (JSON objects); a line cut short by a process stopping is skipped."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def _epoch_s(start_time: str) -> float:
    return datetime.datetime.fromisoformat(start_time).timestamp()


def _percentile(sorted_ms: list[int], q: float) -> int:
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


def shed_times(lines: Iterable[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any]:
    """Envoy's sheds that started in [``start_s``, ``end_s``) (epoch seconds): their count, by
    kind, and Envoy's time for them (whole ms, as Envoy logs it), p50 / p99 / max."""
    kinds: dict[str, int] = {}
    durations: list[int] = []
    for line in lines:
        kind = shed_kind(str(line.get("details")), line.get("flags"))
        if kind is None or not start_s <= _epoch_s(line["start_time"]) < end_s:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        durations.append(int(line["duration_ms"]))
    durations.sort()
    if not durations:
        return {"count": 0, "by_kind": {}, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(durations),
        "by_kind": kinds,
        "p50_ms": _percentile(durations, 0.5),
        "p99_ms": _percentile(durations, 0.99),
        "max_ms": durations[-1],
    }
