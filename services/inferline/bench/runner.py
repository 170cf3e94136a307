"""``inferline bench``: fixed-rate and sweep runs of mixed traffic over several targets.

Every target sees the same schedule: step ``k`` uses the same seed for each target, so the
same arrivals with the same classes go to each in turn (one after another, never at the
same time). In a sweep each target climbs the rate ladder until its first failing step;
its knee is the highest rate whose step passed ``loadgen.step_verdict`` (p99 response
time of OK answers under the deadline, goodput at least ``goodput_min_fraction`` of
offered). The result is a JSON-able dict that ``bench.report`` turns into HTML.

A ``predict`` target with ``metrics`` (the router's Prometheus endpoint) also gets, per
step, the features service's hot-cache hit rate and the online store's reads per second
over the measured window, from the router's own counters scraped at the window's start
and after its end.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferline.bench.analysis import analyse_step
from inferline.bench.harness import (
    feature_text,
    feature_window,
    scrape_feature_counters,
    scrape_feature_counters_after,
    versions,
)
from inferline.bench.loadgen import rate_ladder, step_verdict
from inferline.bench.mix import TrafficMix
from inferline.bench.multiproc import MAX_START_LAG_S, START_DELAY_S, Generators
from inferline.bench.recording import TargetSpec

RATE_PER_GENERATOR = 1500.0
"""Requests per second one generator process is given when their number is chosen automatically."""

StepCallback = Callable[[dict[str, Any], dict[str, Any]], None]
"""Called with (target entry, step) as each step finishes."""


@dataclass(frozen=True)
class BenchSettings:
    """What to run: targets, traffic, and a fixed rate or a sweep."""

    targets: tuple[TargetSpec, ...]
    mix: TrafficMix
    mode: str
    """``fixed`` (one run at ``rate``) or ``sweep`` (``start_rate`` × ``factor``ⁿ up to ``max_rate``)."""
    rate: float = 200.0
    start_rate: float = 100.0
    factor: float = 1.25
    max_rate: float = 5000.0
    duration_s: float = 10.0
    """Measured seconds per run (per sweep step)."""
    warmup_s: float = 2.0
    """Unmeasured seconds sent before each run."""
    deadline_s: float = 0.1
    generators: int = 0
    """Generator processes; 0 picks one per ``RATE_PER_GENERATOR`` of the highest rate, up to the CPU count."""
    seed: int = 1
    goodput_min_fraction: float = 0.95
    settle_s: float = 1.0
    """Pause between runs, so one target's queues drain before the next is measured."""

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "sweep"):
            raise ValueError(f"mode must be fixed or sweep, got {self.mode!r}")
        if not self.targets:
            raise ValueError("give at least one target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique: {names}")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.deadline_s <= 0:
            raise ValueError("need duration > 0, warm-up >= 0, deadline > 0")

    def rates(self) -> list[float]:
        if self.mode == "fixed":
            if self.rate <= 0:
                raise ValueError("rate must be positive")
            return [self.rate]
        return rate_ladder(self.start_rate, max_rate=self.max_rate, factor=self.factor)

    def generator_count(self) -> int:
        if self.generators > 0:
            return self.generators
        wanted = math.ceil(max(self.rates()) / RATE_PER_GENERATOR)
        return max(1, min(wanted, os.cpu_count() or 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rates": self.rates(),
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "deadline_ms": self.deadline_s * 1000.0,
            "mix": self.mix.to_dict(),
            "generators": self.generator_count(),
            "seed": self.seed,
            "goodput_min_fraction": self.goodput_min_fraction,
            "knee_criteria": (
                f"p99 response time of OK answers < {self.deadline_s * 1000:g} ms and goodput >= "
                f"{self.goodput_min_fraction:.0%} of offered"
            ),
        }


def _target_entry(t: TargetSpec) -> dict[str, Any]:
    return {
        "name": t.name,
        "kind": t.kind,
        "url": t.url,
        "route": t.route if t.kind == "predict" else None,
        "model": None if t.kind == "predict" else t.model,
        "tenants": len(t.api_keys) if t.kind != "triton" else None,
        "has_served_by": t.has_served_by,
        "entities": (
            {
                "distribution": t.entities,
                "ids": list(t.entity_ids),
                "zipf_s": t.zipf_s if t.entities == "zipf" else None,
            }
            if t.kind == "predict"
            else None
        ),
        "metrics": t.metrics or None,
        "steps": [],
    }


def _knee(entry: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    steps = entry["steps"]
    passed = [st for st in steps if st["passed"]]
    failed = next((st for st in steps if not st["passed"]), None)
    knee = passed[-1] if passed and (failed is None or passed[-1]["rate"] < failed["rate"]) else None
    return {
        "knee_rate": knee["rate"] if knee else None,
        "knee_goodput": knee["goodput"] if knee else None,
        "knee_is_lower_bound": knee is not None and failed is None and len(steps) == len(rates),
        "stopped_reason": "reached max rate"
        if failed is None
        else f"first failing step at {failed['rate']:g}/s: {failed['reason']}",
        "generator_fell_behind_at": [st["rate"] for st in steps if st["fell_behind"]],
    }


async def run_bench(settings: BenchSettings, gens: Generators, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Run every step for every target (targets in turn within a step); the JSON-able result."""
    started = time.time()
    rates = settings.rates()
    entries = [_target_entry(t) for t in settings.targets]
    active = list(range(len(settings.targets)))
    first = True
    for k, rate in enumerate(rates):
        for j in list(active):
            if not first:
                await asyncio.sleep(settings.settle_s)
            first = False
            target = settings.targets[j]
            metrics = target.metrics if target.kind == "predict" else ""
            # The generators start START_DELAY_S after dispatch, then warm up: scrape as the window opens.
            window_start = (
                asyncio.create_task(scrape_feature_counters_after(metrics, START_DELAY_S + settings.warmup_s))
                if metrics
                else None
            )
            try:
                results = await gens.run(
                    target,
                    settings.mix,
                    rate,
                    warmup_s=settings.warmup_s,
                    duration_s=settings.duration_s,
                    deadline_s=settings.deadline_s,
                    seed=settings.seed * 1000 + k,  # the same arrivals and classes for every target
                )
            except BaseException:
                if window_start is not None:
                    window_start.cancel()
                raise
            step, merged = analyse_step(
                results, settings.mix.classes, deadline_s=settings.deadline_s, has_served_by=target.has_served_by
            )
            reason = step_verdict(
                merged, p99_limit_s=settings.deadline_s, goodput_min_fraction=settings.goodput_min_fraction
            )
            step["passed"], step["reason"] = reason is None, reason
            step["features"] = None
            if window_start is not None:
                before = await window_start
                step["features"] = feature_window(before, await asyncio.to_thread(scrape_feature_counters, metrics))
            entries[j]["steps"].append(step)
            if on_step is not None:
                on_step(entries[j], step)
            if reason is not None and settings.mode == "sweep":
                active.remove(j)
        if not active:
            break
    for entry in entries:
        entry["knee"] = _knee(entry, rates) if settings.mode == "sweep" else None
    return {
        "benchmark": "inferline bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "settings": settings.to_dict(),
        "max_start_lag_ms": MAX_START_LAG_S * 1000.0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "versions": versions(),
        "targets": entries,
    }


def step_line(target: dict[str, Any], step: dict[str, Any]) -> str:
    """One line of progress for a finished step."""
    rt = step["response_time"]

    def num(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    verdict = "pass" if step["passed"] else f"FAIL {step['reason']}"
    behind = " (generator fell behind)" if step["fell_behind"] else ""
    served = step.get("served_by")
    by = " served_by " + ",".join(f"{k} {100 * (v or 0):.0f}%" for k, v in served.items()) if served else ""
    features = ""
    if target.get("kind") == "predict":
        features = "; " + (
            feature_text(step.get("features")) if target.get("metrics") else "hot cache: not measured (no --metrics)"
        )
    return (
        f"{target['name']:<8} {step['rate']:>7g}/s offered {num(step['offered_rate'])} sent {num(step['send_rate'])} "
        f"goodput {num(step['goodput'])} p50/p99 {num(rt['p50_ms'])}/{num(rt['p99_ms'])} ms "
        f"errors {step['errors'] or '-'}{by} lag99 {num(step['start_lag_p99_ms'])} ms {verdict}{behind}{features}"
    )
