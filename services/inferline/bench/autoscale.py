"""The load-step benchmark of the instance autoscaler (issue 13): what a step in load costs with
and without a warm pool, and what the capacity added for it costs.

One *scenario* is one Triton model, an initial instance count (the warm pool, ``min``), a
maximum and the controller on or off. Each runs the same two open-loop Poisson phases
(``inferline.bench.loadgen``, the same seeds): ``low_fraction`` of the knee for ``before_s``,
then at once ``high_fraction`` of it for ``step_s``. Measured per scenario:

* **time to added capacity**: from the step to the end of the first load call that raised
  the count (``ScalingEvent.ready_s``: Triton returns once the new instance is loaded and has
  run its warm-up), and to the decision (``decided_s``); None when nothing was added.
* **p99 during the step**: response time (scheduled arrival to answer) of OK answers over the
  whole high phase, and over its first ``transient_s`` (before added capacity can help).
* **cost per 1K requests** before and after the step, two ways: *busy* prices Triton's busy
  time of the model (``batch_stats``) at its device's ``cost_per_hour``, the rule of
  ``inferline.triton.statistics.CostLedger`` that ``inferline_cost_per_1k_requests``
  exports; *provisioned* prices every loaded instance for the whole phase as one device (what
  a warm pool costs while idle, which busy time does not see).

The knee is given, or found as ``benchmarks/overload.py`` finds it: climb a rate ladder
(``loadgen.sweep``) until the first step whose p99 response time passes the deadline or
whose goodput falls under 95 % of offered, here with the model at ``knee_instances``.

Everything that decides a number is a pure function below (unit tested); ``run_scenario``
and ``find_knee`` drive the real Triton.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from inferline.bench.loadgen import OK, LoadResult, RequestRecord, percentile, rate_ladder, run_open_loop, sweep
from inferline.bench.targets import Target
from inferline.core.config import AutoscalerConfig, ModelScalingConfig
from inferline.triton.autoscaler import InstanceAutoscaler, ScalingEvent, TritonInstanceControl
from inferline.triton.statistics import ModelTotals, model_totals


@dataclass(frozen=True)
class Scenario:
    """One way of meeting the step: the warm pool, the ceiling, and whether the controller runs."""

    name: str
    min_instances: int
    max_instances: int
    controller: bool

    @classmethod
    def parse(cls, spec: str) -> Scenario:
        """``off:N`` (N instances, no controller) or ``on:MIN:MAX``.

        Raises:
            ValueError: naming the bad ``spec``.
        """
        parts = spec.split(":")
        try:
            if parts[0] == "off" and len(parts) == 2:
                n = int(parts[1])
                if n >= 1:
                    return cls(f"off, {n} instance{'s' if n > 1 else ''}", n, n, controller=False)
            elif parts[0] == "on" and len(parts) == 3:
                bounds = ModelScalingConfig(min_instances=int(parts[1]), max_instances=int(parts[2]))
                return cls(
                    f"on, warm pool {bounds.min_instances}, max {bounds.max_instances}",
                    bounds.min_instances,
                    bounds.max_instances,
                    controller=True,
                )
        except ValueError:
            pass
        raise ValueError(f"scenario must be off:N or on:MIN:MAX (MIN <= MAX, both >= 1), got {spec!r}")


@dataclass(frozen=True)
class StepPlan:
    """The load step every scenario meets."""

    knee: float
    """Requests per second at the knee."""
    low_fraction: float = 0.3
    high_fraction: float = 0.9
    before_s: float = 10.0
    step_s: float = 20.0
    warmup_s: float = 2.0
    """Sent at the low rate before ``before_s`` and left out of every figure."""
    transient_s: float = 3.0
    deadline_s: float = 0.05

    @property
    def low_rate(self) -> float:
        return round(self.knee * self.low_fraction, 1)

    @property
    def high_rate(self) -> float:
        return round(self.knee * self.high_fraction, 1)


def time_to_capacity(step_at: float, events: Sequence[ScalingEvent]) -> tuple[float | None, float | None]:
    """(decision, ready) seconds from ``step_at`` to the first count increase decided at or after
    it; (None, None) when the count never went up after the step."""
    for event in events:
        if event.after > event.before and event.decided_s >= step_at:
            return event.decided_s - step_at, event.ready_s - step_at
    return None, None


def instance_seconds(initial: int, events: Sequence[ScalingEvent], start: float, end: float) -> float:
    """Instances × seconds loaded over ``[start, end]``: ``initial`` until the first change, each
    change counted from its ``ready_s`` (for a removal too: the instance is paid until it is gone)."""
    if end <= start:
        return 0.0
    total, count, since = 0.0, initial, start
    for event in sorted(events, key=lambda e: e.ready_s):
        if event.ready_s <= start:
            count = event.after
            continue
        if event.ready_s >= end:
            break
        total += count * (event.ready_s - since)
        count, since = event.after, event.ready_s
    return total + count * (end - since)


def cost_per_1k(seconds: float, price_per_hour: float, requests: int) -> float:
    """Device cost of ``seconds`` at ``price_per_hour`` per 1,000 of ``requests``; NaN without requests."""
    return seconds * price_per_hour / 3600 / requests * 1000 if requests else math.nan


def p99_window_ms(records: Sequence[RequestRecord], start_s: float, end_s: float) -> float:
    """p99 response time (ms) of the OK answers to arrivals scheduled in ``[start_s, end_s)`` of a run."""
    times = sorted(r.start_lag_s + r.latency_s for r in records if r.outcome == OK and start_s <= r.scheduled_s < end_s)
    return round(percentile(times, 99) * 1000, 3) if times else math.nan


def busy_seconds(before: ModelTotals | None, after: ModelTotals | None) -> float:
    """Triton's busy time of a model between two snapshots (0 when either is missing or it restarted)."""
    if before is None or after is None or after.busy_ns < before.busy_ns:
        return 0.0
    return (after.busy_ns - before.busy_ns) / 1e9


@dataclass
class PhaseFigures:
    """One phase (before or after the step) of one scenario."""

    rate: float
    ok: int
    goodput_fraction: float
    p99_ms: float
    errors: dict[str, int]
    busy_s: float
    instance_s: float
    busy_cost_per_1k: float
    provisioned_cost_per_1k: float
    fell_behind: bool


@dataclass
class ScenarioResult:
    scenario: Scenario
    before: PhaseFigures
    after: PhaseFigures
    p99_transient_ms: float
    """p99 over the first ``transient_s`` of the step."""
    decided_after_s: float | None
    capacity_after_s: float | None
    counts: list[int]
    """The instance count at the step and after each change that followed it."""
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def phase_figures(result: LoadResult, busy_s: float, instance_s: float, price_per_hour: float) -> PhaseFigures:
    """A phase's figures; cost per 1K over its OK answers (the requests it served)."""
    return PhaseFigures(
        rate=result.rate,
        ok=result.ok,
        goodput_fraction=round(result.goodput_fraction, 4),
        p99_ms=result.response_time.p99_ms,
        errors=dict(result.errors),
        busy_s=round(busy_s, 4),
        instance_s=round(instance_s, 2),
        busy_cost_per_1k=cost_per_1k(busy_s, price_per_hour, result.ok),
        provisioned_cost_per_1k=cost_per_1k(instance_s, price_per_hour, result.ok),
        fell_behind=result.fell_behind,
    )


async def _totals(control_client: Any, model: str) -> ModelTotals | None:
    reply = await control_client.get_inference_statistics(model_name=model, client_timeout=30.0)
    return model_totals(reply).get(model)


async def run_scenario(
    client: Any,
    target: Target,
    model: str,
    scenario: Scenario,
    plan: StepPlan,
    controller: AutoscalerConfig,
    price_per_hour: float,
    seed: int = 0,
) -> ScenarioResult:
    """The step of ``plan`` on ``model`` as ``scenario`` says; the model is left at ``min_instances``.

    ``client``: a ``tritonclient.grpc.aio`` client of the Triton ``target`` calls.
    ``controller``: the rules (thresholds, cool-downs); its ``models`` are replaced by the scenario's.
    """
    control = TritonInstanceControl(client)
    if await control.instance_count(model) != scenario.min_instances:
        await control.set_instance_count(model, scenario.min_instances)
    events: list[ScalingEvent] = []
    clock = time.perf_counter  # the load generator's clock: events and arrivals on one timeline
    autoscaler: InstanceAutoscaler | None = None
    if scenario.controller:
        bounds = ModelScalingConfig(min_instances=scenario.min_instances, max_instances=scenario.max_instances)
        config = controller.model_copy(update={"models": {model: bounds}})
        autoscaler = InstanceAutoscaler(config, control, clock=clock, on_change=events.append)
        await autoscaler.start()
    try:
        # The warm-up at the low rate is a run of its own, so the snapshot after it starts the
        # low phase's busy time exactly where its requests start being counted.
        await run_open_loop(
            target.call,
            rate=plan.low_rate,
            duration_s=plan.warmup_s,
            deadline_s=plan.deadline_s,
            seed=seed + 2,
            keep_records=False,
        )
        low_start = clock()
        at_low = await _totals(client, model)
        low = await run_open_loop(
            target.call, rate=plan.low_rate, duration_s=plan.before_s, deadline_s=plan.deadline_s, seed=seed
        )
        at_step = await _totals(client, model)
        step_at = clock()
        high = await run_open_loop(
            target.call, rate=plan.high_rate, duration_s=plan.step_s, deadline_s=plan.deadline_s, seed=seed + 1
        )
        step_end = clock()
        end = await _totals(client, model)
    finally:
        if autoscaler is not None:
            await autoscaler.stop()
    return _result(
        scenario=scenario,
        plan=plan,
        low=low,
        high=high,
        low_window=(low_start, step_at),
        high_window=(step_at, step_end),
        busy=(busy_seconds(at_low, at_step), busy_seconds(at_step, end)),
        events=events,
        price_per_hour=price_per_hour,
    )


def _result(
    *,
    scenario: Scenario,
    plan: StepPlan,
    low: LoadResult,
    high: LoadResult,
    low_window: tuple[float, float],
    high_window: tuple[float, float],
    busy: tuple[float, float],
    events: list[ScalingEvent],
    price_per_hour: float,
) -> ScenarioResult:
    step_at = high_window[0]
    initial = scenario.min_instances
    decided, ready = time_to_capacity(step_at, events)
    count = scenario.min_instances
    for event in events:
        if event.ready_s <= step_at:
            count = event.after
    counts = [count] + [e.after for e in events if e.ready_s > step_at]
    return ScenarioResult(
        scenario=scenario,
        before=phase_figures(low, busy[0], instance_seconds(initial, events, *low_window), price_per_hour),
        after=phase_figures(high, busy[1], instance_seconds(initial, events, *high_window), price_per_hour),
        p99_transient_ms=p99_window_ms(high.records, 0.0, plan.transient_s),
        decided_after_s=None if decided is None else round(decided, 3),
        capacity_after_s=None if ready is None else round(ready, 3),
        counts=counts,
        events=[
            {
                "before": e.before,
                "after": e.after,
                "queue_ms": round(e.sample.queue_ms, 3),
                "decided_s": round(e.decided_s - step_at, 3),
                "ready_s": round(e.ready_s - step_at, 3),
            }
            for e in events
        ],
    )


async def find_knee(
    client: Any,
    target: Target,
    model: str,
    instances: int,
    *,
    start_rate: float,
    max_rate: float,
    factor: float,
    step_s: float,
    warmup_s: float,
    deadline_s: float,
) -> tuple[float | None, dict[str, Any]]:
    """The knee of ``model`` at ``instances`` instances (the last passing rate of the ladder) and the sweep."""
    control = TritonInstanceControl(client)
    if await control.instance_count(model) != instances:
        await control.set_instance_count(model, instances)
    result = await sweep(
        target.call,
        rates=rate_ladder(start_rate, max_rate=max_rate, factor=factor),
        step_s=step_s,
        warmup_s=warmup_s,
        deadline_s=deadline_s,
    )
    return result.knee_rate, result.to_dict()
