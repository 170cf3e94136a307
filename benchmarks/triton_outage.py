"""Triton outage under load: kill the bundled Triton for ~5 s at half the router's knee.

Starts ``inferline up`` (embedded: it starts the bundled Triton and its supervisor
restarts Triton when it dies), drives the router's ``Predict`` (route ``driver_ranking``,
class ``critical``, deadline 100 ms, one entity drawn Zipf-distributed over the demo store's
100,000 drivers, ``--entities``/``--zipf-s``) with open-loop Poisson arrivals, and
``--kill-at-s`` into the measured window kills Triton. The report gives the hot-cache hit
rate and Feast reads per second over the whole load (warm-up included).

How the outage is made (a *dead* Triton, never a paused one): the tritonserver process
(a child of the router, found through /proc by its ``--grpc-port``) is SIGKILLed together
with its process group (its python-backend stubs), as a crashed container would be. The
supervisor notices within 0.2 s and starts a replacement at once, then, after each one
that dies while starting, waits its restart backoff (0.5, 1, 2, 4 s, ...). Each
replacement is either SIGKILLed while still starting (before it serves anything) or left
to come up: it is left up when it would be ready (spawn time + Triton's startup time) at
or after first kill + ``--outage-s``, or closer to that point than the next replacement
would be. The startup time is the one measured when the router started Triton (or
``--triton-startup-s``); under load a restart takes longer than at idle, so the outage
tends to come out longer than ``--outage-s``. The outage reported is measured: first
kill → Triton ready again (the benchmark's probe).

Triton readiness is probed by the benchmark itself every 50 ms (``ServerReady`` and
``ModelReady(driver_ranker)`` on its own channel with a 20-50 ms reconnect backoff, so
the moment it comes back is seen within ~50 ms). The router's metrics are scraped before
the load, just before the kill and after the load. Per request it records the scheduled send
time, response time (from the scheduled send time, so generator lag counts against the
router), status, served_by and degradation reason. It reports the client error rate, the
share answered OK before the deadline, latency percentiles overall and per phase (before
the kill, during the outage, after Triton is ready), served_by per phase, the time from
Triton ready to the first PRIMARY answer and to the first 0.5 s window with >= 95 %
PRIMARY answers, the router's ``inferline_recovery_seconds``, and whether the generator
fell behind. Results: ``benchmarks/results/triton_outage-<timestamp>.json`` (per-request
records included), router and Triton logs beside it. The router is stopped with SIGTERM
(it stops its Triton); any tritonserver of this run still alive afterwards is reported
and killed.

    .venv/bin/python benchmarks/triton_outage.py                 # defaults, ~40 s
    .venv/bin/python benchmarks/triton_outage.py --rate 400 --outage-s 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.bench.harness import (
    PredictRecorder,
    ServerProcess,
    feature_text,
    feature_window,
    fmt,
    health_serving,
    inferline_up,
    json_safe,
    recording_predict_target,
    scrape_feature_counters,
    versions,
    wait_until,
)
from inferline.bench.loadgen import OK, LoadResult, percentile, poisson_schedule, run_open_loop
from inferline.bench.targets import DEFAULT_ZIPF_S, ENTITY_DISTRIBUTIONS, entity_sampler
from inferline.core.ports import free_ports
from inferline.triton.supervisor import RESTART_BACKOFF_INITIAL_S, RESTART_BACKOFF_MAX_S
from inferline.v1 import inference_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "driver_ranker"
ROUTER_KNEE_REQ_S = 500.0
"""Router knee measured by benchmarks/online_overhead.py on this machine (488 req/s, 2026-11-29)."""
PROBE_INTERVAL_S = 0.05
_DEATH_NOTICED_S = 0.2
"""How long the launcher takes to notice a replacement died while starting (its 0.2 s poll)."""
PRIMARY_SHARE = 0.95
PRIMARY_WINDOW_S = 0.5
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class Settings:
    config: pathlib.Path
    rate: float
    duration_s: float
    warmup_s: float
    kill_at_s: float
    outage_s: float
    triton_startup_s: float | None
    deadline_s: float
    traffic_class: str
    seed: int
    results_dir: pathlib.Path
    ready_timeout_s: float
    entities: str = "zipf"
    """How each request's entity id is drawn from the demo store's drivers: ``zipf`` or ``uniform``."""
    zipf_s: float = DEFAULT_ZIPF_S


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "deploy/local/inferline.yaml")
    p.add_argument(
        "--rate",
        type=float,
        default=ROUTER_KNEE_REQ_S / 2,
        help=f"Poisson arrivals per second (default {ROUTER_KNEE_REQ_S / 2:g}: half the router's knee here)",
    )
    p.add_argument("--duration-s", type=float, default=20.0, help="measured window (default 20)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="load before the measured window, not counted")
    p.add_argument("--kill-at-s", type=float, default=5.0, help="first kill, seconds into the measured window")
    p.add_argument("--outage-s", type=float, default=5.0, help="keep Triton down about this long (default 5)")
    p.add_argument(
        "--triton-startup-s",
        type=float,
        default=None,
        help="Triton startup time used to time the kills (default: measured when the router starts it)",
    )
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--traffic-class", default="critical")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--entities", choices=ENTITY_DISTRIBUTIONS, default="zipf", help="entity ids over the demo store (default zipf)"
    )
    p.add_argument("--zipf-s", type=float, default=DEFAULT_ZIPF_S, help="Zipf exponent (default 1.1)")
    p.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks/results")
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    a = p.parse_args(argv)
    if a.rate <= 0 or a.duration_s <= 0 or a.warmup_s < 0 or a.outage_s <= 0:
        p.error("--rate, --duration-s and --outage-s must be positive, --warmup-s non-negative")
    if not 0 <= a.kill_at_s < a.duration_s:
        p.error("--kill-at-s must fall inside the measured window")
    if not a.zipf_s > 0:
        p.error("--zipf-s must be positive")
    return Settings(
        config=a.config.resolve(),
        rate=a.rate,
        duration_s=a.duration_s,
        warmup_s=a.warmup_s,
        kill_at_s=a.kill_at_s,
        outage_s=a.outage_s,
        triton_startup_s=a.triton_startup_s,
        deadline_s=a.deadline_ms / 1000.0,
        traffic_class=a.traffic_class,
        seed=a.seed,
        results_dir=a.results_dir,
        ready_timeout_s=a.ready_timeout_s,
        entities=a.entities,
        zipf_s=a.zipf_s,
    )


# --- processes --------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_our_triton(pid: int, grpc_port: int) -> bool:
    """A live (not zombie) tritonserver listening on ``grpc_port``."""
    argv = _cmdline(pid)
    return bool(argv) and argv[0].endswith("/tritonserver") and f"--grpc-port={grpc_port}" in argv


def triton_children(parent_pid: int, grpc_port: int) -> list[int]:
    """Tritonservers of this run started by ``parent_pid`` (from any of its threads)."""
    pids: set[int] = set()
    for path in pathlib.Path(f"/proc/{parent_pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(x) for x in path.read_text().split())
    return sorted(pid for pid in pids if is_our_triton(pid, grpc_port))


def all_tritons_on(grpc_port: int) -> list[int]:
    """Every live tritonserver on the machine listening on ``grpc_port``."""
    out: list[int] = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and is_our_triton(int(entry.name), grpc_port):
            out.append(int(entry.name))
    return sorted(out)


def kill_triton(pid: int) -> None:
    """SIGKILL a tritonserver and, when it leads its process group (it does), its backend stubs."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- Triton readiness -------------------------------------------------------------------


class TritonWatch:
    """Polls ``ServerReady`` and ``ModelReady(model)`` every ``interval_s``; records changes.

    Its channel reconnects after 20-50 ms (gRPC's default backoff starts at 1 s and grows),
    so a server that comes back is seen within about one interval.
    """

    def __init__(self, url: str, model: str, interval_s: float = PROBE_INTERVAL_S) -> None:
        self.url = url
        self.model = model
        self.interval_s = interval_s
        self.ready: bool | None = None
        self.changes: list[tuple[float, bool]] = []
        """(perf_counter, ready) at each change of readiness, the first probe included."""

    async def _probe(self, stub: Any) -> bool:
        try:
            server = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=0.25)
            if not server.ready:
                return False
            model = await stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=0.25)
            return bool(model.ready)
        except grpc.aio.AioRpcError:
            return False

    async def run(self) -> None:
        options = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 50),
        ]
        async with grpc.aio.insecure_channel(self.url, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                ready = await self._probe(stub)
                if ready != self.ready:
                    self.ready = ready
                    self.changes.append((time.perf_counter(), ready))
                await asyncio.sleep(self.interval_s)

    def first_change(self, to: bool, after: float) -> float | None:
        return next((t for t, ready in self.changes if ready is to and t >= after), None)


async def first_child_seen(router_pid: int, grpc_port: int) -> tuple[float, int]:
    """When the router's first tritonserver appeared, and its pid."""
    while True:
        pids = triton_children(router_pid, grpc_port)
        if pids:
            return time.perf_counter(), pids[0]
        await asyncio.sleep(0.02)


# --- the outage -------------------------------------------------------------------------


@dataclass
class Outage:
    """What the outage controller did; times are ``perf_counter`` readings."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    """``{"t", "pid", "what"}``: the serving Triton, then replacements killed while starting."""
    let_up: dict[str, Any] | None = None
    """The replacement left to come up: ``{"t" (first seen), "pid"}``."""
    seen: set[int] = field(default_factory=set)
    """Every tritonserver pid of this run seen by the controller."""
    error: str | None = None
    metrics_at_kill: dict[str, Any] = field(default_factory=dict)
    """The router's metrics scraped just before the first kill."""

    @property
    def first_kill(self) -> float | None:
        return self.kills[0]["t"] if self.kills else None


async def make_outage(
    router_pid: int, grpc_port: int, metrics_port: int, kill_at: float, outage_s: float, startup_s: float, out: Outage
) -> None:
    """At ``kill_at``, kill Triton; then kill or let up each replacement so Triton is back closest to ``outage_s``.

    A replacement spawned at ``ts`` would be ready at about ``ts + startup_s``. If it is killed,
    the supervisor's next one comes after its launcher notices the death (~0.2 s) and the
    restart backoff (0.5 s doubling, ``RESTART_BACKOFF_*`` of the supervisor), and would be
    ready that much later. The replacement is left up when it would be ready at or after
    ``kill + outage_s``, or closer to it than the next one would be.
    """
    await asyncio.sleep(max(0.0, kill_at - 0.1 - time.perf_counter()))
    out.metrics_at_kill = await asyncio.to_thread(scrape_metrics, metrics_port)
    await asyncio.sleep(max(0.0, kill_at - time.perf_counter()))
    pids = triton_children(router_pid, grpc_port)
    out.seen.update(pids)
    if len(pids) != 1:
        out.error = f"expected one tritonserver child of the router, found {pids}"
        return
    t = time.perf_counter()
    kill_triton(pids[0])
    out.kills.append({"t": t, "pid": pids[0], "what": "serving"})
    hold_until = t + outage_s
    give_up = t + outage_s + 120.0
    while time.perf_counter() < give_up:
        for pid in triton_children(router_pid, grpc_port):
            if pid in out.seen:
                continue
            out.seen.add(pid)
            now = time.perf_counter()
            failed = len(out.kills) - 1  # restarts the supervisor saw fail so far
            backoff = min(RESTART_BACKOFF_INITIAL_S * 2**failed, RESTART_BACKOFF_MAX_S)
            ready_now = now + startup_s
            ready_next = now + _DEATH_NOTICED_S + backoff + startup_s
            if ready_now >= hold_until or hold_until - ready_now <= ready_next - hold_until:
                out.let_up = {"t": now, "pid": pid, "predicted_ready_after_kill_s": round(ready_now - t, 3)}
                return
            kill_triton(pid)
            out.kills.append({"t": now, "pid": pid, "what": "starting"})
        await asyncio.sleep(0.02)
    out.error = "the supervisor started no replacement that could be left up"


# --- metrics ----------------------------------------------------------------------------


def scrape_metrics(port: int) -> dict[str, Any]:
    """The router's Prometheus samples of interest: recovery histogram, requests, breakers."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return {"error": repr(exc)}
    out: dict[str, Any] = {"recovery": {}, "requests": {}, "circuit_open": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if family.name == "inferline_recovery_seconds" and labels.get("model") == MODEL:
                if sample.name.endswith("_sum"):
                    out["recovery"]["sum"] = sample.value
                elif sample.name.endswith("_count"):
                    out["recovery"]["count"] = sample.value
            elif family.name == "inferline_requests" and sample.name.endswith("_total"):
                key = "/".join(labels.get(k, "") for k in ("served_by", "reason", "code"))
                out["requests"][key] = out["requests"].get(key, 0.0) + sample.value
            elif family.name == "inferline_circuit_open":
                out["circuit_open"][labels.get("model", "")] = sample.value
    return out


def metrics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    if "error" in before or "error" in after:
        return {"error": before.get("error") or after.get("error")}
    rec_b, rec_a = before["recovery"], after["recovery"]
    count = rec_a.get("count", 0.0) - rec_b.get("count", 0.0)
    total = rec_a.get("sum", 0.0) - rec_b.get("sum", 0.0)
    requests = {
        k: v - before["requests"].get(k, 0.0)
        for k, v in sorted(after["requests"].items())
        if v - before["requests"].get(k, 0.0)
    }
    return {
        "recovery_seconds_count": count,
        "recovery_seconds_sum": round(total, 4),
        "recovery_seconds_mean": round(total / count, 4) if count else None,
        "requests_total": requests,
        "circuit_open_after": after["circuit_open"],
    }


# --- analysis ---------------------------------------------------------------------------


SERVED_BY = {v.number: v.name.removeprefix("SERVED_BY_") for v in inference_pb2.ServedBy.DESCRIPTOR.values}
REASONS = {
    v.number: v.name.removeprefix("DEGRADATION_REASON_").replace("UNSPECIFIED", "NONE")
    for v in inference_pb2.DegradationReason.DESCRIPTOR.values
}


def served_name(value: int) -> str:
    return SERVED_BY.get(value, str(value))


def reason_name(value: int) -> str:
    return REASONS.get(value, str(value))


@dataclass(frozen=True, slots=True)
class Answer:
    """One request of the measured window, on the ``perf_counter`` time base."""

    due: float
    """Scheduled send time."""
    response_s: float
    """Scheduled send time to answer (start lag + latency)."""
    outcome: str
    served_by: str
    """PRIMARY / LIGHT / CACHE / BASELINE, or ``-`` for a failed call."""
    reason: str
    details: str
    """Status details of a failed call; empty for OK."""

    @property
    def answered_at(self) -> float:
        return self.due + self.response_s


def answers_of(result: LoadResult, rec: PredictRecorder) -> list[Answer]:
    out: list[Answer] = []
    for r in result.records:
        started = rec.started.get(r.index)
        if started is None or math.isnan(r.start_lag_s):
            continue
        ok = r.outcome == OK
        out.append(
            Answer(
                due=started - r.start_lag_s,
                response_s=r.start_lag_s + r.latency_s,
                outcome=r.outcome,
                served_by=served_name(rec.served_by[r.index]) if ok else "-",
                reason=reason_name(rec.reason[r.index]) if ok else "-",
                details="" if ok else rec.error_details.get(r.index, ""),
            )
        )
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2) if not math.isnan(seconds) else math.nan


def phase_stats(answers: list[Answer], deadline_s: float, span_s: float | None = None) -> dict[str, Any]:
    n = len(answers)
    resp = sorted(a.response_s for a in answers)
    ok_in_time = sum(1 for a in answers if a.outcome == OK and a.response_s < deadline_s)
    errors = Counter(a.outcome for a in answers if a.outcome != OK)
    return {
        "requests": n,
        "span_s": round(span_s, 3) if span_s is not None else None,
        "ok_before_deadline": ok_in_time,
        "ok_before_deadline_share": round(ok_in_time / n, 5) if n else math.nan,
        "errors": dict(sorted(errors.items())),
        "error_rate": round(sum(errors.values()) / n, 5) if n else math.nan,
        "ok_late": sum(1 for a in answers if a.outcome == OK and a.response_s >= deadline_s),
        "response_ms": {
            "p50": _ms(percentile(resp, 50)),
            "p99": _ms(percentile(resp, 99)),
            "max": _ms(resp[-1]) if resp else math.nan,
        },
        "served_by": dict(Counter(a.served_by for a in answers if a.outcome == OK).most_common()),
        "reasons": dict(Counter(a.reason for a in answers if a.outcome == OK).most_common()),
    }


def primary_recovery(answers: list[Answer], ready: float, kill: float) -> dict[str, Any]:
    """Back to PRIMARY, from ``ready``: the first PRIMARY answer to a request sent after ``kill``,
    the first 0.5 s window (by answer time, stepped by 50 ms from ``ready``) with >= 95 % PRIMARY
    answers (errors count as not PRIMARY), and the last non-PRIMARY answer."""
    by_answer = sorted((a for a in answers if a.answered_at >= kill), key=lambda a: a.answered_at)
    first = next((a for a in by_answer if a.served_by == "PRIMARY" and a.due >= kill), None)
    window_at: float | None = None
    ends = [a.answered_at for a in by_answer]
    last_end = ends[-1] if ends else ready
    start = ready
    lo = 0
    while start + PRIMARY_WINDOW_S <= last_end:
        while lo < len(by_answer) and by_answer[lo].answered_at < start:
            lo += 1
        hi = lo
        primary = 0
        while hi < len(by_answer) and by_answer[hi].answered_at < start + PRIMARY_WINDOW_S:
            primary += by_answer[hi].served_by == "PRIMARY"
            hi += 1
        count = hi - lo
        if count >= 10 and primary >= PRIMARY_SHARE * count:
            window_at = start
            break
        start += PROBE_INTERVAL_S
    last_degraded = max((a.answered_at for a in by_answer if a.served_by != "PRIMARY"), default=None)
    return {
        "first_primary_after_ready_s": round(first.answered_at - ready, 4) if first else None,
        "first_primary_answered_at": first.answered_at if first else None,
        "primary_window_after_ready_s": round(window_at - ready, 4) if window_at is not None else None,
        "last_non_primary_after_ready_s": round(last_degraded - ready, 4) if last_degraded is not None else None,
    }


def timeline(answers: Iterable[Answer], origin: float, deadline_s: float, bin_s: float = 1.0) -> list[dict[str, Any]]:
    bins: dict[int, list[Answer]] = {}
    for a in answers:
        bins.setdefault(int((a.due - origin) // bin_s), []).append(a)
    rows = []
    for k in sorted(bins):
        group = bins[k]
        resp = sorted(a.response_s for a in group)
        rows.append(
            {
                "t_s": round(k * bin_s, 3),
                "n": len(group),
                **{
                    name: sum(1 for a in group if a.served_by == name)
                    for name in ("PRIMARY", "LIGHT", "CACHE", "BASELINE")
                },
                "errors": sum(1 for a in group if a.outcome != OK),
                "late": sum(1 for a in group if a.outcome == OK and a.response_s >= deadline_s),
                "p99_ms": _ms(percentile(resp, 99)),
                "max_ms": _ms(resp[-1]),
            }
        )
    return rows


# --- the run ----------------------------------------------------------------------------


@dataclass
class Run:
    settings: Settings
    router: ServerProcess
    grpc_port: int
    metrics_port: int
    outage: Outage = field(default_factory=Outage)


async def run(r: Run) -> dict[str, Any]:
    s = r.settings
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "triton_outage",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": os.getloadavg()},
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(s).items()},
        "assumed_router_knee_req_s": ROUTER_KNEE_REQ_S,
        "router": {"url": r.router.url, "triton_grpc_port": r.grpc_port, "metrics_port": r.metrics_port},
    }
    watch = TritonWatch(f"127.0.0.1:{r.grpc_port}", MODEL)
    watch_task = asyncio.create_task(watch.run())
    r.router.start()
    assert r.router.pid is not None
    spawn_task = asyncio.create_task(first_child_seen(r.router.pid, r.grpc_port))
    try:
        await wait_until(lambda: health_serving(r.router.url), "router", r.router, s.ready_timeout_s)
        spawned_at, first_pid = await asyncio.wait_for(spawn_task, 5.0)
        for _ in range(100):  # the router is SERVING only once Triton is ready: the probe follows shortly
            if watch.ready:
                break
            await asyncio.sleep(0.02)
        r.outage.seen.add(first_pid)
        ready_at = watch.first_change(True, spawned_at)
        measured_startup = ready_at - spawned_at if ready_at is not None else None
        startup_s = s.triton_startup_s if s.triton_startup_s is not None else measured_startup or 3.0
        report["triton_initial_startup_s"] = round(measured_startup, 3) if measured_startup else None
        report["startup_s_for_kills"] = round(startup_s, 3)
        console.print(
            f"router SERVING at {r.router.url}; bundled Triton pid {first_pid} on :{r.grpc_port}, "
            f"started in {fmt(measured_startup)} s",
            highlight=False,
        )

        metrics_before = await asyncio.to_thread(scrape_metrics, r.metrics_port)
        features_before = await asyncio.to_thread(scrape_feature_counters, f"127.0.0.1:{r.metrics_port}")
        target, rec = recording_predict_target(
            r.router.url,
            entity_ids_sampler=entity_sampler(s.entities, zipf_s=s.zipf_s, seed=s.seed),
            traffic_class=s.traffic_class,
            deadline_s=s.deadline_s,
        )
        offsets = poisson_schedule(s.rate, s.warmup_s + s.duration_s, s.seed)

        async def outage_when_load_runs() -> None:
            for _ in range(30_000):  # the load's first call, within a few ms (30 s at most)
                if rec.started:
                    break
                await asyncio.sleep(0.001)
            else:
                raise RuntimeError("the load generator made no call")
            first = min(rec.started)
            t0 = rec.started[first] - offsets[first]
            await make_outage(
                r.router.pid or 0,
                r.grpc_port,
                r.metrics_port,
                t0 + s.warmup_s + s.kill_at_s,
                s.outage_s,
                startup_s,
                r.outage,
            )

        console.print(
            f"load: {s.rate:g} req/s Poisson for {s.warmup_s:g} s warm-up + {s.duration_s:g} s; kill Triton at "
            f"{s.kill_at_s:g} s for ~{s.outage_s:g} s (Triton startup estimate {startup_s:.2f} s)",
            highlight=False,
        )
        outage_task = asyncio.create_task(outage_when_load_runs())
        try:
            result = await run_open_loop(
                target.call,
                rate=s.rate,
                duration_s=s.duration_s,
                deadline_s=s.deadline_s,
                warmup_s=s.warmup_s,
                seed=s.seed,
                keep_records=True,
            )
        finally:
            await target.close()
            if not outage_task.done():
                outage_task.cancel()
            await asyncio.wait([outage_task])
        if not outage_task.cancelled() and outage_task.exception() is not None:
            r.outage.error = repr(outage_task.exception())
        await asyncio.sleep(1.0)  # let the router's counters settle
        metrics_after = await asyncio.to_thread(scrape_metrics, r.metrics_port)
        features_after = await asyncio.to_thread(scrape_feature_counters, f"127.0.0.1:{r.metrics_port}")
        report.update(analyse(r, watch, result, rec, metrics_before, metrics_after))
        report["features_whole_run"] = feature_window(features_before, features_after)  # warm-up included
    finally:
        watch_task.cancel()
        spawn_task.cancel()
        await asyncio.wait([watch_task, spawn_task])
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["duration_s"] = round(time.time() - started, 1)
    return report


def analyse(
    r: Run,
    watch: TritonWatch,
    result: LoadResult,
    rec: PredictRecorder,
    metrics_before: dict[str, Any],
    metrics_after: dict[str, Any],
) -> dict[str, Any]:
    s = r.settings
    answers = answers_of(result, rec)
    deadline = s.deadline_s
    # The measured window opens warmup_s after the schedule's zero: started - start lag - offset.
    first = next((x for x in result.records if x.index in rec.started and not math.isnan(x.start_lag_s)), None)
    t0 = rec.started[first.index] - first.start_lag_s - first.scheduled_s if first else 0.0
    origin = t0 + s.warmup_s
    end = origin + s.duration_s
    kill = r.outage.first_kill
    down = watch.first_change(False, kill) if kill is not None else None
    ready = watch.first_change(True, kill) if kill is not None else None
    outage_end = ready if ready is not None else end

    def rel(t: float | None, base: float | None = origin) -> float | None:
        return round(t - base, 4) if t is not None and base is not None else None

    if kill is None:
        phases = {"all": phase_stats(answers, deadline, s.duration_s)}
    else:
        before = [a for a in answers if a.due < kill]
        during = [a for a in answers if kill <= a.due < outage_end]
        after = [a for a in answers if a.due >= outage_end]
        phases = {
            "before": phase_stats(before, deadline, kill - origin),
            "during": phase_stats(during, deadline, outage_end - kill),
            "after": phase_stats(after, deadline, max(end - outage_end, 0.0)),
        }
    overall = phase_stats(answers, deadline, s.duration_s)
    outage: dict[str, Any] = {
        "method": "SIGKILL of the tritonserver process group; replacements that would be back too early "
        "killed while starting",
        "kill_at_s": rel(kill),
        "kills": [
            {"t_after_first_kill_s": rel(k["t"], kill), "pid": k["pid"], "what": k["what"]} for k in r.outage.kills
        ],
        "let_up": None
        if r.outage.let_up is None
        else {
            "t_after_first_kill_s": rel(r.outage.let_up["t"], kill),
            "pid": r.outage.let_up["pid"],
            "predicted_ready_after_kill_s": r.outage.let_up["predicted_ready_after_kill_s"],
        },
        "replacement_startup_s": rel(ready, r.outage.let_up["t"]) if r.outage.let_up else None,
        "probe_saw_down_after_kill_s": rel(down, kill),
        "triton_ready_at_s": rel(ready),
        "outage_s": rel(ready, kill),
        "error": r.outage.error,
    }
    recovery = primary_recovery(answers, ready, kill) if ready is not None and kill is not None else {}
    recovery["router_metrics_whole_run"] = metrics_delta(metrics_before, metrics_after)
    at_kill = r.outage.metrics_at_kill or {"error": "not scraped"}
    recovery["router_metrics"] = metrics_delta(at_kill, metrics_after)
    # The router's own "ready" moment: its first PRIMARY answer minus its recovery time.
    first_primary = recovery.pop("first_primary_answered_at", None)
    router_recovery = recovery["router_metrics"].get("recovery_seconds_mean")
    if first_primary is not None and ready is not None and router_recovery is not None:
        recovery["router_saw_ready_after_probe_s"] = round(first_primary - router_recovery - ready, 4)
    measured_errors = Counter((a.outcome, a.details) for a in answers if a.outcome != OK)
    error_messages = [
        {"status": code, "details": details, "count": count} for (code, details), count in measured_errors.most_common()
    ]
    warmup_errors = rec.errors - measured_errors
    return {
        "load": result.to_dict(),
        "overall": overall,
        "phases": phases,
        "outage": outage,
        "recovery": recovery,
        "client_errors": error_messages,
        "client_errors_in_warmup": [
            {"status": code, "details": details, "count": count}
            for (code, details), count in warmup_errors.most_common()
        ],
        "generator": {
            "fell_behind": result.fell_behind,
            "start_lag_p99_ms": result.start_lag_p99_ms,
            "start_lag_max_ms": result.start_lag_max_ms,
            "cpu": result.generator_cpu,
        },
        "triton_readiness_changes_s": [(rel(t), ready_) for t, ready_ in watch.changes],
        "timeline_1s": timeline(answers, origin, deadline),
        "requests": {
            "columns": ["due_s", "response_ms", "outcome", "served_by", "reason", "details"],
            "rows": [
                [round(a.due - origin, 5), round(a.response_s * 1000.0, 3), a.outcome, a.served_by, a.reason, a.details]
                for a in answers
            ],
        },
    }


def finish_processes(r: Run) -> dict[str, Any]:
    """Stop the router (it stops its Triton), then make sure no tritonserver of this run is left."""
    code = r.router.stop(timeout_s=30.0)
    left = sorted({pid for pid in r.outage.seen if is_our_triton(pid, r.grpc_port)} | set(all_tritons_on(r.grpc_port)))
    for pid in left:
        kill_triton(pid)
    return {"router_returncode": code, "tritonserver_left_behind": left}


def copy_triton_log(router_log: pathlib.Path, dest: pathlib.Path) -> str | None:
    """Copy the bundled Triton's log (a temporary file named in the router's log) next to the results."""
    if not router_log.exists():
        return None
    match = re.search(r"started tritonserver pid \d+, log (\S+?)\"", router_log.read_text(errors="replace"))
    if match is None:
        return None
    with contextlib.suppress(OSError):
        shutil.copyfile(match.group(1), dest)
        return str(dest)
    return None


def router_log_lines(path: pathlib.Path) -> list[str]:
    """The router's log lines about Triton (deaths, restarts, readiness) and errors."""
    out: list[str] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg = str(entry.get("msg", ""))
        if "tritonserver" in msg or entry.get("level") in ("ERROR", "CRITICAL"):
            out.append(f"{entry.get('ts')} {entry.get('level')} {msg[:300]}")
    return out


# --- report -----------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    deadline_ms = s["deadline_s"] * 1000
    load, overall, phases = report.get("load"), report.get("overall"), report.get("phases", {})
    if load is None or overall is None:
        console.print("[red]no load result")
        return
    out, rec = report["outage"], report["recovery"]
    console.print(
        f"offered {load['offered_rate']:.1f} req/s (asked {s['rate']:g} = {s['rate'] / ROUTER_KNEE_REQ_S:.0%} of the "
        f"assumed knee {ROUTER_KNEE_REQ_S:g}), achieved {load['achieved_rate']:.1f} OK/s, {load['sent']} requests; "
        f"{s.get('entities', 'zipf')} entities, {feature_text(report.get('features_whole_run'))} (whole run)",
        highlight=False,
    )
    title = f"Triton outage at {s['rate']:g} req/s — deadline {deadline_ms:g} ms, class {s['traffic_class']}"
    table = Table(title=title)
    table.add_column("phase")
    for col in ("span s", "requests", "errors", "OK < deadline", "late OK", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    table.add_column("served_by")
    table.add_column("reasons")
    for name, ph in [*phases.items(), ("overall", overall)]:
        table.add_row(
            name,
            fmt(ph["span_s"], ".2f"),
            str(ph["requests"]),
            f"{sum(ph['errors'].values())} ({fmt(ph['error_rate'] * 100, '.2f')}%)",
            f"{fmt(ph['ok_before_deadline_share'] * 100, '.2f')}%",
            str(ph["ok_late"]),
            fmt(ph["response_ms"]["p50"]),
            fmt(ph["response_ms"]["p99"]),
            fmt(ph["response_ms"]["max"]),
            " ".join(f"{k}={v}" for k, v in ph["served_by"].items()),
            " ".join(f"{k}={v}" for k, v in ph["reasons"].items()),
        )
    console.print(table)
    console.print("latency: scheduled send time → answer (start lag included), every request, errors too")

    tl = Table(title="per second (by scheduled send time)")
    for col in ("t s", "n", "PRIMARY", "LIGHT", "CACHE", "BASELINE", "errors", "late", "p99 ms", "max ms"):
        tl.add_column(col, justify="right")
    kill_s, ready_s = out["kill_at_s"], out["triton_ready_at_s"]
    for row in report["timeline_1s"]:
        mark = ""
        if kill_s is not None and row["t_s"] <= kill_s < row["t_s"] + 1:
            mark += " kill"
        if ready_s is not None and row["t_s"] <= ready_s < row["t_s"] + 1:
            mark += " ready"
        tl.add_row(
            f"{row['t_s']:g}{mark}",
            *(str(row[k]) for k in ("n", "PRIMARY", "LIGHT", "CACHE", "BASELINE", "errors", "late")),
            fmt(row["p99_ms"]),
            fmt(row["max_ms"]),
        )
    console.print(tl)

    kills = ", ".join(f"{k['what']} pid {k['pid']} at +{k['t_after_first_kill_s']:.2f} s" for k in out["kills"])
    console.print(f"kills: {kills or '-'}", highlight=False)
    if out["let_up"]:
        console.print(
            f"replacement pid {out['let_up']['pid']} left up (seen +{out['let_up']['t_after_first_kill_s']:.2f} s),"
            f" predicted ready at +{fmt(out['let_up']['predicted_ready_after_kill_s'])} s, startup "
            f"{fmt(out['replacement_startup_s'])} s (estimate {fmt(report.get('startup_s_for_kills'))} s)",
            highlight=False,
        )
    console.print(
        f"Triton: killed at {fmt(kill_s)} s, probe saw it down +{fmt(out['probe_saw_down_after_kill_s'], '.3f')} s, "
        f"ready again at {fmt(ready_s)} s → outage [bold]{fmt(out['outage_s'])} s[/]",
        highlight=False,
    )
    if out["error"]:
        console.print(f"[red]outage controller: {out['error']}")
    rm = rec.get("router_metrics", {})
    console.print(
        f"back to PRIMARY: first PRIMARY answer {fmt(rec.get('first_primary_after_ready_s'), '+.3f')} s after ready; "
        f"first {PRIMARY_WINDOW_S:g} s window with >= {PRIMARY_SHARE:.0%} PRIMARY at "
        f"{fmt(rec.get('primary_window_after_ready_s'), '+.3f')} s; last non-PRIMARY answer "
        f"{fmt(rec.get('last_non_primary_after_ready_s'), '+.3f')} s",
        highlight=False,
    )
    console.print(
        f"router inferline_recovery_seconds{{model={MODEL}}} since the kill: count "
        f"{fmt(rm.get('recovery_seconds_count'), '.0f')}, mean {fmt(rm.get('recovery_seconds_mean'), '.3f')} s "
        "(from the router's supervisor seeing Triton ready to its first PRIMARY answer) → the router saw Triton ready "
        f"{fmt(rec.get('router_saw_ready_after_probe_s'), '+.3f')} s after the benchmark's probe",
        highlight=False,
    )
    verdict = "[green]met[/]" if overall["ok_before_deadline_share"] == 1 else "[red]missed[/]"
    console.print(
        f"client error rate {overall['error_rate'] * 100:.3f}%  OK before deadline "
        f"{overall['ok_before_deadline_share'] * 100:.3f}% ({verdict}, target 100%)  p99 "
        f"{fmt(overall['response_ms']['p99'])} ms vs deadline {deadline_ms:g} ms"
    )
    for e in report.get("client_errors", []):
        console.print(f"  [red]{e['count']} × {e['status']}: {e['details']}", highlight=False)
    for e in report.get("client_errors_in_warmup", []):
        console.print(f"  warm-up (not counted): {e['count']} × {e['status']}: {e['details']}", highlight=False)
    gen = report["generator"]
    behind = "[yellow]fell behind[/]" if gen["fell_behind"] else "kept its schedule"
    console.print(
        f"generator {behind} (start lag p99 {fmt(gen['start_lag_p99_ms'])} ms, max {fmt(gen['start_lag_max_ms'])} ms,"
        f" cpu {gen['cpu']:.0%})",
        highlight=False,
    )
    procs = report.get("processes", {})
    left = procs.get("tritonserver_left_behind")
    console.print(
        f"router exit code {procs.get('router_returncode')}; tritonserver left behind: "
        f"{'[red]' + str(left) + ' (killed)[/]' if left else 'none'}"
    )


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    s.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = s.results_dir / f"triton_outage-{stamp}-logs"
    port, metrics_port, grpc_port = free_ports(3)
    router = ServerProcess(
        "router",
        f"127.0.0.1:{port}",
        inferline_up(s.config, port, metrics_port),
        log_dir / "router.log",
        env={"INFERLINE_TRITON__GRPC_PORT": str(grpc_port)},
        cwd=ROOT,
    )
    r = Run(s, router, grpc_port, metrics_port)
    console.print(
        f"rate {s.rate:g} req/s; assumption: the router's knee here is ~{ROUTER_KNEE_REQ_S:g} req/s "
        f"(benchmarks/online_overhead.py), so 50% ≈ {ROUTER_KNEE_REQ_S / 2:g} req/s",
        highlight=False,
    )

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    report: dict[str, Any] = {}
    try:
        report = uvloop.run(run(r))
    finally:
        procs = finish_processes(r)  # always: the router, then any tritonserver of this run
        report["processes"] = procs
        report["router_log"] = router_log_lines(router.log_path)
        report["triton_log"] = copy_triton_log(router.log_path, log_dir / "tritonserver.log")
        if procs["tritonserver_left_behind"]:
            console.print(f"[red]tritonserver left behind, killed: {procs['tritonserver_left_behind']}")
    report["logs"] = str(log_dir)
    out = s.results_dir / f"triton_outage-{stamp}.json"
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print_report(report)
    for line in report["router_log"]:
        console.print(f"  router: {line}", highlight=False, markup=False)
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
