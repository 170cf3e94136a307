"""Load step against the instance autoscaler: 30 % → 90 % of the knee, with and without a warm pool.

For each scenario (``--scenarios``: ``off:N`` = N instances and no controller, ``on:MIN:MAX``
= the controller between a warm pool of MIN and MAX), the same Poisson arrivals: the low
rate for ``--before-s``, then at once the high rate for ``--step-s``, straight at Triton's
``ModelInfer`` (the autoscaler scales Triton; the router's own overhead is measured
elsewhere). Reported per scenario: time from the step to the controller's decision and to
added capacity (the load call returned: the instance is loaded and warmed up), p99 response
time over the step and over its first ``--transient-s``, and the cost per 1K answers before
and after the step (busy time as the router's cost ledger prices it, and every loaded
instance priced as a device). The logic is ``inferline.bench.autoscale``.

    .venv/bin/python benchmarks/autoscale.py                 # sweep the knee at 1 instance first
    .venv/bin/python benchmarks/autoscale.py --knee 900 --scenarios off:1,on:1:4,on:2:4

Starts the bundled Triton on the model unless ``--triton-url`` names one (explicit model
control). Writes ``benchmarks/results/autoscale-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import aio as triton_aio

from inferline.bench.autoscale import Scenario, ScenarioResult, StepPlan, find_knee, run_scenario
from inferline.bench.harness import json_safe, versions
from inferline.bench.targets import triton_target
from inferline.core.config import AutoscalerConfig, InferlineConfig, ModelScalingConfig, load_config
from inferline.triton.launcher import TritonLauncher
from inferline.triton.statistics import model_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
console = Console(width=170)  # the table is wide; logs of a run are read in files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    p.add_argument("--triton-url", default=None, help="a running Triton (explicit model control); default: bundled")
    p.add_argument("--model", default="driver_ranker")
    p.add_argument(
        "--rows", type=int, default=64, help="rows per request (64: the model's instances, not the hop, are the limit)"
    )
    p.add_argument("--knee", type=float, default=None, help="knee (req/s); default: sweep it")
    p.add_argument("--knee-instances", type=int, default=1, help="instances of the model while sweeping the knee")
    p.add_argument("--start-rate", type=float, default=50.0, help="first rate of the knee sweep")
    p.add_argument("--max-rate", type=float, default=6000.0)
    p.add_argument("--step-factor", type=float, default=1.25, help="sweep rate multiplier")
    p.add_argument("--sweep-step-s", type=float, default=4.0)
    p.add_argument("--sweep-warmup-s", type=float, default=1.0)
    p.add_argument("--scenarios", default="off:1,on:1:4,on:2:4", help="comma-separated off:N | on:MIN:MAX")
    p.add_argument("--low", type=float, default=0.3, help="load before the step, as a fraction of the knee")
    p.add_argument("--high", type=float, default=0.9, help="load after the step, as a fraction of the knee")
    p.add_argument("--before-s", type=float, default=10.0)
    p.add_argument("--step-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--transient-s", type=float, default=3.0, help="the step's first seconds, reported apart")
    p.add_argument("--deadline-ms", type=float, default=50.0, help="per request (Triton's queue timeout too)")
    p.add_argument("--interval-s", type=float, default=0.5, help="controller: seconds between samples")
    p.add_argument("--scale-up-queue-ms", type=float, default=2.0, help="controller: add above this queue time")
    p.add_argument("--scale-up-after-s", type=float, default=1.5, help="controller: long this long first")
    p.add_argument("--scale-down-queue-ms", type=float, default=0.5)
    p.add_argument("--up-cooldown-s", type=float, default=2.0)
    p.add_argument("--scale-down-after-s", type=float, default=60.0, help="longer than a scenario: no removal")
    p.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks/results")
    a = p.parse_args(argv)
    try:
        a.scenario_list = [Scenario.parse(s) for s in a.scenarios.split(",") if s]
        a.controller = AutoscalerConfig(
            models={a.model: ModelScalingConfig()},
            interval_s=a.interval_s,
            scale_up_queue_ms=a.scale_up_queue_ms,
            scale_up_after_s=a.scale_up_after_s,
            scale_down_queue_ms=a.scale_down_queue_ms,
            up_cooldown_s=a.up_cooldown_s,
            scale_down_after_s=a.scale_down_after_s,
            down_cooldown_s=a.scale_down_after_s,
        )
    except ValueError as err:
        p.error(str(err))
    return a


def price_per_hour(config: InferlineConfig, model: str) -> tuple[str, float]:
    device = model_devices(config)(model)
    found = config.device_classes.get(device)
    return device, found.cost_per_hour if found else math.nan


async def run(a: argparse.Namespace, url: str, price: float) -> dict[str, Any]:
    deadline_s = a.deadline_ms / 1000
    client = triton_aio.InferenceServerClient(url)
    target = triton_target(url, a.model, a.rows, deadline_s=deadline_s)
    report: dict[str, Any] = {}
    try:
        knee = a.knee
        if knee is None:
            console.rule(f"knee sweep: {a.model} at {a.knee_instances} instance(s)")
            knee, report["knee_sweep"] = await find_knee(
                client,
                target,
                a.model,
                a.knee_instances,
                start_rate=a.start_rate,
                max_rate=a.max_rate,
                factor=a.step_factor,
                step_s=a.sweep_step_s,
                warmup_s=a.sweep_warmup_s,
                deadline_s=deadline_s,
            )
            console.print(f"knee: {knee} req/s ({report['knee_sweep']['stopped_reason']})")
            if knee is None:
                raise SystemExit("no knee: the first sweep step failed")
        plan = StepPlan(
            knee=knee,
            low_fraction=a.low,
            high_fraction=a.high,
            before_s=a.before_s,
            step_s=a.step_s,
            warmup_s=a.warmup_s,
            transient_s=a.transient_s,
            deadline_s=deadline_s,
        )
        report["knee"] = knee
        report["plan"] = vars(plan) | {"low_rate": plan.low_rate, "high_rate": plan.high_rate}
        results: list[ScenarioResult] = []
        for scenario in a.scenario_list:
            console.rule(f"{scenario.name}: {plan.low_rate} → {plan.high_rate} req/s")
            result = await run_scenario(client, target, a.model, scenario, plan, a.controller, price)
            results.append(result)
            print_result(result)
        report["scenarios"] = [r.to_dict() for r in results]
    finally:
        await target.close()
        await client.close()
    return report


def _f(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_result(r: ScenarioResult) -> None:
    console.print(
        f"decided after {_f(r.decided_after_s, '.2f')} s, capacity after {_f(r.capacity_after_s, '.2f')} s, "
        f"counts {r.counts}; p99 before {_f(r.before.p99_ms)} ms, step {_f(r.after.p99_ms)} ms "
        f"(first seconds {_f(r.p99_transient_ms)} ms); errors {r.after.errors or 'none'}"
    )


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"load step {report['plan']['low_rate']} → {report['plan']['high_rate']} req/s")
    for column in (
        "scenario",
        "to capacity s (decided)",
        "counts",
        "p99 before ms",
        "p99 step ms (first s)",
        "goodput step",
        "busy $/1K before→after",
        "provisioned $/1K before→after",
    ):
        table.add_column(column)
    for s in report["scenarios"]:
        before, after = s["before"], s["after"]
        table.add_row(
            s["scenario"]["name"],
            f"{_f(s['capacity_after_s'], '.2f')} ({_f(s['decided_after_s'], '.2f')})",
            "→".join(map(str, s["counts"])),
            _f(before["p99_ms"]),
            f"{_f(after['p99_ms'])} ({_f(s['p99_transient_ms'])})",
            f"{_f(after['goodput_fraction'] * 100)} %",
            f"{_f(before['busy_cost_per_1k'], '.3g')} → {_f(after['busy_cost_per_1k'], '.3g')}",
            f"{_f(before['provisioned_cost_per_1k'], '.3g')} → {_f(after['provisioned_cost_per_1k'], '.3g')}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config = load_config(a.config)
    device, price = price_per_hour(config, a.model)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    launcher: TritonLauncher | None = None
    url = a.triton_url
    if url is None:
        triton = config.triton.model_copy(update={"grpc_port": 0, "http_port": 0, "metrics_port": 0})
        launcher = TritonLauncher(
            triton, log_path=a.results_dir / f"autoscale-{stamp}-tritonserver.log", models=[a.model]
        )
        launcher.start()
        url = launcher.grpc_url
    try:
        report = uvloop.run(run(a, url, price))
    finally:
        if launcher is not None:
            launcher.stop()
    report |= {
        "command": " ".join(sys.argv),
        "model": a.model,
        "device": device,
        "cost_per_hour": price,
        "controller": a.controller.model_dump(exclude={"models"}),
        "versions": versions(),
    }
    out = a.results_dir / f"autoscale-{stamp}.json"
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print_report(report)
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
