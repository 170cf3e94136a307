"""Shared pieces of the benchmark scripts: server subprocesses, readiness waits, report helpers,
and a ``Predict`` target that records what served each answer.

``ServerProcess`` runs a server in its own session (process group) with its output in a
log file; ``stop`` always reaps it (SIGTERM, then SIGKILL of its group). A process it
started in a session of its own (the bundled Triton of ``inferline up``) is not in that
group: the server is expected to stop it on SIGTERM, and the caller to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.bench.targets import DEMO_API_KEY, Target, prepare_predict
from inferline.stats import scrape as scrape_samples


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as ``taskset -c`` takes it (``"1"``, ``"0,2"``, ``"2-5"``) → the set of CPU numbers.

    Raises:
        ValueError: not such a list, or a CPU this process may not run on.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"CPU list {text!r}: expected numbers and ranges like 0,2-3")
        cpus.update(range(int(low), int(high or low) + 1))
    usable = os.sched_getaffinity(0)
    if not cpus or not cpus <= usable:
        raise ValueError(f"CPU list {text!r}: this machine lets us use CPUs {sorted(usable)}")
    return frozenset(cpus)


def inferline_up(config: pathlib.Path, port: int, metrics_port: int, *extra: str, gateway: bool = False) -> list[str]:
    """The command of an ``inferline up`` on ``port`` with ``config``: the router on the port itself
    (``--no-gateway``, what a benchmark of the router measures), or the embedded gateway there."""
    exe = pathlib.Path(sys.executable).parent / "inferline"
    front = [] if gateway else ["--no-gateway"]
    return [
        str(exe),
        "up",
        *front,
        "--config",
        str(config),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *extra,
    ]


@dataclass
class ServerProcess:
    """A server subprocess in its own session, logging to a file; ``stop`` always reaps it."""

    name: str
    url: str
    command: list[str]
    log_path: pathlib.Path
    proc: subprocess.Popen[bytes] | None = None
    env: Mapping[str, str] | None = None
    """Variables added to (or overriding) this process's environment."""
    cwd: pathlib.Path | None = None
    """Working directory (None: this process's)."""
    cpus: frozenset[int] | None = None
    """CPUs the process and everything it starts may run on (``taskset``; None: no pinning)."""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environ = None if self.env is None else {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            # taskset sets the affinity before exec, so every thread and child (Triton, its
            # backend stubs, Envoy's workers) inherits it; setting it after Popen would race them.
            pin = ["taskset", "-c", ",".join(map(str, sorted(self.cpus)))] if self.cpus else []
            self.proc = subprocess.Popen(
                [*pin, *self.command],
                cwd=self.cwd,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout_s``, then SIGKILL the process group; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode

    def log_tail(self, size: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-size:]
        return data.decode("utf-8", errors="replace")


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, server: ServerProcess | None, timeout_s: float
) -> None:
    """Poll ``check`` every 0.25 s until it is true; raise if ``server`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if server is not None and not server.alive():
            code = server.proc.returncode if server.proc else None
            raise RuntimeError(f"{what} exited with code {code}; log {server.log_path}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            tail = server.log_tail() if server else ""
            raise RuntimeError(f"{what} not ready within {timeout_s:g} s\n{tail}")
        await asyncio.sleep(0.25)


async def health_serving(url: str) -> bool:
    """Whether the gRPC server at ``url`` reports SERVING on the standard health service."""
    async with grpc.aio.insecure_channel(url) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def versions() -> dict[str, str]:
    """Python and the versions of the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for dist in ("grpcio", "tritonclient", "uvloop", "protobuf", "inferline"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def fmt(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted, or ``-`` for None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (no data, e.g. percentiles of nothing) as None, sets as sorted lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(json_safe(v) for v in value)
    return value


# --- the features service's hot cache, from the router's own counters ----------------------

FEATURE_COUNTERS = {
    ("inferline_feature_cache_lookups_total", "hit"): "hits",
    ("inferline_feature_cache_lookups_total", "miss"): "misses",
    ("inferline_feature_store_reads_total", None): "store_reads",
    ("inferline_feature_store_entities_total", None): "store_entities",
}


def metrics_url(address: str) -> str:
    """``HOST:PORT`` or a full URL → the Prometheus endpoint ``http://HOST:PORT/metrics``."""
    if "://" in address:
        return address
    return f"http://{address}/metrics"


def scrape_feature_counters(url: str) -> dict[str, Any]:
    """The hot-cache and store-read counters at ``url`` (summed over view sets), with ``t`` (monotonic s).

    ``{"error": ...}`` instead when the endpoint did not answer or exports none of them.
    """
    t = time.monotonic()
    try:
        samples = scrape_samples(metrics_url(url))
    except OSError as exc:
        return {"error": repr(exc)}
    out: dict[str, Any] = dict.fromkeys(FEATURE_COUNTERS.values(), 0.0)
    found = False
    for (name, labels), value in samples.items():
        key = FEATURE_COUNTERS.get((name, dict(labels).get("result")))
        if key is not None:
            out[key] += value
            found = True
    if not found:
        return {"error": f"no inferline_feature_* counters at {metrics_url(url)}"}
    out["t"] = t
    return out


async def scrape_feature_counters_after(url: str, delay_s: float) -> dict[str, Any]:
    """``scrape_feature_counters`` ``delay_s`` from now (the start of a run's measured window)."""
    await asyncio.sleep(delay_s)
    return await asyncio.to_thread(scrape_feature_counters, url)


def feature_window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Hot-cache hit rate and store reads between two ``scrape_feature_counters``.

    ``hot_cache_hit_rate`` is hits / lookups of entities over the window (None without
    lookups); ``store_reads_per_s`` and ``store_entities_per_s`` are the online store's
    (Feast's) reads and the entities they asked for, per second of the window.
    """
    if "error" in before or "error" in after:
        return {"error": before.get("error") or after.get("error")}
    d = {k: after[k] - before[k] for k in FEATURE_COUNTERS.values()}
    lookups = d["hits"] + d["misses"]
    span = after["t"] - before["t"]
    return {
        "hot_cache_hit_rate": round(d["hits"] / lookups, 4) if lookups > 0 else None,
        "lookups": int(lookups),
        "hits": int(d["hits"]),
        "store_reads": int(d["store_reads"]),
        "store_entities": int(d["store_entities"]),
        "store_reads_per_s": round(d["store_reads"] / span, 1) if span > 0 else None,
        "store_entities_per_s": round(d["store_entities"] / span, 1) if span > 0 else None,
        "window_s": round(span, 3),
    }


def feature_text(window: dict[str, Any] | None) -> str:
    """One line: ``hot cache 93.1% hit (41230 lookups), Feast 120 reads/s (2840 entities/s)``."""
    if not window:
        return "hot cache: not measured"
    if "error" in window:
        return f"hot cache: not measured ({window['error']})"
    rate = window["hot_cache_hit_rate"]
    hit = "-" if rate is None else f"{100 * rate:.1f}%"
    return (
        f"hot cache {hit} hit ({window['lookups']} lookups), Feast {fmt(window['store_reads_per_s'], '.0f')} "
        f"reads/s ({fmt(window['store_entities_per_s'], '.0f')} entities/s)"
    )


@dataclass
class PredictRecorder:
    """What each call of a recording ``Predict`` target saw, keyed by request number."""

    started: dict[int, float] = field(default_factory=dict)
    """``time.perf_counter()`` when the call was made."""
    served_by: dict[int, int] = field(default_factory=dict)
    """``ServedBy`` enum value of each OK answer."""
    reason: dict[int, int] = field(default_factory=dict)
    """``DegradationReason`` enum value of each OK answer."""
    error_details: dict[int, str] = field(default_factory=dict)
    """Status details of each failed call (``AioRpcError.details()``, or the exception's text)."""
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Failed calls by (status code name or exception type, details)."""


def recording_predict_target(
    url: str,
    route: str = "driver_ranking",
    entity_ids_sampler: Callable[[], int] | None = None,
    api_key: str = DEMO_API_KEY,
    traffic_class: str = "critical",
    *,
    deadline_s: float = 0.1,
    join_key: str = "driver_id",
    entities_per_request: int = 1,
    pool_size: int = 50_000,
    name: str = "router",
) -> tuple[Target, PredictRecorder]:
    """``predict_target`` that also records each answer's ``served_by`` and degradation reason.

    Same requests (a cycling pool of pre-built ones, by request number: large enough that a
    run's entity draws are not repeated) and gRPC deadline (``deadline_s``);
    the recording costs two dict stores per call. Failures are re-raised after recording,
    so the load generator sees the same outcomes.
    """
    caller = prepare_predict(
        url, route, entity_ids_sampler, api_key, traffic_class,
        join_key=join_key, entities_per_request=entities_per_request, pool_size=pool_size,
    )  # fmt: skip
    pool, predict, metadata_ = caller.pool, caller.predict, caller.metadata
    size = len(pool)
    rec = PredictRecorder()
    started, served_by, reason = rec.started, rec.served_by, rec.reason
    perf = time.perf_counter

    async def call(i: int) -> None:
        started[i] = perf()
        try:
            response = await predict(pool[i % size], metadata=metadata_, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            rec.error_details[i] = details
            rec.errors[(exc.code().name, details)] += 1
            raise
        except Exception as exc:
            rec.error_details[i] = str(exc)
            rec.errors[(type(exc).__name__, str(exc))] += 1
            raise
        served_by[i] = response.served_by
        reason[i] = response.degradation_reason

    return Target(name, call, caller.channel), rec
