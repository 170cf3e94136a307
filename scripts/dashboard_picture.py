"""Render deploy/grafana/inferline-dashboard.json's panels to a PNG from a real Prometheus.

``render``: query a running Prometheus (``/api/v1/query_range``) with every panel's PromQL
and draw the panels where the dashboard puts them (rows, grid positions, units, threshold
lines). ``run``: the whole picture from nothing: ``inferline up`` on free ports, a
Prometheus scraping its router (and loading deploy/grafana/alerts.yaml, whose recording
rules some panels read), ``inferline bench`` in phases (healthy, a tenant over its quota,
overload), then ``render``. Grafana itself is not installable from the registries here;
the queries and the layout are the dashboard's own.

Usage:
    python scripts/dashboard_picture.py run --out docs/img/dashboard.png
    python scripts/dashboard_picture.py render --prometheus http://127.0.0.1:9090 --minutes 10 --out x.png
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from matplotlib.ticker import FuncFormatter
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "inferline-dashboard.json"
ALERTS = ROOT / "deploy" / "grafana" / "alerts.yaml"
CONFIG = ROOT / "deploy" / "local" / "inferline.yaml"
DEMO_KEY = "inferline-demo-key"
QUOTA_KEY = "dashboard-picture-quota-key"
RATE_INTERVAL = "30s"
UNIT_HEIGHT_IN = 0.42
HEADER_UNITS = 2
MARGIN_X, MARGIN_BOTTOM, MARGIN_V = 0.03, 0.018, 0.034
"""Figure fractions around a panel's plot: its y tick labels, x label and title."""
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
SHADES = ("#5794f2", "#f2495c")


def _query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _promql(expr: str) -> str:
    """Grafana's variables as Prometheus takes them: every route, class and model; a fixed rate interval."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def _formatter(unit: str | None) -> FuncFormatter:
    def fmt(value: float, _: object) -> str:
        if unit == "percentunit":
            return f"{value * 100:.0f}%"
        if unit == "s":
            return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
        if unit == "reqps":
            return f"{value:.0f}/s" if abs(value) >= 10 else f"{value:.1f}/s"
        return f"{value:.3g}"

    return FuncFormatter(fmt)


def _thresholds(panel: dict[str, Any]) -> list[float]:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") == "off":
        return []
    return [s["value"] for s in defaults.get("thresholds", {}).get("steps", []) if s.get("value") is not None]


Phase = tuple[str, float, float]
"""(name, start, end) of a bench phase, unix seconds."""


def _draw(ax: Any, panel: dict[str, Any], prometheus: str, start: float, end: float, phases: list[Phase]) -> None:
    step = max(5.0, (end - start) / 240)
    ax.set_facecolor(PANEL)
    for i, (_, t0, t1) in enumerate(phases):
        if 0 < i < len(phases) - 1:  # the phases between the first and the last (the trouble) shaded
            ax.axvspan((t0 - start) / 60, (t1 - start) / 60, color=SHADES[(i - 1) % len(SHADES)], alpha=0.10, lw=0)
    ax.set_title(panel["title"], loc="left", color=TEXT, fontsize=9, fontweight="bold")
    lines = 0
    for target in panel["targets"]:
        for series in _query_range(prometheus, _promql(target["expr"]), start, end, step):
            points = [(float(t) - start, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            label = _legend(target.get("legendFormat", ""), series["metric"])
            style = "--" if "deadline" in label else "-"
            ax.plot([x / 60 for x in xs], ys, style, linewidth=1.2, label=label, drawstyle="steps-post" if
                    panel["type"] == "state-timeline" else "default")  # fmt: skip
            lines += 1
    for value in _thresholds(panel):
        ax.axhline(value, color="#f2495c" if value == max(_thresholds(panel)) else "#ff9830", linestyle=":", lw=1)
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if defaults.get("custom", {}).get("scaleDistribution", {}).get("type") == "log" and lines:
        ax.set_yscale("log", base=defaults["custom"]["scaleDistribution"].get("log", 10))
    if panel["type"] == "state-timeline":  # 0 closed, 1 open or half-open
        ax.set_ylim(-0.2, 1.2)
        ax.set_yticks([0, 1], ["closed", "open"])
    else:
        ax.yaxis.set_major_formatter(_formatter(defaults.get("unit")))
    ax.set_xlim(0, (end - start) / 60)
    ax.tick_params(colors=TEXT, labelsize=7)
    ax.grid(color=GRID, linewidth=0.5)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.set_xlabel("minutes", color=TEXT, fontsize=7)
    if lines == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#8e8e8e")
    elif lines <= 8:
        ax.legend(fontsize=6, loc="upper left", facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, framealpha=0.8)


def render(prometheus: str, start: float, end: float, out: pathlib.Path, phases: Sequence[Phase] = ()) -> None:
    """Every panel of the dashboard, queried over [start, end], laid out on its grid; bench phases shaded."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) + HEADER_UNITS
    fig = plt.figure(figsize=(18, rows * UNIT_HEIGHT_IN), facecolor=BACKGROUND)
    fig.text(0.01, 1 - 0.6 / rows, f"{dashboard['title']}  (Grafana dashboard, drawn from Prometheus)", color=TEXT,
             fontsize=15, fontweight="bold", va="center")  # fmt: skip
    if phases:
        timeline = ",  ".join(f"{(t0 - start) / 60:.1f}–{(t1 - start) / 60:.1f} min {name}" for name, t0, t1 in phases)
        note = "inferline bench phases (shaded between the first and the last): " + timeline
        fig.text(0.01, 1 - 1.4 / rows, note, color="#8e8e8e", fontsize=10, va="center")
    for panel in panels:
        pos = panel["gridPos"]
        left, width = pos["x"] / 24, pos["w"] / 24
        top = 1 - (pos["y"] + HEADER_UNITS) / rows
        height = pos["h"] / rows
        if panel["type"] == "row":
            fig.text(0.01, top - height / 2 - 0.006, panel["title"], color=TEXT, fontsize=12, fontweight="bold")
            continue
        ax = fig.add_axes((left + MARGIN_X, top - height + MARGIN_BOTTOM, width - 1.4 * MARGIN_X, height - MARGIN_V))
        _draw(ax, panel, prometheus, start, end, list(phases))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=BACKGROUND)
    plt.close(fig)
    with Image.open(out) as image:  # 256 colours: a third of the bytes, no visible change on flat panels
        image.convert("RGB").quantize(colors=256).save(out, optimize=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _config_with_quota_tenant(folder: pathlib.Path) -> pathlib.Path:
    """The default configuration plus tenant "acme" with a 20 req/s quota (key QUOTA_KEY)."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["tenants"]["acme"] = {
        "api_key_sha256": [hashlib.sha256(QUOTA_KEY.encode()).hexdigest()],
        "routes": ["driver_ranking"],
        "traffic_classes": ["critical", "standard", "batch"],
        "default_traffic_class": "standard",
        "quota": {"rate_per_s": 20, "burst": 20},
    }
    for key in ("model_repository", "server_env"):
        raw["triton"][key] = str((CONFIG.parent / raw["triton"][key]).resolve())
    raw["feature_store"]["feast_repo"] = str((CONFIG.parent / raw["feature_store"]["feast_repo"]).resolve())
    path = folder / "inferline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _bench(port: int, rate: float, duration_s: float, keys: list[str], folder: pathlib.Path, name: str) -> None:
    command = [sys.executable, "-m", "inferline.cli", "bench", "--target", f"predict=127.0.0.1:{port}",
               "--rate", str(rate), "--duration", str(duration_s), "--warmup", "0", "--deadline-ms", "250",
               "--out", str(folder / name)]  # fmt: skip
    for key in keys:
        command += ["--tenant-key", key]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def run(out: pathlib.Path, phases: list[tuple[str, float, float, list[str]]]) -> None:
    """Stack, Prometheus, bench phases (name, rate, seconds, keys), picture; everything stopped at the end."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        raise SystemExit("prometheus is missing: make promtool installs it")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dashboard-picture-"))
    port, metrics_port, prom_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "INFERLINE_GATEWAY__ADMIN_PORT": str(_free_port())}
    config = _config_with_quota_tenant(folder)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        up = subprocess.Popen(
            [sys.executable, "-m", "inferline.cli", "up", "--config", str(config), "--port", str(port),
             "--metrics-port", str(metrics_port)],
            stdout=(folder / "up.log").open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        processes.append(up)
        _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 300)
        (folder / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {"job_name": "inferline", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                    ],
                }
            )
        )
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=(folder / "prometheus.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        processes.append(prometheus)
        url = f"http://127.0.0.1:{prom_port}"
        _wait_http(f"{url}/-/ready", 60)
        start = time.time()
        done: list[Phase] = []
        for name, rate, seconds, keys in phases:
            print(f"phase {name}: {rate:g} req/s for {seconds:g} s", file=sys.stderr, flush=True)
            began = time.time()
            _bench(port, rate, seconds, keys, folder, name.replace(" ", "-"))
            done.append((name, began, time.time()))
        time.sleep(10)  # two more scrapes and rule evaluations after the last request: the picture's tail
        render(url, start, time.time(), out, done)
        print(f"wrote {out}; logs and TSDB in {folder}", file=sys.stderr)
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def _phases_of(folder: pathlib.Path) -> list[Phase]:
    """Bench phases from the reports ``inferline bench --out`` left in a run's folder."""
    phases = []
    for report in folder.glob("*.json"):
        document = json.loads(report.read_text())
        began = datetime.datetime.fromisoformat(document["started"]).timestamp()
        phases.append((report.stem.replace("-", " "), began, began + float(document["duration_s"])))
    return sorted(phases, key=lambda phase: phase[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("render", help="query a running Prometheus")
    draw.add_argument("--prometheus", required=True)
    draw.add_argument("--minutes", type=float, default=10.0, help="the last minutes (without --bench-dir)")
    draw.add_argument("--bench-dir", type=pathlib.Path, help="a run's folder: its bench phases set the time range")
    draw.add_argument("--out", type=pathlib.Path, required=True)
    full = commands.add_parser("run", help="stack, Prometheus, bench phases, picture")
    full.add_argument("--out", type=pathlib.Path, required=True)
    full.add_argument("--rate", type=float, default=60.0, help="healthy rate (req/s); overload is 8 times it")
    full.add_argument("--phase-s", type=float, default=60.0, help="seconds per phase")
    args = parser.parse_args(argv)
    if args.command == "render":
        if args.bench_dir:
            done = _phases_of(args.bench_dir)
            render(args.prometheus, done[0][1] - 15, done[-1][2] + 15, args.out, done)
        else:
            end = time.time()
            render(args.prometheus, end - args.minutes * 60, end, args.out)
    else:
        phases = [
            ("healthy", args.rate, args.phase_s, [DEMO_KEY]),
            ("tenant over quota", args.rate, args.phase_s, [DEMO_KEY, QUOTA_KEY]),
            ("overload", args.rate * 8, args.phase_s, [DEMO_KEY]),
            ("recovered", args.rate, args.phase_s, [DEMO_KEY]),
        ]
        run(args.out, phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
