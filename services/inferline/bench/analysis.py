"""One run's generator results → a JSON-able step: totals, per-class outcomes, served_by, request records.

Response time (scheduled arrival to answer) is what deadlines, goodput and percentiles are
measured on, as in ``loadgen``: a generator that lags makes the target look worse, never
better. Only the measured window (after warm-up) is counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from inferline.bench.loadgen import OK, LatencySummary, LoadResult, RequestRecord, merge_load_results
from inferline.bench.multiproc import MAX_START_LAG_S, GenResult
from inferline.v1 import inference_pb2

SERVED_BY = {v.number: v.name.removeprefix("SERVED_BY_") for v in inference_pb2.ServedBy.DESCRIPTOR.values}
"""``ServedBy`` enum value → short name (PRIMARY, LIGHT, CACHE, BASELINE, UNSPECIFIED)."""


def iter_requests(gens: Sequence[GenResult], classes: Sequence[str]) -> Iterator[tuple[str, RequestRecord, int]]:
    """(class name, record, ``ServedBy`` value) of every measured request of every generator."""
    for g in gens:
        for r in g.result.records:
            yield classes[g.classes[r.index]], r, g.served_by[r.index]


def send_rate(gens: Sequence[GenResult]) -> float:
    """Requests per second the generators actually sent in the measured window.

    Each generator's measured requests over the window, stretched to its last actual start
    when that came after the window's end; summed over generators. While the generators
    keep their schedule this equals the offered rate; when they lag it is lower.
    """
    total = 0.0
    for g in gens:
        records, duration = g.result.records, g.result.duration_s
        if not records or duration <= 0:
            continue
        last = max(r.scheduled_s + r.start_lag_s for r in records) - g.warmup_s
        total += len(records) / max(duration, last)
    return round(total, 3)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _summary(values_s: list[float]) -> dict[str, Any]:
    s = LatencySummary.of(values_s)
    return {"count": s.count, "p50_ms": s.p50_ms, "p95_ms": s.p95_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms}


def _per_class(
    gens: Sequence[GenResult], classes: Sequence[str], deadline_s: float, has_served_by: bool
) -> dict[str, Any]:
    n: Counter[str] = Counter()
    in_time: Counter[str] = Counter()
    by: dict[str, Counter[str]] = {c: Counter() for c in classes}
    errors: dict[str, Counter[str]] = {c: Counter() for c in classes}
    ok_resp: dict[str, list[float]] = {c: [] for c in classes}
    for cls, r, served in iter_requests(gens, classes):
        n[cls] += 1
        if r.outcome != OK:
            errors[cls][r.outcome] += 1
            continue
        response = r.start_lag_s + r.latency_s
        ok_resp[cls].append(response)
        in_time[cls] += response <= deadline_s
        if has_served_by:
            by[cls][SERVED_BY.get(served, str(served))] += 1
    return {
        c: {
            "requests": n[c],
            "ok_in_time": _share(in_time[c], n[c]),
            "response_time": _summary(ok_resp[c]),
            "errors": dict(sorted(errors[c].items())),
            "served_by": dict(sorted(by[c].items())),
        }
        for c in classes
    }


def _records(gens: Sequence[GenResult], classes: Sequence[str], has_served_by: bool) -> dict[str, list[Any]]:
    """Every measured request as columns; ``t_s`` is the scheduled arrival from the window's start."""
    rows = sorted(
        ((g.warmup_s, *row) for g in gens for row in iter_requests([g], classes)), key=lambda row: row[2].scheduled_s
    )
    out: dict[str, list[Any]] = {k: [] for k in ("t_s", "class", "lag_ms", "latency_ms", "outcome", "served_by")}
    for warmup, cls, r, served in rows:
        out["t_s"].append(round(r.scheduled_s - warmup, 4))
        out["class"].append(cls)
        out["lag_ms"].append(round(r.start_lag_s * 1000.0, 3))
        out["latency_ms"].append(None if math.isnan(r.latency_s) else round(r.latency_s * 1000.0, 3))
        out["outcome"].append(r.outcome)
        ok_with_source = has_served_by and r.outcome == OK
        out["served_by"].append(SERVED_BY.get(served, str(served)) if ok_with_source else None)
    return out


def analyse_step(
    gens: Sequence[GenResult],
    classes: Sequence[str],
    *,
    deadline_s: float,
    has_served_by: bool,
    max_start_lag_s: float = MAX_START_LAG_S,
    keep_records: bool = True,
) -> tuple[dict[str, Any], LoadResult]:
    """The step's JSON-able summary and the merged ``LoadResult`` (for ``loadgen.step_verdict``)."""
    merged = merge_load_results([g.result for g in gens], max_start_lag_s=max_start_lag_s)
    step = merged.to_dict()
    step["send_rate"] = send_rate(gens)
    step["classes"] = _per_class(gens, classes, deadline_s, has_served_by)
    served: Counter[str] = Counter()
    for per_class in step["classes"].values():
        served.update(per_class["served_by"])
    step["served_by"] = {k: _share(v, merged.ok) for k, v in sorted(served.items())} if has_served_by else None
    details: Counter[str] = Counter()
    for g in gens:
        details.update(g.error_details)
    step["error_details"] = dict(details.most_common(10))
    step["generators"] = generator_summary(gens)
    if keep_records:
        step["records"] = _records(gens, classes, has_served_by)
    return step, merged


def generator_summary(gens: Sequence[GenResult]) -> list[dict[str, Any]]:
    """How each generator process kept its schedule: its rate, p99 start lag, whether it fell behind, its CPU."""
    return [
        {
            "rate": g.result.rate,
            "start_lag_p99_ms": g.result.start_lag_p99_ms,
            "fell_behind": g.result.fell_behind,
            "cpu": g.result.generator_cpu,
            "late_start_ms": g.late_start_ms,
        }
        for g in gens
    ]
