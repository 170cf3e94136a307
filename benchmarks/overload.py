"""Overload: the router at 1×, 2× and 3× its knee, with and without admission control.

Issue #4's overload benchmark. It starts ``inferline up`` (embedded: router, features,
post-processing and degradation in one process, plus its own bundled Triton) and drives
``Predict`` on route ``driver_ranking`` with open-loop Poisson arrivals: 30 % critical,
35 % standard, 35 % batch (each request's class drawn with a seeded RNG), one entity per
request drawn Zipf-distributed (``--zipf-s``, default 1.1) over the demo store's 100,000
drivers (``--entities uniform`` for a flat draw), so that the features service's hot cache
and Feast are both on the path, a 100 ms gRPC deadline on every request.

1. **Knee** (with the first configuration, admission on): the highest rate of a ladder
   (×1.25 from 200 req/s; ×1.5 with ``--quick``) at which the p99 response time of OK
   answers stays under the deadline, goodput (OK answers before the deadline) is at least
   95 % of offered and at least 95 % of requests are answered by PRIMARY or LIGHT (cheap
   cache answers from an open breaker must not carry the knee past the main path's
   capacity). ``--knee`` skips it.
2. **Overload**: for each configuration (``--admission``, each on a fresh ``inferline up``)
   — ``on``, ``off`` (``INFERLINE_ROUTES__DRIVER_RANKING__ADMISSION__ENABLED=false``),
   ``gateway`` (on, behind Envoy shedding on the router's overload signal) and
   ``gateway-sr`` (the same, Envoy shedding on success rates) and ``gateway-off`` (Envoy as a
   plain proxy, admission off: the gateway path without admission control), and ``default``
   (``inferline up`` as installed, with the gateway it starts itself) — fixed runs at
   ``--multipliers`` × the knee (default 1, 2, 3), ``--duration`` seconds each after a
   warm-up; the same seeds, so all configurations see the same arrivals and mix. The knee
   is that of the path measured: sweep with ``gateway`` first to find the gateway path's.

``--front-door kserve`` drives the router's KServe v2 front door instead (ModelInfer of the
route's primary model, the class in the ``x-inferline-traffic-class`` header; a tensor answer
has no degraded form, so every OK one counts as PRIMARY); ``--workers N`` runs the ``default``
configuration with N router processes behind its gateway (``inferline up --workers N``).

``--server-cpus 1 --generator-cpus 0`` pins the router and its Triton (and Envoy, unless
``--gateway-cpus``) to CPU 1 and the load to CPU 0, as if the clients ran elsewhere; without
it, on a small machine the generators take the server's CPU and every configuration
measures the machine's saturation. ``--generator-nice -10`` keeps the generators on the
shared cores but schedules them first, so that they send on time and read answers as they
come (as clients on machines of their own would) while still taking their CPU from the
servers. ``--gateway-nice`` runs Envoy at another niceness;
``--gateway-in-flight`` sets its in-flight limit on the shed classes (``gateway.in_flight``).

The load comes from ``--generators`` processes (``inferline.bench.multiproc``, the same
generators as ``inferline bench``), each with its own uvloop and grpc.aio channel, running
``inferline.bench.loadgen.run_open_loop`` on its share of the rate with its own seed (one
asyncio generator cannot keep up at 2-3× the knee on two cores). All start at the same
instant (``perf_counter`` is CLOCK_MONOTONIC, shared by processes on Linux). Per request
they record class, scheduled time, start lag, latency, status code and ``served_by``; the
parent merges them. Response time runs from the
scheduled arrival, so a generator that lags makes the router look worse, never better;
a run whose p99 start lag exceeds 5 ms is flagged: the generators fell behind, and the run
measured the machine's saturation as much as the router.

Per run it reports the offered rate, the rate requests were actually sent at, goodput apart
by who answered — PRIMARY or LIGHT (capacity; its share of the knee is the target) and
CACHE or BASELINE (the degradation path working) — and per class: OK before the deadline, answered by PRIMARY
or LIGHT, shed (RESOURCE_EXHAUSTED) and how fast (from the start of the call, which
leaves generator lag out; sheds by the gateway and by the router apart), other errors,
response-time percentiles of OK answers; Envoy's own time for its sheds, from the
gateway's access log (``gateway.access_log``, ``inferline.bench.gateway_log``: from the
first byte Envoy read to the last it wrote, without the waits on either side); the
router's RSS (``/proc/<pid>/status`` VmRSS) at the start and end of the measured window; the
hot-cache hit rate and Feast reads per second over the measured window (the router's own
counters, scraped as the window opens and after it closes);
whether the bundled Triton survived (same pid, live); the admission limit and the shed
counters the router exports. Targets checked per run: goodput ≥ 90 % of the knee, critical
≥ 99 % answered before the deadline and ≥ 95 % by PRIMARY or LIGHT, shed p99 < 5 ms,
router RSS flat (< 32 MB growth over the window), Triton up. Results:
``benchmarks/results/overload-<timestamp>.json``, router logs beside it.

    .venv/bin/python benchmarks/overload.py                          # full run, ~5 min
    .venv/bin/python benchmarks/overload.py --admission gateway,gateway-sr --server-cpus 1 --generator-cpus 0
    .venv/bin/python benchmarks/overload.py --quick                  # smoke test, ~2 min
    .venv/bin/python benchmarks/overload.py --knee 500 --multipliers 2,3 --generators 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import platform
import random
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop
import yaml
from rich.console import Console
from rich.table import Table

from inferline.bench.analysis import SERVED_BY, generator_summary, iter_requests, send_rate
from inferline.bench.gateway_log import ACCESS_LOG_ENV, read_access_log, shed_times
from inferline.bench.harness import (
    ServerProcess,
    feature_text,
    feature_window,
    fmt,
    health_serving,
    inferline_up,
    json_safe,
    parse_cpus,
    scrape_feature_counters,
    scrape_feature_counters_after,
    versions,
    wait_until,
)
from inferline.bench.loadgen import OK, LoadResult, merge_load_results, percentile, rate_ladder, step_verdict
from inferline.bench.mix import DEFAULT_MIX
from inferline.bench.multiproc import MAX_START_LAG_S, START_DELAY_S, Generators, GenResult
from inferline.bench.process_tree import children
from inferline.bench.profile import process_cpu_s
from inferline.bench.recording import TargetSpec
from inferline.bench.targets import DEFAULT_ZIPF_S, ENTITY_DISTRIBUTIONS, triton_live
from inferline.core.config import parse_config
from inferline.core.ports import free_ports
from inferline.gateway import render_envoy
from inferline.stats import scrape as scrape_samples

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROUTE = "driver_ranking"
JOIN_KEY = "driver_id"
PRIMARY_MODEL = "driver_ranker"
"""The route's primary model: what `--front-door kserve` calls."""
MIX = DEFAULT_MIX
CLASSES = MIX.classes
SHED = "RESOURCE_EXHAUSTED"
ADMISSION_ENV = "INFERLINE_ROUTES__DRIVER_RANKING__ADMISSION__ENABLED"
CONFIGS = {
    "on": {ADMISSION_ENV: "true"},
    "off": {ADMISSION_ENV: "false"},
    "gateway": {ADMISSION_ENV: "true"},
    "gateway-sr": {ADMISSION_ENV: "true"},
    "gateway-off": {ADMISSION_ENV: "false"},
    "default": {ADMISSION_ENV: "true"},
}
"""``default``: ``inferline up`` as installed, its own embedded gateway in front (the config's
``gateway`` section, unchanged); ``gateway``: admission on, and the load goes through Envoy
(``inferline gateway render``), which sheds ``GATEWAY_SHED`` classes on the router's overload signal before the router's
Python code sees them; ``gateway-sr``: the same, Envoy shedding on the classes' success rate;
``gateway-off``: the same Envoy as a plain proxy (nothing shed) and admission off — the
gateway path without admission control."""
GATEWAY_SHED_BY = {"gateway": "signal", "gateway-sr": "success_rate", "gateway-off": "signal"}
PLAIN_PROXY = frozenset({"gateway-off"})
EMBEDDED = frozenset({"default"})
"""Configurations whose ``inferline up`` starts its own gateway on the port measured."""
"""Gateway configurations whose Envoy sheds nothing."""
GATEWAY_SHED: dict[str, dict[str, float]] = {"batch": {}, "standard": {}}
"""Classes Envoy sheds, with the config's defaults (``ClassShedConfig``)."""
ENVOY = ROOT / ".venv/bin/envoy"

# Targets (issue #4).
KNEE_GOODPUT_MIN = 0.95
"""Knee criterion: goodput at least this share of offered (and p99 of OK answers under the deadline)."""
FULL_MODEL = frozenset({"PRIMARY", "LIGHT"})
"""Answers by a model: capacity. CACHE and BASELINE answers are the degradation path's."""
KNEE_FULL_MODEL_MIN = 0.95
"""Knee criterion: at least this share of requests answered by PRIMARY or LIGHT. Without it the
knee climbs past the main path's capacity on cheap cache answers (an open breaker answers fast)."""
GOODPUT_OF_KNEE_MIN = 0.90
CRITICAL_IN_TIME_MIN = 0.99
CRITICAL_FULL_MODEL_MIN = 0.95
SHED_P99_MAX_MS = 5.0
RSS_GROWTH_MAX_MB = 32.0

console = Console(width=None if sys.stdout.isatty() else 220)


# --- settings -----------------------------------------------------------------------------


@dataclass
class Settings:
    config: pathlib.Path
    quick: bool
    duration_s: float
    warmup_s: float
    generators: int
    knee: float | None
    multipliers: list[float]
    admission: list[str]
    deadline_s: float
    start_rate: float
    step_factor: float
    max_rate: float
    step_s: float
    step_warmup_s: float
    seed: int
    results_dir: pathlib.Path
    ready_timeout_s: float
    entities: str = "zipf"
    """How each request's entity id is drawn from the demo store's drivers: ``zipf`` or ``uniform``."""
    zipf_s: float = DEFAULT_ZIPF_S
    server_cpus: frozenset[int] | None = None
    """CPUs of the router, its Triton and Envoy (None: not pinned)."""
    generator_cpus: frozenset[int] | None = None
    """CPUs of the load generators and this process (None: not pinned)."""
    gateway_cpus: frozenset[int] | None = None
    """CPUs of Envoy (None: the server's)."""
    gateway_nice: int = 0
    """Niceness of Envoy (negative: scheduled ahead of the router and Triton on a shared CPU)."""
    generator_nice: int | None = None
    connections: int = 1
    """Niceness of the load generators (None: this process's)."""
    signal_step_down: float | None = None
    """``gateway.signal.step_down`` of the ``gateway`` configuration (None: the config's default)."""
    gateway_settings: dict[str, Any] = field(default_factory=dict)
    """Gateway settings for the gateways (``--gateway-in-flight``, then ``--gateway-set``), nested
    as in the config; empty: the config's."""
    front_door: str = "predict"
    """``predict`` (the route) or ``kserve`` (the router's KServe v2 front door, the route's primary model)."""
    workers: int = 1
    """Router processes of the ``default`` configuration (``inferline up --workers``)."""


def parse_args(argv: list[str] | None = None) -> Settings:
    assert __doc__ is not None
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    p.add_argument("--quick", action="store_true", help="smoke test: short runs, ×1.5 ladder")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 20; quick 5)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each run (default 2; quick 1)")
    p.add_argument("--generators", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--knee", type=float, default=None, help="use this knee (req/s) and skip the sweep")
    p.add_argument("--multipliers", default="1,2,3", help="rates of the runs, as multiples of the knee")
    p.add_argument(
        "--admission",
        default="on,off",
        help="configurations to run, in order: on, off, gateway, gateway-sr, gateway-off, default",
    )
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--start-rate", type=float, default=200.0, help="first rate of the knee sweep")
    p.add_argument("--step-factor", type=float, default=None, help="sweep rate multiplier (default 1.25; quick 1.5)")
    p.add_argument("--max-rate", type=float, default=6000.0, help="highest rate the sweep tries")
    p.add_argument("--step-s", type=float, default=None, help="measured seconds per sweep step (default 4; quick 2)")
    p.add_argument("--step-warmup-s", type=float, default=None, help="warm-up per sweep step (default 1; quick 0.5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--entities", choices=ENTITY_DISTRIBUTIONS, default="zipf", help="entity ids over the demo store (default zipf)"
    )
    p.add_argument("--zipf-s", type=float, default=DEFAULT_ZIPF_S, help="Zipf exponent (default 1.1)")
    p.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks/results")
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    p.add_argument(
        "--server-cpus",
        default=None,
        help="pin the router, its Triton and Envoy to these CPUs (taskset list: 1 or 1-3)",
    )
    p.add_argument(
        "--generator-cpus",
        default=None,
        help="pin the load generators (and this process) to these CPUs, e.g. 0: the load then does not take the "
        "server's CPU, as with generators on another machine",
    )
    p.add_argument("--gateway-cpus", default=None, help="pin Envoy to these CPUs (default: --server-cpus)")
    p.add_argument(
        "--gateway-nice",
        type=int,
        default=0,
        help="run Envoy at this niceness, e.g. -10: a sidecar's own CPU share when it shares the server's CPUs",
    )
    p.add_argument(
        "--generator-nice",
        type=int,
        default=None,
        help="run the load generators at this niceness, e.g. -10: they send on time and read answers as they "
        "come, as clients on machines of their own would, while still taking their CPU from the shared cores",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections each load generator spreads its calls over (default 1): many stand for many callers; "
        "Envoy answers the streams one read of a connection brings after its pass over them all",
    )
    p.add_argument(
        "--signal-step-down", type=float, default=None, help="gateway.signal.step_down (default: the config's)"
    )
    p.add_argument(
        "--gateway-in-flight",
        default=None,
        help="the gateways' in-flight limit on the shed classes: 'adaptive', 'off', or N (a fixed cap of N per "
        "router, not adaptive) (default: the config's gateway.in_flight)",
    )
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a gateway setting for the gateways, VALUE in YAML, e.g. in_flight.min_rtt_ms=5 (repeatable)",
    )
    p.add_argument(
        "--front-door",
        choices=("predict", "kserve"),
        default="predict",
        help="drive Predict on the route, or ModelInfer of its primary model through the KServe front door "
        "(tensor answers: every OK one counts as PRIMARY)",
    )
    p.add_argument("--workers", type=int, default=1, help="router processes of the 'default' configuration")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be at least 1")
    gateway_settings: dict[str, Any] = {}
    if a.gateway_in_flight is not None:
        text = a.gateway_in_flight.strip()
        if text == "adaptive":
            gateway_settings["in_flight"] = {"adaptive": True}
        elif text == "off":
            gateway_settings["in_flight"] = {"adaptive": False, "max_per_router": None}
        elif text.isdigit() and int(text) >= 1:
            gateway_settings["in_flight"] = {"adaptive": False, "max_per_router": int(text)}
        else:
            p.error(f"--gateway-in-flight: 'adaptive', 'off' or a positive number, got {text!r}")
    for item in a.gateway_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--gateway-set: KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node = gateway_settings
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    cpus: dict[str, frozenset[int] | None] = {}
    for flag, text in (
        ("--server-cpus", a.server_cpus),
        ("--generator-cpus", a.generator_cpus),
        ("--gateway-cpus", a.gateway_cpus),
    ):
        try:
            cpus[flag] = None if text is None else parse_cpus(text)
        except ValueError as exc:
            p.error(f"{flag}: {exc}")
    try:
        multipliers = [float(m) for m in a.multipliers.split(",") if m.strip()]
    except ValueError:
        p.error(f"--multipliers: numbers separated by commas, got {a.multipliers!r}")
    if not multipliers or any(m <= 0 for m in multipliers):
        p.error("--multipliers: give positive numbers")
    admission = [c.strip() for c in a.admission.split(",") if c.strip()]
    if not admission or any(c not in CONFIGS for c in admission):
        p.error(f"--admission: choose from {','.join(CONFIGS)}")
    if a.knee is None and CONFIGS[admission[0]][ADMISSION_ENV] == "false":
        p.error("the knee is found with admission on: list 'on' or a gateway first, or give --knee")
    if a.generators < 1:
        p.error("--generators must be at least 1")
    if not a.zipf_s > 0:
        p.error("--zipf-s must be positive")

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if a.quick else full)

    return Settings(
        config=a.config,
        quick=a.quick,
        duration_s=pick(a.duration, 20.0, 5.0),
        warmup_s=pick(a.warmup, 2.0, 1.0),
        generators=a.generators,
        knee=a.knee,
        multipliers=multipliers,
        admission=admission,
        deadline_s=a.deadline_ms / 1000.0,
        start_rate=a.start_rate,
        step_factor=pick(a.step_factor, 1.25, 1.5),
        max_rate=a.max_rate,
        step_s=pick(a.step_s, 4.0, 2.0),
        step_warmup_s=pick(a.step_warmup_s, 1.0, 0.5),
        seed=a.seed,
        results_dir=a.results_dir,
        ready_timeout_s=a.ready_timeout_s,
        entities=a.entities,
        zipf_s=a.zipf_s,
        server_cpus=cpus["--server-cpus"],
        generator_cpus=cpus["--generator-cpus"],
        gateway_cpus=cpus["--gateway-cpus"] or cpus["--server-cpus"],
        gateway_nice=a.gateway_nice,
        generator_nice=a.generator_nice,
        connections=a.connections,
        signal_step_down=a.signal_step_down,
        gateway_settings=gateway_settings,
        front_door=a.front_door,
        workers=a.workers,
    )


# --- load ---------------------------------------------------------------------------------


def predict_target(url: str, s: Settings) -> TargetSpec:
    """``Predict`` on the route with the demo key, one entity per request drawn over the demo store's drivers;
    or, with ``--front-door kserve``, ModelInfer of the route's primary model through the router."""
    if s.front_door == "kserve":
        return TargetSpec("kserve", url, "router", model=PRIMARY_MODEL, connections=s.connections)
    return TargetSpec(
        "predict", url, "router", route=ROUTE, join_key=JOIN_KEY, entities=s.entities, zipf_s=s.zipf_s,
        connections=s.connections,
    )  # fmt: skip


# --- router and Triton --------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` in MB (VmRSS), None when it is gone."""
    if pid is None:
        return None
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def cpu_s(pid: int | None, tree: bool = False) -> float | None:
    """CPU seconds (user + system, all threads) used by ``pid`` so far, with its live descendants if ``tree``."""
    if pid is None:
        return None
    try:
        total = process_cpu_s(pid)
    except (OSError, IndexError):
        return None
    if tree:
        total += sum(cpu_s(child, tree=True) or 0.0 for child in children(pid))
    return total


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat; idle and iowait are not busy)."""
    values = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def triton_child(router_pid: int) -> tuple[int, int] | None:
    """(pid, gRPC port) of the tritonserver the router started, None if it has none."""
    for pid in sorted(children(router_pid)):
        argv = _cmdline(pid)
        if argv and argv[0].endswith("/tritonserver"):
            for arg in argv:
                if arg.startswith("--grpc-port="):
                    return pid, int(arg.split("=", 1)[1])
    return None


def scrape(port: int) -> dict[str, Any]:
    """The router's admission limit, in-flight count, queue wait and shed counters by class."""
    try:
        samples = scrape_samples(f"http://127.0.0.1:{port}/metrics")
    except OSError as exc:
        return {"error": repr(exc)}
    out: dict[str, Any] = {"shed": {}, "degraded": {}}
    for (name, label_items), value in samples.items():
        labels = dict(label_items)
        if name == "inferline_admission_limit" and labels.get("route") == ROUTE:
            out["admission_limit"] = value
        elif name == "inferline_in_flight" and labels.get("route") == ROUTE:
            out["in_flight"] = value
        elif name == "inferline_queue_wait_seconds":
            out["queue_wait_ms"] = round(value * 1000.0, 3)
        elif name == "inferline_shed_total" and labels.get("route") == ROUTE:
            key = f"{labels.get('traffic_class')}/{labels.get('reason')}"
            out["shed"][key] = out["shed"].get(key, 0.0) + value
        elif (
            name == "inferline_requests_total"
            and labels.get("route") == ROUTE
            and labels.get("code") == "OK"
            and labels.get("served_by") != "PRIMARY"
        ):
            key = f"{labels.get('traffic_class')}/{labels.get('served_by')}/{labels.get('reason')}"
            out["degraded"][key] = out["degraded"].get(key, 0.0) + value
    return out


def counter_delta(before: dict[str, Any], after: dict[str, Any], counters: str) -> dict[str, float] | None:
    """How much each of the router's ``counters`` ("shed" or "degraded") grew over a run; the nonzero ones."""
    if "error" in before or "error" in after:
        return None
    keys = sorted(set(before[counters]) | set(after[counters]))
    grown = {k: after[counters].get(k, 0.0) - before[counters].get(k, 0.0) for k in keys}
    return {k: v for k, v in grown.items() if v}


@dataclass
class Router:
    """One ``inferline up`` (router + embedded services + its bundled Triton)."""

    name: str
    server: ServerProcess
    metrics_port: int
    triton_pid: int | None = None
    triton_url: str | None = None
    target_url: str | None = None
    """Where the load goes: the router itself, or the Envoy gateway in front of it."""
    gateway_pid: int | None = None
    """The Envoy this benchmark started in front of the router (the embedded one is the router's child)."""

    def cpu_seconds(self) -> tuple[float | None, float | None]:
        """CPU seconds so far of the router processes (with ``--workers``' others) and of the gateway (Envoy)."""
        pid = self.server.pid
        router = cpu_s(pid)
        gateway = cpu_s(self.gateway_pid)
        if pid is None or router is None:
            return router, gateway
        for child in children(pid):
            argv = _cmdline(child)
            if argv and pathlib.Path(argv[0]).name == "envoy":
                gateway = (gateway or 0.0) + (cpu_s(child) or 0.0)
            elif "serve" in argv and "router" in argv:
                router += cpu_s(child) or 0.0
        return router, gateway

    @property
    def target(self) -> str:
        return self.target_url or self.server.url

    async def start(self, ready_timeout_s: float) -> None:
        self.server.start()
        await wait_until(lambda: health_serving(self.server.url), self.name, self.server, ready_timeout_s)
        assert self.server.pid is not None
        for _ in range(100):
            found = triton_child(self.server.pid)
            if found is not None:
                self.triton_pid, port = found
                self.triton_url = f"127.0.0.1:{port}"
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name}: no bundled tritonserver found among the router's children")

    async def triton_state(self) -> dict[str, Any]:
        """Whether the bundled Triton is the one started with the router, and live."""
        assert self.server.pid is not None
        found = triton_child(self.server.pid)
        pid = found[0] if found else None
        live = bool(self.triton_url) and await triton_live(self.triton_url or "")
        return {"pid": pid, "same_pid": pid is not None and pid == self.triton_pid, "live": live}


# --- analysis -----------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _pcts(values_s: list[float]) -> dict[str, float | None]:
    values = sorted(values_s)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": _ms(percentile(values, 50)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(values[-1]),
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def analyse(
    merged: LoadResult, gens: list[GenResult], *, deadline_s: float, tensor_answers: bool = False
) -> dict[str, Any]:
    """Totals, per-class outcomes and generator health of one run (measured window only)."""
    n = {c: 0 for c in CLASSES}
    ok_in_time = dict(n)
    full_in_time = 0  # PRIMARY or LIGHT, in time: the goodput of capacity
    degraded_in_time = 0  # CACHE or BASELINE, in time: the degradation path working
    shed = dict(n)
    by: dict[str, Counter[str]] = {c: Counter() for c in CLASSES}
    errors: dict[str, Counter[str]] = {c: Counter() for c in CLASSES}
    ok_resp: dict[str, list[float]] = {c: [] for c in CLASSES}
    shed_call: dict[str, list[float]] = {c: [] for c in CLASSES}
    gateway_shed_call: list[float] = []
    router_shed_call: list[float] = []
    shed_resp: dict[str, list[float]] = {c: [] for c in CLASSES}
    details: Counter[str] = Counter()
    for g in gens:
        details.update(g.error_details)
    records = ((g, *row) for g in gens for row in iter_requests([g], CLASSES))  # g: whose sheds were Envoy's
    for g, cls, r, served in records:
        n[cls] += 1
        response = r.start_lag_s + r.latency_s
        if r.outcome == OK:
            # A KServe answer is the model's own tensor: there is no degraded one.
            who = "PRIMARY" if tensor_answers else SERVED_BY.get(served, str(served))
            by[cls][who] += 1
            ok_resp[cls].append(response)
            if response <= deadline_s:
                ok_in_time[cls] += 1
                if who in FULL_MODEL:
                    full_in_time += 1
                else:
                    degraded_in_time += 1
        elif r.outcome == SHED:
            shed[cls] += 1
            shed_call[cls].append(r.latency_s)
            (gateway_shed_call if r.index in g.gateway_shed else router_shed_call).append(r.latency_s)
            shed_resp[cls].append(response)
        else:
            errors[cls][r.outcome] += 1
    classes: dict[str, Any] = {}
    for c in CLASSES:
        full = by[c]["PRIMARY"] + by[c]["LIGHT"]
        classes[c] = {
            "requests": n[c],
            "ok_in_time": _share(ok_in_time[c], n[c]),
            "primary_or_light": _share(full, n[c]),
            "served_by": dict(sorted(by[c].items())),
            "shed": _share(shed[c], n[c]),
            "shed_call_ms": _pcts(shed_call[c]),
            "shed_response_ms": _pcts(shed_resp[c]),
            "other_errors": dict(sorted(errors[c].items())),
            "ok_response_ms": _pcts(ok_resp[c]),
        }
    all_shed_call = [t for c in CLASSES for t in shed_call[c]]
    out = merged.to_dict()
    out.update(
        {
            "send_rate": round(send_rate(gens), 1),
            # Goodput apart by who answered: a cached or baseline answer is the degradation
            # path working, not capacity (``goodput`` counts both).
            "goodput_primary_or_light": round(full_in_time / merged.duration_s, 3),
            "goodput_cache_or_baseline": round(degraded_in_time / merged.duration_s, 3),
            "shed": _share(len(all_shed_call), merged.sent),
            "shed_call_ms": _pcts(all_shed_call),
            # Who shed: Envoy (before any Python) or the router itself (after its transport queue).
            "shed_by_gateway": len(gateway_shed_call),
            "gateway_shed_call_ms": _pcts(gateway_shed_call),
            "router_shed_call_ms": _pcts(router_shed_call),
            "classes": classes,
            "error_details": dict(details.most_common(10)),
            "generators": generator_summary(gens),
        }
    )
    return out


def check_targets(run: dict[str, Any], knee: float) -> dict[str, bool | None]:
    crit = run["classes"]["critical"]
    shed_p99 = run["shed_call_ms"]["p99_ms"]
    rss = run["router"]
    start, end = rss["rss_mb_start"], rss["rss_mb_end"]
    growth = None if start is None or end is None else end - start
    return {
        "goodput_ge_90pct_knee": run["goodput_primary_or_light"] >= GOODPUT_OF_KNEE_MIN * knee,
        "critical_in_time_ge_99pct": crit["ok_in_time"] is not None and crit["ok_in_time"] >= CRITICAL_IN_TIME_MIN,
        "critical_primary_or_light_ge_95pct": crit["primary_or_light"] is not None
        and crit["primary_or_light"] >= CRITICAL_FULL_MODEL_MIN,
        "shed_p99_lt_5ms": None if shed_p99 is None else shed_p99 < SHED_P99_MAX_MS,
        "rss_flat": None if growth is None else growth < RSS_GROWTH_MAX_MB,
        "triton_up": bool(run["triton"]["same_pid"] and run["triton"]["live"]),
    }


# --- phases -------------------------------------------------------------------------------


async def measured_run(
    router: Router,
    gens: Generators,
    rate: float,
    *,
    warmup_s: float,
    duration_s: float,
    deadline_s: float,
    seed: int,
    s: Settings,
) -> tuple[dict[str, Any], LoadResult]:
    """One open-loop run with RSS sampled every 0.25 s and metrics scraped around it."""
    pid, triton_pid = router.server.pid, router.triton_pid
    samples: list[tuple[float, float | None]] = []
    cpu: list[tuple[float, float | None, float | None, float | None, int, int]] = []
    """(t, router CPU s, gateway CPU s, Triton CPU s (with its backend stubs), machine busy and total jiffies)."""

    def sample() -> None:
        now = round(time.perf_counter() - t0, 2)
        samples.append((now, rss_mb(pid)))
        cpu.append((now, *router.cpu_seconds(), cpu_s(triton_pid, tree=True), *machine_jiffies()))

    async def sample_rss() -> None:
        while True:
            sample()
            await asyncio.sleep(0.25)

    metrics_before = await asyncio.to_thread(scrape, router.metrics_port)
    t0 = time.perf_counter()
    opens_at = time.time() + START_DELAY_S + warmup_s  # the measured window, as the access log's clock reads it
    sampler = asyncio.create_task(sample_rss())
    metrics_url = f"127.0.0.1:{router.metrics_port}"
    # The generators start START_DELAY_S after dispatch, then warm up: scrape as the measured window opens.
    features_before = asyncio.create_task(scrape_feature_counters_after(metrics_url, START_DELAY_S + warmup_s))
    try:
        results = await gens.run(
            predict_target(router.target, s),
            MIX,
            rate,
            warmup_s=warmup_s,
            duration_s=duration_s,
            deadline_s=deadline_s,
            seed=seed,
        )
    except BaseException:
        features_before.cancel()
        raise
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    sample()
    closes_at = time.time()
    metrics_after = await asyncio.to_thread(scrape, router.metrics_port)
    features_after = await asyncio.to_thread(scrape_feature_counters, metrics_url)
    features = feature_window(await features_before, features_after)
    merged = merge_load_results([g.result for g in results], max_start_lag_s=MAX_START_LAG_S)
    run = analyse(merged, results, deadline_s=deadline_s, tensor_answers=s.front_door == "kserve")
    window_start = START_DELAY_S + warmup_s  # the generators start this long after dispatch
    in_window = [v for t, v in samples if t >= window_start and v is not None]
    run["cpu"] = cpu_use([c for c in cpu if c[0] >= window_start - 0.3])
    run["router"] = {
        "alive": router.server.alive(),
        "rss_mb_start": in_window[0] if in_window else None,
        "rss_mb_end": in_window[-1] if in_window else None,
        "rss_mb_max": max(in_window) if in_window else None,
        "rss_samples": samples,
        "admission_limit_end": metrics_after.get("admission_limit"),
        "in_flight_end": metrics_after.get("in_flight"),
        "queue_wait_ms_end": metrics_after.get("queue_wait_ms"),
        "shed_counted_by_router": counter_delta(metrics_before, metrics_after, "shed"),
        # Answers not by the primary, as class/served_by/reason: why the path degraded.
        "degraded_by_router": counter_delta(metrics_before, metrics_after, "degraded"),
    }
    run["features"] = features
    run["triton"] = await router.triton_state()
    run["window_epoch_s"] = [round(opens_at, 3), round(closes_at, 3)]
    return run, merged


def cpu_use(cpu: list[tuple[float, float | None, float | None, float | None, int, int]]) -> dict[str, float | None]:
    """Cores used by the routers, the gateway and Triton, and the machine's busy share, between the first
    and last sample."""
    if len(cpu) < 2 or cpu[-1][0] <= cpu[0][0]:
        return {"router_cores": None, "gateway_cores": None, "triton_cores": None, "machine_busy": None}
    (t_a, r_a, g_a, tr_a, busy_a, total_a), (t_b, r_b, g_b, tr_b, busy_b, total_b) = cpu[0], cpu[-1]
    span = t_b - t_a

    def cores(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) / span, 3)

    return {
        "router_cores": cores(r_a, r_b),
        "gateway_cores": cores(g_a, g_b),
        "triton_cores": cores(tr_a, tr_b),
        "machine_busy": round((busy_b - busy_a) / (total_b - total_a), 3) if total_b > total_a else None,
    }


async def find_knee(router: Router, gens: Generators, s: Settings) -> dict[str, Any]:
    """Climb the rate ladder with admission on until the first step that fails the knee criteria."""
    steps: list[dict[str, Any]] = []
    knee: float | None = None
    stopped = "reached max rate"
    for k, rate in enumerate(rate_ladder(s.start_rate, max_rate=s.max_rate, factor=s.step_factor)):
        run, merged = await measured_run(
            router,
            gens,
            rate,
            warmup_s=s.step_warmup_s,
            duration_s=s.step_s,
            deadline_s=s.deadline_s,
            seed=s.seed * 1000 + 500 + k,
            s=s,
        )
        reason = step_verdict(merged, p99_limit_s=s.deadline_s, goodput_min_fraction=KNEE_GOODPUT_MIN)
        by = [run["classes"][c]["served_by"] for c in CLASSES]
        full = sum(b.get("PRIMARY", 0) + b.get("LIGHT", 0) for b in by)
        if reason is None and full < KNEE_FULL_MODEL_MIN * merged.sent:
            reason = f"only {full / max(1, merged.sent):.1%} answered by PRIMARY or LIGHT"
        if not run["triton"]["same_pid"] or not run["triton"]["live"]:
            reason = f"Triton died or restarted ({run['triton']}); {reason or ''}"
        if not run["router"]["alive"]:
            reason = f"router exited; {reason or ''}"
        run["passed"], run["reason"] = reason is None, reason
        steps.append(run)
        print_step(run)
        if reason is not None:
            stopped = f"first failing step at {rate:g}/s: {reason}"
            break
        knee = rate
        await asyncio.sleep(1.0)
    return {
        "knee_rate": knee,
        "knee_goodput": next((st["goodput"] for st in steps if st["rate"] == knee), None),
        "knee_is_lower_bound": knee is not None and steps[-1]["passed"],
        "stopped_reason": stopped,
        "generator_fell_behind_at": [st["rate"] for st in steps if st["fell_behind"]],
        "criteria": f"p99 of OK < {s.deadline_s * 1000:g} ms and goodput >= {KNEE_GOODPUT_MIN:.0%} of offered",
        "steps": [_strip(st) for st in steps],
    }


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    """A run without its RSS samples (kept for the fixed runs only)."""
    out = dict(run)
    out["router"] = {k: v for k, v in run["router"].items() if k != "rss_samples"}
    return out


def print_step(run: dict[str, Any]) -> None:
    c = run["classes"]
    verdict = "[green]ok[/]" if run["passed"] else f"[red]FAIL[/] {run['reason']}"
    behind = " [yellow](generators behind)[/]" if run["fell_behind"] else ""
    console.print(
        f"  {run['rate']:>7.0f}/s sent {run['send_rate']:>7.0f} good {run['goodput']:>7.0f} "
        f"p99 {fmt(run['response_time']['p99_ms']):>6} ms shed {fmt(100 * (run['shed'] or 0), '.1f'):>5}% "
        f"crit P|L {fmt(100 * (c['critical']['primary_or_light'] or 0), '.1f'):>5}% "
        f"lag99 {fmt(run['start_lag_p99_ms']):>6} ms cores router {fmt(run['cpu']['router_cores'])} "
        f"gateway {fmt(run['cpu'].get('gateway_cores'))} "
        f"Triton {fmt(run['cpu']['triton_cores'])} gens {run['generator_cpu']:.2f} "
        f"busy {_pct(run['cpu']['machine_busy'])}% {feature_text(run['features'])} {verdict}{behind}",
        highlight=False,
    )


def print_run(label: str, run: dict[str, Any], knee: float) -> None:
    c = run["classes"]
    t = run["targets"]
    bad = [k for k, v in t.items() if v is False]
    console.print(
        f"  {label:<16} {run['rate']:>7.0f}/s sent {run['send_rate']:>7.0f} good {run['goodput']:>7.0f} "
        f"({run['goodput'] / knee:.0%} of knee) crit in-time {fmt(100 * (c['critical']['ok_in_time'] or 0), '.1f')}% "
        f"shed p99 {fmt(run['shed_call_ms']['p99_ms'])} ms (gateway {fmt(run['gateway_shed_call_ms']['p99_ms'])}, "
        f"router {fmt(run['router_shed_call_ms']['p99_ms'])}) lag99 {fmt(run['start_lag_p99_ms'])} ms "
        f"{feature_text(run['features'])} "
        + ("[green]targets met[/]" if not bad else f"[red]missed: {', '.join(bad)}[/]"),
        highlight=False,
    )


async def run_configuration(
    name: str, s: Settings, gens: Generators, log_dir: pathlib.Path, knee: float | None, report: dict[str, Any]
) -> float | None:
    """Start a fresh router for configuration ``name``; sweep (if no knee yet) and run the multipliers."""
    port, metrics_port = free_ports(2)
    # Envoy's own log of its answers: its time for each shed, without the generators' queues.
    access_log = log_dir / f"gateway-access-{name}.log"
    env = {**CONFIGS[name], ACCESS_LOG_ENV: str(access_log)} if name in EMBEDDED else CONFIGS[name]
    server = ServerProcess(
        f"router-admission-{name}",
        f"127.0.0.1:{port}",
        inferline_up(
            s.config,
            port,
            metrics_port,
            *(("--workers", str(s.workers)) if name in EMBEDDED and s.workers > 1 else ()),
            gateway=name in EMBEDDED,
        ),
        log_dir / f"router-admission-{name}.log",
        env=env,
        cwd=ROOT,
        cpus=s.server_cpus,
    )
    router = Router(server.name, server, metrics_port)
    envoy: ServerProcess | None = None
    config: dict[str, Any] = {"env": CONFIGS[name], "runs": []}
    report["configurations"][name] = config
    try:
        console.rule(f"admission {name}: starting inferline up")
        await router.start(s.ready_timeout_s)
        config["router_pid"], config["triton_pid"] = server.pid, router.triton_pid
        config["rss_mb_ready"] = rss_mb(server.pid)
        console.print(
            f"router {server.url} pid {server.pid} (RSS {config['rss_mb_ready']} MB); "
            f"bundled Triton pid {router.triton_pid} at {router.triton_url}",
            highlight=False,
        )
        if name in GATEWAY_SHED_BY:
            envoy = await start_gateway(name, s, server.url, log_dir, access_log)
            router.target_url = envoy.url
            router.gateway_pid = envoy.pid
            console.print(
                f"Envoy gateway {envoy.url} in front, a plain proxy"
                if name in PLAIN_PROXY
                else f"Envoy gateway {envoy.url} in front, shedding {', '.join(GATEWAY_SHED)} by header "
                f"on {GATEWAY_SHED_BY[name]}"
            )
        # Warm the router (feature cache, channels, model sessions) before anything is measured.
        await gens.run(
            predict_target(router.target, s),
            MIX,
            100.0,
            warmup_s=0.0,
            duration_s=2.0,
            deadline_s=s.deadline_s,
            seed=999,
        )
        if knee is None:
            console.rule(f"knee sweep (admission {name}, mixed traffic)")
            sweep = await find_knee(router, gens, s)
            report["knee_sweep"] = sweep
            report["knee_found_with"] = name
            knee = sweep["knee_rate"]
            console.print(f"  {sweep['stopped_reason']}", highlight=False)
            if knee is None:
                console.print("[red]no step passed: no knee; give --knee to run the overload anyway")
                return None
            console.print(
                f"  knee: [bold]{'≥' if sweep['knee_is_lower_bound'] else ''}{knee:g} req/s[/]", highlight=False
            )
            await asyncio.sleep(3.0)
        console.rule(f"overload runs (admission {name}, knee {knee:g} req/s)")
        for k, m in enumerate(s.multipliers):
            run, _ = await measured_run(
                router,
                gens,
                knee * m,
                warmup_s=s.warmup_s,
                duration_s=s.duration_s,
                deadline_s=s.deadline_s,
                seed=s.seed * 1000 + k,  # same arrivals and mix in both configurations
                s=s,
            )
            run["multiplier"] = m
            run["goodput_of_knee"] = round(run["goodput_primary_or_light"] / knee, 4)
            run["targets"] = check_targets(run, knee)
            config["runs"].append(run)
            print_run(f"admission {name} {m:g}×", run, knee)
            if not server.alive():
                console.print(f"[red]router exited:\n{server.log_tail()}")
                break
            await asyncio.sleep(3.0)  # let queues drain and the limit settle
        config["rss_mb_end"] = rss_mb(server.pid)
    finally:
        if envoy is not None:
            envoy.stop()
        config["router_returncode"] = server.stop(timeout_s=30.0)
        left = triton_left(router)
        config["tritonserver_left_behind"] = left
        lines = read_access_log(access_log)  # whole: Envoy flushes it as it stops
        for run in config["runs"]:
            run["sheds_at_envoy"] = shed_times(lines, *run["window_epoch_s"]) if access_log.exists() else None
        if left:
            console.print(f"[red]tritonserver left behind after the router stopped: {left} (killed)")
    return knee


async def start_gateway(
    name: str, s: Settings, router_url: str, log_dir: pathlib.Path, access_log: pathlib.Path
) -> ServerProcess:
    """Envoy on free ports in front of the router, rendered from the same config plus ``GATEWAY_SHED``."""
    raw = yaml.safe_load(s.config.read_text())
    shed = {} if name in PLAIN_PROXY else GATEWAY_SHED
    raw["gateway"] = {"shed": shed, "shed_by": GATEWAY_SHED_BY[name], "access_log": {"path": str(access_log)}}
    for key, value in s.gateway_settings.items():
        if isinstance(value, dict) and isinstance(raw["gateway"].get(key), dict):
            raw["gateway"][key] = {**raw["gateway"][key], **value}
        else:
            raw["gateway"][key] = value
    if s.signal_step_down is not None:
        raw["gateway"]["signal"] = {"step_down": s.signal_step_down}
    config = parse_config(raw, s.config.resolve().parent, str(s.config))
    port, admin_port = free_ports(2)
    envoy_yaml = log_dir / "envoy.yaml"
    rendered = render_envoy(config, port=port, admin_port=admin_port, routers=[router_url])
    envoy_yaml.write_text(yaml.safe_dump(rendered, sort_keys=False))
    command = [str(ENVOY), "-c", str(envoy_yaml), "--base-id", str(random.randint(1, 1 << 30))]
    command += ["--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
    if s.gateway_nice:
        # Envoy's one worker thread would otherwise queue for the CPU behind the router's and
        # Triton's dozens of threads (each its own CFS entity): sheds then took 40 ms p99. A
        # sidecar in its own container cgroup gets its share promptly; a lower nice value is
        # how one process tree gets that here. It changes when Envoy runs, not how much.
        command = ["nice", "-n", str(s.gateway_nice), *command]
    envoy = ServerProcess("envoy", f"127.0.0.1:{port}", command, log_dir / "envoy.log", cwd=ROOT, cpus=s.gateway_cpus)
    envoy.start()
    await wait_until(lambda: health_serving(envoy.url), "envoy", envoy, s.ready_timeout_s)
    return envoy


def triton_left(router: Router) -> list[int]:
    """Kill the router's tritonserver if it outlived the router (it should not)."""
    pid = router.triton_pid
    if pid is None:
        return []
    argv = _cmdline(pid)
    if not (argv and argv[0].endswith("/tritonserver")):
        return []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    return [pid]


async def run(s: Settings, gens: Generators, log_dir: pathlib.Path) -> dict[str, Any]:
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "overload",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": os.getloadavg()},
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(s).items()},
        "mix": MIX.to_dict(),
        "route": ROUTE,
        "targets": {
            "goodput_of_knee_min": GOODPUT_OF_KNEE_MIN,
            "critical_in_time_min": CRITICAL_IN_TIME_MIN,
            "critical_primary_or_light_min": CRITICAL_FULL_MODEL_MIN,
            "shed_p99_max_ms": SHED_P99_MAX_MS,
            "rss_growth_max_mb": RSS_GROWTH_MAX_MB,
        },
        "configurations": {},
    }
    knee = s.knee
    report["knee_rate"] = knee
    for name in s.admission:
        knee = await run_configuration(name, s, gens, log_dir, knee, report)
        report["knee_rate"] = knee
        if knee is None:
            break
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["duration_s"] = round(time.time() - started, 1)
    return report


# --- report -------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _mark(v: bool | None) -> str:
    return "-" if v is None else ("[green]yes[/]" if v else "[red]NO[/]")


def _envoy_sheds(sheds: dict[str, Any] | None) -> str:
    """Envoy's own time for its sheds (``inferline.bench.gateway_log``); "-" without a gateway or a shed."""
    if not sheds or not sheds["count"]:
        return "-"
    return f"{sheds['p50_ms']}/{sheds['p99_ms']}"


def print_report(report: dict[str, Any]) -> None:
    knee = report.get("knee_rate")
    if knee is None:
        console.print("[red]no knee: nothing to report")
        return
    deadline_ms = float(report["settings"]["deadline_s"]) * 1000
    sweep = report.get("knee_sweep")
    src = (
        "--knee"
        if sweep is None
        else ("≥" if sweep["knee_is_lower_bound"] else "") + f"sweep, {report.get('knee_found_with', 'on')}"
    )
    runs = [(name, r) for name, cfg in report["configurations"].items() for r in cfg["runs"]]

    st = report["settings"]
    entities = f"Zipf s={st.get('zipf_s')}" if st.get("entities", "zipf") == "zipf" else st.get("entities")
    t = Table(
        title=f"overload — knee {knee:g} req/s ({src}), deadline {deadline_ms:g} ms, mix 30/35/35, "
        f"entities {entities} over the demo store's drivers"
    )
    for col, right in (
        ("admission", False), ("×knee", True), ("offered/s", True), ("sent/s", True), ("goodput P|L / C|B /s", True),
        ("% knee", True), ("OK late", True), ("shed %", True), ("shed p50/p99 ms", True),
        ("Envoy's shed p50/p99 ms", True), ("other errors", True),
        ("OK p50/p99 ms", True), ("RSS MB start→end", True), ("Triton", False), ("gen lag p99 ms", True),
        ("cores router/gateway/Triton/gens", True), ("CPU busy %", True), ("hot cache hit %", True),
        ("Feast reads/s", True),
    ):  # fmt: skip
        t.add_column(col, justify="right" if right else "left")
    for name, r in runs:
        other = sum(v for k, v in r["errors"].items() if k != SHED)
        tri = r["triton"]
        lag = fmt(r["start_lag_p99_ms"], ".1f") + (" [yellow]behind[/]" if r["fell_behind"] else "")
        t.add_row(
            name,
            f"{r['multiplier']:g}",
            f"{r['offered_rate']:.0f}",
            f"{r['send_rate']:.0f}",
            f"{r['goodput_primary_or_light']:.0f} / {r['goodput_cache_or_baseline']:.0f}",
            f"{100 * r['goodput_of_knee']:.0f}",
            str(r["missed_deadline"]),
            _pct(r["shed"]),
            f"{fmt(r['shed_call_ms']['p50_ms'], '.1f')}/{fmt(r['shed_call_ms']['p99_ms'], '.1f')}",
            _envoy_sheds(r.get("sheds_at_envoy")),
            str(other),
            f"{fmt(r['response_time']['p50_ms'], '.1f')}/{fmt(r['response_time']['p99_ms'], '.1f')}",
            f"{fmt(r['router']['rss_mb_start'], '.0f')}→{fmt(r['router']['rss_mb_end'], '.0f')}",
            "up" if tri["same_pid"] and tri["live"] else f"[red]{'restarted' if tri['live'] else 'DOWN'}[/]",
            lag,
            f"{fmt(r['cpu']['router_cores'])}/{fmt(r['cpu'].get('gateway_cores'))}/{fmt(r['cpu']['triton_cores'])}"
            f"/{r['generator_cpu']:.2f}",
            _pct(r["cpu"]["machine_busy"]),
            _pct((r.get("features") or {}).get("hot_cache_hit_rate")),
            fmt((r.get("features") or {}).get("store_reads_per_s"), ".0f"),
        )
    console.print(t)

    c = Table(title="per class (shares of the class's requests; latencies of OK answers from the scheduled arrival)")
    for col in (
        "admission", "×knee", "class", "requests", "OK in time %", "PRIMARY|LIGHT %", "served_by P/L/C/B",
        "shed %", "shed p50/p99 ms", "other errors", "OK p50/p99 ms",
    ):  # fmt: skip
        c.add_column(col, justify="left" if col in ("admission", "class", "other errors") else "right")
    for name, r in runs:
        for cls in CLASSES:
            x = r["classes"][cls]
            by = x["served_by"]
            c.add_row(
                name,
                f"{r['multiplier']:g}",
                cls,
                str(x["requests"]),
                _pct(x["ok_in_time"]),
                _pct(x["primary_or_light"]),
                "/".join(str(by.get(k, 0)) for k in ("PRIMARY", "LIGHT", "CACHE", "BASELINE")),
                _pct(x["shed"]),
                f"{fmt(x['shed_call_ms']['p50_ms'], '.1f')}/{fmt(x['shed_call_ms']['p99_ms'], '.1f')}",
                ", ".join(f"{k} {v}" for k, v in x["other_errors"].items()) or "-",
                f"{fmt(x['ok_response_ms']['p50_ms'], '.1f')}/{fmt(x['ok_response_ms']['p99_ms'], '.1f')}",
            )
        c.add_section()
    console.print(c)

    g = Table(title="targets")
    cols = (
        ("goodput ≥ 90% knee", "goodput_ge_90pct_knee"),
        ("critical in time ≥ 99%", "critical_in_time_ge_99pct"),
        ("critical P|L ≥ 95%", "critical_primary_or_light_ge_95pct"),
        ("shed p99 < 5 ms", "shed_p99_lt_5ms"),
        (f"RSS growth < {RSS_GROWTH_MAX_MB:g} MB", "rss_flat"),
        ("Triton up", "triton_up"),
    )
    g.add_column("admission")
    g.add_column("×knee", justify="right")
    for label, _ in cols:
        g.add_column(label, justify="center")
    g.add_column("admission limit", justify="right")
    for name, r in runs:
        g.add_row(
            name,
            f"{r['multiplier']:g}",
            *(_mark(r["targets"][key]) for _, key in cols),
            fmt(r["router"]["admission_limit_end"], ".0f"),
        )
    console.print(g)

    behind = [f"{name} {r['multiplier']:g}×" for name, r in runs if r["fell_behind"]]
    if sweep and sweep["generator_fell_behind_at"]:
        behind.append("sweep at " + ", ".join(f"{x:g}" for x in sweep["generator_fell_behind_at"]) + " req/s")
    if behind:
        console.print(
            f"[yellow]generators fell behind (p99 start lag > {MAX_START_LAG_S * 1000:g} ms) in: {'; '.join(behind)}. "
            "The generators share the machine's cores with the router and Triton; their lag counts against "
            "the router (response times from the scheduled arrival).",
            highlight=False,
        )
    for name, cfg in report["configurations"].items():
        details: Counter[str] = Counter()
        for r in cfg["runs"]:
            details.update(r["error_details"])
        if details:
            console.print(f"  admission {name}, errors seen: {dict(details.most_common(5))}", highlight=False)
        for r in cfg["runs"]:
            degraded = r["router"].get("degraded_by_router")
            if degraded:
                top = dict(Counter(degraded).most_common(6))
                console.print(f"  admission {name} {r['multiplier']:g}×, degraded answers: {top}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    s.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = s.results_dir / f"overload-{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    # One deployment: the routers and Envoy started below inherit the gateway secret, without
    # which a router ignores the gateway's headers (router.gateway_trust).
    os.environ.setdefault("INFERLINE_GATEWAY_SECRET", secrets.token_urlsafe(24))
    if s.generator_cpus:
        os.sched_setaffinity(0, s.generator_cpus)
    gens = Generators(s.generators, name="overload-gen", cpus=s.generator_cpus, nice=s.generator_nice)
    try:
        gens.start()
        report = uvloop.run(run(s, gens, log_dir))
    finally:
        gens.close()
    report["logs"] = str(log_dir)
    out = s.results_dir / f"overload-{stamp}.json"
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print_report(report)
    console.print(f"results: {out}")
    return 0 if report.get("knee_rate") is not None else 1


if __name__ == "__main__":
    sys.exit(main())
