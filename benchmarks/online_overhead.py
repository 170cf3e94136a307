"""Online path overhead: inferline's router against direct Triton and a bare Python hop.

One run, one machine, four targets in front of the same bundled Triton (model
``driver_ranker``):

* ``direct``       tritonclient's raw KServe v2 stub straight to Triton;
* ``passthrough``  benchmarks/passthrough.py, a grpc.aio servicer that only forwards
                   ModelInfer (the floor of any Python hop);
* ``router``       ``inferline up`` (router Predict, route ``driver_ranking``, 1 entity per
                   row, drawn Zipf-distributed (``--zipf-s``, default 1.1) over the demo
                   store's 100,000 drivers; ``--entities uniform`` for a flat draw).
* ``kserve``       the same router's KServe v2 front door: ModelInfer as a Triton client
                   sends it, with the tenant's key (the gate, then the forward to Triton).

It measures (a) unloaded latency, sequential calls interleaved round-robin across the
targets, and (b) each target's knee: the highest open-loop Poisson rate at which p99 of OK
answers stays under the deadline (100 ms) and goodput (OK within the deadline) is at least
95 % of offered. Rates climb ×1.25 from 250 req/s, each step a warm-up then a measured
window, until the first failing step. For the router it also reports the features
service's hot-cache hit rate and Feast reads per second, from the router's own counters:
over each step's measured window, and over the unloaded calls. Results go to
``benchmarks/results/online_overhead-<timestamp>.json`` (server logs beside it).

Direct and passthrough calls carry Triton's queue ``timeout`` = the deadline and a gRPC
deadline 5 s longer, so no call to Triton is cancelled (the bundled Triton 2.51 can crash
on cancelled calls under load); answers later than the deadline count as misses. Triton
is checked after every step; if it died, that is recorded and it is restarted on the same
ports before the next target.

    .venv/bin/python benchmarks/online_overhead.py                      # full run, ~10 min
    .venv/bin/python benchmarks/online_overhead.py --quick --targets direct,passthrough
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pathlib
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.bench.harness import (
    ServerProcess,
    feature_text,
    feature_window,
    fmt,
    health_serving,
    inferline_up,
    json_safe,
    scrape_feature_counters,
    scrape_feature_counters_after,
    versions,
    wait_until,
)
from inferline.bench.loadgen import (
    LoadResult,
    SequentialResult,
    SweepResult,
    SweepStep,
    measure_sequential,
    rate_ladder,
    sweep,
)
from inferline.bench.targets import (
    DEFAULT_ZIPF_S,
    ENTITY_DISTRIBUTIONS,
    Target,
    entity_sampler,
    kserve_target,
    predict_target,
    triton_live,
    triton_ready,
    triton_target,
)
from inferline.core.config import load_config
from inferline.core.ports import free_port, free_ports
from inferline.triton.launcher import TritonLauncher

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_TARGETS = ("direct", "passthrough", "router", "kserve")
ROUTER_TARGETS = frozenset({"router", "kserve"})
"""Targets served by the one ``inferline up``: Predict, and its KServe v2 front door."""
MODEL = "driver_ranker"
console = Console(width=None if sys.stdout.isatty() else 130)


@dataclass
class Settings:
    config: pathlib.Path
    targets: list[str]
    deadline_s: float
    unloaded_warmup: int
    unloaded_count: int
    start_rate: float
    step_factor: float
    max_rate: float
    step_s: float
    step_warmup_s: float
    seed: int
    traffic_class: str
    rows: int
    results_dir: pathlib.Path
    ready_timeout_s: float
    quick: bool
    strict_generator: bool
    entities: str = "zipf"
    zipf_s: float = DEFAULT_ZIPF_S


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    p.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help="comma-separated subset of direct,passthrough,router,kserve"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: short steps, ×2 ladder, few unloaded calls")
    p.add_argument("--max-rate", type=float, default=None, help="highest rate tried (default 12000; quick 4000)")
    p.add_argument("--start-rate", type=float, default=250.0)
    p.add_argument("--step-factor", type=float, default=None, help="rate multiplier per step (default 1.25; quick 2)")
    p.add_argument("--step-s", type=float, default=None, help="measured seconds per step (default 5; quick 1)")
    p.add_argument("--step-warmup-s", type=float, default=None, help="warm-up seconds per step (default 1; quick 0.5)")
    p.add_argument("--unloaded", type=int, default=None, help="measured sequential calls (default 2000; quick 200)")
    p.add_argument("--unloaded-warmup", type=int, default=None, help="warm-up calls (default 300; quick 50)")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--traffic-class", default="critical", help="router traffic class")
    p.add_argument("--rows", type=int, default=1, help="rows per direct/passthrough request (= entities per Predict)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--entities", choices=ENTITY_DISTRIBUTIONS, default="zipf", help="router entity ids over the demo store"
    )
    p.add_argument("--zipf-s", type=float, default=DEFAULT_ZIPF_S, help="Zipf exponent (default 1.1)")
    p.add_argument(
        "--strict-generator",
        action="store_true",
        help="a step where the generator fell behind (p99 start lag > 5 ms) fails the sweep",
    )
    p.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks/results")
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    targets = [t for t in ALL_TARGETS if t in targets]  # fixed order: direct first
    if not a.zipf_s > 0:
        p.error("--zipf-s must be positive")

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if a.quick else full)

    return Settings(
        config=a.config,
        targets=targets,
        deadline_s=a.deadline_ms / 1000.0,
        unloaded_warmup=pick(a.unloaded_warmup, 300, 50),
        unloaded_count=pick(a.unloaded, 2000, 200),
        start_rate=a.start_rate,
        step_factor=pick(a.step_factor, 1.25, 2.0),
        max_rate=pick(a.max_rate, 12000.0, 4000.0),
        step_s=pick(a.step_s, 5.0, 1.0),
        step_warmup_s=pick(a.step_warmup_s, 1.0, 0.5),
        seed=a.seed,
        traffic_class=a.traffic_class,
        rows=a.rows,
        results_dir=a.results_dir,
        ready_timeout_s=a.ready_timeout_s,
        quick=a.quick,
        strict_generator=a.strict_generator,
        entities=a.entities,
        zipf_s=a.zipf_s,
    )


@dataclass
class Stack:
    """Triton (via the launcher) and the server subprocesses; ``close`` stops everything."""

    launcher: TritonLauncher
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    router_metrics: str = ""
    """The router's metrics endpoint (``HOST:PORT``): its hot-cache and Feast read counters."""

    def close(self) -> None:
        for server in self.servers.values():
            try:
                server.stop()
            except Exception as exc:  # keep reaping the others
                console.print(f"[red]stopping {server.name} failed: {exc!r}")
        self.launcher.stop()


async def triton_metadata(url: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(url) as channel:
        try:
            md = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                service_pb2.ServerMetadataRequest(), timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            return {"error": str(exc.code().name)}
        return {"name": md.name, "version": md.version}


def print_step(target: str, step: SweepStep, windows: list[dict[str, Any]] | None = None) -> None:
    r: LoadResult = step.result
    features = f" {feature_text(windows[-1])}" if windows else ""
    verdict = "[green]ok[/]" if step.passed else f"[red]FAIL[/] {step.reason}"
    behind = " [yellow](generator behind)[/]" if r.fell_behind else ""
    console.print(
        f"  {target:<11} {r.rate:>7.0f}/s offered {r.offered_rate:>7.0f} good {r.goodput:>7.0f} "
        f"p50 {fmt(r.response_time.p50_ms):>6} p99 {fmt(r.response_time.p99_ms):>6} ms "
        f"lag99 {fmt(r.start_lag_p99_ms):>5} ms gen-cpu {r.generator_cpu:4.0%} "
        f"err {sum(r.errors.values())}{features} {verdict}{behind}",
        highlight=False,
    )


async def start_servers(stack: Stack, s: Settings, log_dir: pathlib.Path) -> str:
    await asyncio.to_thread(stack.launcher.start)
    triton_url = stack.launcher.grpc_url
    console.print(f"triton ready at {triton_url} (log {stack.launcher.log_path})")
    if "passthrough" in s.targets:
        port = free_port()
        server = ServerProcess(
            "passthrough",
            f"127.0.0.1:{port}",
            [
                sys.executable,
                str(ROOT / "benchmarks/passthrough.py"),
                "--listen",
                f"127.0.0.1:{port}",
                "--triton",
                triton_url,
            ],
            log_dir / "passthrough.log",
            cwd=ROOT,
        )
        stack.servers["passthrough"] = server
        server.start()
        await wait_until(lambda: triton_ready(server.url), "passthrough", server, s.ready_timeout_s)
        console.print(f"passthrough ready at {server.url}")
    if ROUTER_TARGETS & set(s.targets):
        port, metrics_port = free_ports(2)
        stack.router_metrics = f"127.0.0.1:{metrics_port}"
        server = ServerProcess(
            "router",
            f"127.0.0.1:{port}",
            inferline_up(s.config, port, metrics_port, "--triton-url", triton_url),
            log_dir / "router.log",
            cwd=ROOT,
        )
        stack.servers["router"] = server
        server.start()
        await wait_until(lambda: health_serving(server.url), "router", server, s.ready_timeout_s)
        console.print(f"router ready at {server.url}")
    return triton_url


def build_targets(stack: Stack, s: Settings, triton_url: str) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for name in s.targets:
        if name == "direct":
            targets[name] = triton_target(triton_url, MODEL, s.rows, deadline_s=s.deadline_s, name=name)
        elif name == "passthrough":
            url = stack.servers[name].url
            targets[name] = triton_target(url, MODEL, s.rows, deadline_s=s.deadline_s, name=name)
        elif name == "kserve":
            url = stack.servers["router"].url
            targets[name] = kserve_target(url, MODEL, s.rows, deadline_s=s.deadline_s, traffic_class=s.traffic_class)
        else:
            targets[name] = predict_target(
                stack.servers[name].url,
                traffic_class=s.traffic_class,
                deadline_s=s.deadline_s,
                entities_per_request=s.rows,
                entity_ids_sampler=entity_sampler(s.entities, zipf_s=s.zipf_s, seed=s.seed),
            )
    return targets


async def run(stack: Stack, s: Settings, log_dir: pathlib.Path) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg()
    triton_url = await start_servers(stack, s, log_dir)
    targets = build_targets(stack, s, triton_url)
    report: dict[str, Any] = {
        "benchmark": "online_overhead",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before},
        "versions": versions(),
        "triton": await triton_metadata(triton_url),
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(s).items()},
        "model": MODEL,
        "triton_deaths": [],
    }
    try:
        console.rule("unloaded latency (sequential, interleaved)")
        metrics = stack.router_metrics
        before = await asyncio.to_thread(scrape_feature_counters, metrics) if metrics else None
        unloaded = await measure_sequential(
            {name: t.call for name, t in targets.items()}, warmup=s.unloaded_warmup, count=s.unloaded_count
        )
        if before is not None:  # warm-up calls included
            after = await asyncio.to_thread(scrape_feature_counters, metrics)
            report["unloaded_features"] = feature_window(before, after)
            console.print(f"  router: {feature_text(report['unloaded_features'])} (warm-up calls included)")
        for name, u in unloaded.items():
            console.print(
                f"  {name:<11} p50 {fmt(u.latency.p50_ms)} ms  p99 {fmt(u.latency.p99_ms)} ms  errors {u.errors}",
                highlight=False,
            )
        report["unloaded"] = {name: u.to_dict() for name, u in unloaded.items()}

        rates = rate_ladder(s.start_rate, max_rate=s.max_rate, factor=s.step_factor)
        sweeps: dict[str, SweepResult] = {}
        sweeps_features: dict[str, list[dict[str, Any]]] = {}
        for name, target in targets.items():
            console.rule(f"knee sweep: {name}")
            await asyncio.sleep(2.0)  # let the previous target's overload drain everywhere
            if not (stack.launcher.is_running() and await triton_live(triton_url)):
                console.print("[yellow]triton is down; restarting it on the same ports")
                await asyncio.to_thread(stack.launcher.restart)
            server = stack.servers.get("router" if name in ROUTER_TARGETS else name)
            # The router's hot cache over each step's measured window: scraped as it opens (the
            # step's warm-up after the previous step's end) and as the step ends.
            windows: list[dict[str, Any]] = []
            opening: list[asyncio.Task[dict[str, Any]]] = []
            if name == "router" and metrics:
                opening.append(asyncio.create_task(scrape_feature_counters_after(metrics, s.step_warmup_s)))

            async def after_step(
                result: LoadResult,
                name: str = name,
                server: ServerProcess | None = server,
                windows: list[dict[str, Any]] = windows,
                opening: list[asyncio.Task[dict[str, Any]]] = opening,
            ) -> str | None:
                if opening:
                    before = await opening.pop()
                    windows.append(feature_window(before, await asyncio.to_thread(scrape_feature_counters, metrics)))
                await asyncio.sleep(0.5)  # let the servers settle between steps
                if name == "router" and metrics:  # the next step starts when this returns
                    opening.append(asyncio.create_task(scrape_feature_counters_after(metrics, s.step_warmup_s)))
                if not (stack.launcher.is_running() and await triton_live(triton_url)):
                    code = stack.launcher.returncode
                    report["triton_deaths"].append({"target": name, "rate": result.rate, "returncode": code})
                    console.print(f"[red]triton died during {name} at {result.rate:g}/s (returncode {code})")
                    return f"triton died (returncode {code})"
                if server is not None and not server.alive():
                    return f"{name} process exited"
                if name not in ROUTER_TARGETS and result.errors.get("DEADLINE_EXCEEDED"):
                    # The client cancelled calls Triton may still have been running.
                    console.print(f"[yellow]{name}: client deadline hit at {result.rate:g}/s: calls were cancelled")
                return None

            sweeps[name] = await sweep(
                target.call,
                rates=rates,
                step_s=s.step_s,
                warmup_s=s.step_warmup_s,
                deadline_s=s.deadline_s,
                seed=s.seed,
                strict_generator=s.strict_generator,
                after_step=after_step,
                on_step=functools.partial(print_step, name, windows=windows),
            )
            for task in opening:  # the window after the last step never opened
                task.cancel()
            sweeps_features[name] = windows
            if server is not None and not server.alive():
                console.print(f"[red]{name} exited; later targets continue without it\n{server.log_tail()}")
        report["sweeps"] = {name: sw.to_dict() for name, sw in sweeps.items()}
        for name, windows in sweeps_features.items():
            for step, window in zip(report["sweeps"][name]["steps"], windows, strict=False):
                step["features"] = window
        report["summary"] = summarize(unloaded, sweeps)
    finally:
        for target in targets.values():
            await target.close()
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["duration_s"] = round(time.time() - started, 1)
    return report


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(unloaded: dict[str, SequentialResult], sweeps: dict[str, SweepResult]) -> dict[str, Any]:
    knees = {name: sw.knee_rate for name, sw in sweeps.items()}
    out: dict[str, Any] = {
        "unloaded_p50_ms": {n: u.latency.p50_ms for n, u in unloaded.items()},
        "unloaded_p99_ms": {n: u.latency.p99_ms for n, u in unloaded.items()},
        "knee_rate": knees,
        "knee_is_lower_bound": {n: sw.knee_is_lower_bound for n, sw in sweeps.items()},
    }
    direct = unloaded.get("direct")
    for name in ("passthrough", "router", "kserve"):
        if direct is not None and name in unloaded:
            out[f"{name}_minus_direct_p50_ms"] = round(unloaded[name].latency.p50_ms - direct.latency.p50_ms, 3)
            out[f"{name}_minus_direct_p99_ms"] = round(unloaded[name].latency.p99_ms - direct.latency.p99_ms, 3)
    out["router_knee_over_passthrough_knee"] = ratio(knees.get("router"), knees.get("passthrough"))
    out["router_knee_over_direct_knee"] = ratio(knees.get("router"), knees.get("direct"))
    out["passthrough_knee_over_direct_knee"] = ratio(knees.get("passthrough"), knees.get("direct"))
    # The thin-hop target: the front door's knee against the bare hop's, both forwarding ModelInfer.
    out["kserve_knee_over_passthrough_knee"] = ratio(knees.get("kserve"), knees.get("passthrough"))
    return out


def print_report(report: dict[str, Any]) -> None:
    summary = report.get("summary", {})
    unloaded = report.get("unloaded", {})
    sweeps = report.get("sweeps", {})
    knees = summary.get("knee_rate", {})
    table = Table(title=f"online path overhead — deadline {report['settings']['deadline_s'] * 1000:g} ms")
    table.add_column("target")
    for col in ("p50 ms", "p99 ms", "Δp50 vs direct", "knee req/s", "p99 at knee", "knee/passthrough", "knee/direct"):
        table.add_column(col, justify="right")
    for name in unloaded:
        lat = unloaded[name]["latency"]
        sw = sweeps.get(name, {})
        knee = knees.get(name)
        knee_step = next((st for st in sw.get("steps", []) if st["rate"] == knee and st["passed"]), None)
        delta = None if name == "direct" else summary.get(f"{name}_minus_direct_p50_ms")
        knee_txt = "-" if knee is None else f"{'≥' if sw.get('knee_is_lower_bound') else ''}{knee:g}"
        table.add_row(
            name,
            fmt(lat["p50_ms"]),
            fmt(lat["p99_ms"]),
            "" if delta is None else f"{delta:+.2f}",
            knee_txt,
            fmt(knee_step["response_time"]["p99_ms"]) if knee_step else "-",
            "" if name == "passthrough" else fmt(ratio(knee, knees.get("passthrough"))),
            "" if name == "direct" else fmt(ratio(knee, knees.get("direct"))),
        )
    console.print(table)
    for name, sw in sweeps.items():
        console.print(f"  {name}: {sw['stopped_reason']}", highlight=False)
        if sw["generator_fell_behind_at"]:
            console.print(
                f"  [yellow]{name}: generator fell behind (p99 start lag > 5 ms) at "
                f"{', '.join(f'{r:g}' for r in sw['generator_fell_behind_at'])} req/s: the machine was "
                "saturated; lag counts against the target (response time from the schedule)",
                highlight=False,
            )
    router = sweeps.get("router", {})
    at_knee = next((st for st in router.get("steps", []) if st["rate"] == knees.get("router")), None)
    if router:
        console.print(
            f"  router, {report['settings']['entities']} entities: at the knee step "
            f"{feature_text((at_knee or {}).get('features'))}; "
            f"unloaded {feature_text(report.get('unloaded_features'))}",
            highlight=False,
        )
    r = summary.get("router_knee_over_passthrough_knee")
    if r is not None:
        console.print(f"router knee / passthrough knee = [bold]{r:.2f}[/]")
    if report.get("triton_deaths"):
        console.print(f"[red]Triton died during the run: {report['triton_deaths']}")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    s.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = s.results_dir / f"online_overhead-{stamp}-logs"
    triton_cfg = load_config(s.config).triton.model_copy(update={"grpc_port": 0, "http_port": 0, "metrics_port": 0})
    stack = Stack(TritonLauncher(triton_cfg, log_path=log_dir / "tritonserver.log"))
    if not ROUTER_TARGETS & set(s.targets):
        console.print("[yellow]router targets skipped (--targets); measuring " + ", ".join(s.targets))

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = uvloop.run(run(stack, s, log_dir))
    finally:
        stack.close()  # reaps Triton and every server subprocess, whatever happened
    report["logs"] = str(log_dir)
    out = s.results_dir / f"online_overhead-{stamp}.json"
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print_report(report)
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
