"""The bench result as files: ``<out>.json`` and a self-contained ``<out>.html`` with plots.

Takes the JSON-able dict of ``bench.runner.run_bench`` (or one read back from its JSON), so
it runs without servers. Plots are drawn with matplotlib's Agg renderer on ``Figure``
objects (no pyplot global state) and embedded as base64 PNG:

- latency CDF per class, one panel per target (response time of OK answers, at the knee
  step of a sweep, else the last step);
- goodput against offered load, every target on one plot;
- what answered each request over time (served_by for ``Predict``, else OK or the error
  code), stacked per 1 s bin, one panel per target, sweep steps laid end to end.
"""

from __future__ import annotations

import base64
import html
import io
import json
import pathlib
from collections import Counter
from typing import Any

from matplotlib.figure import Figure

from inferline.bench.harness import fmt, json_safe

COLORS = {
    "PRIMARY": "#2ca02c",
    "LIGHT": "#1f77b4",
    "CACHE": "#ff7f0e",
    "BASELINE": "#d62728",
    "UNSPECIFIED": "#bcbd22",
    "OK": "#7f7f7f",
}
MARKERS = ("o", "s", "^", "D", "v")
LINESTYLES = ("-", "--", "-.", ":")
ERROR_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#000000", "#aec7e8")


def report_paths(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``<out>.json`` and ``<out>.html`` (suffixes appended: a dot in ``out``'s name is kept)."""
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".html")


def write_report(result: dict[str, Any], out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<out>.json`` (NaN written as null) and ``<out>.html``; returns both paths."""
    json_path, html_path = report_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    safe = json_safe(result)
    # Compact: the request records are most of it (tens of thousands of numbers per step).
    json_path.write_text(json.dumps(safe, separators=(",", ":"), allow_nan=False) + "\n")
    html_path.write_text(render_html(safe))
    return json_path, html_path


def load_result(path: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(path.read_text())
    return out


# --- choosing data ----------------------------------------------------------------------------


def focus_step(target: dict[str, Any]) -> dict[str, Any] | None:
    """The step a target is shown by: its knee step in a sweep, else its last step."""
    steps: list[dict[str, Any]] = target["steps"]
    if not steps:
        return None
    knee = (target.get("knee") or {}).get("knee_rate")
    return next((st for st in steps if st["rate"] == knee), steps[-1])


def _ok_response_ms(records: dict[str, list[Any]], cls: str) -> list[float]:
    return sorted(
        lag + lat
        for c, o, lag, lat in zip(
            records["class"], records["outcome"], records["lag_ms"], records["latency_ms"], strict=True
        )
        if c == cls and o == "OK" and lat is not None
    )


def knee_text(target: dict[str, Any]) -> str:
    """``850/s``, ``≥ 1200/s`` (the sweep ran out of rates first) or ``none`` (its first step failed)."""
    knee = target.get("knee") or {}
    rate = knee.get("knee_rate")
    if rate is None:
        return "none"
    return ("≥ " if knee.get("knee_is_lower_bound") else "") + f"{rate:g}/s"


def answer_label(outcome: str, served_by: str | None) -> str:
    """What answered a request: its served_by (``Predict``), else ``OK`` or the error code."""
    if outcome == "OK":
        return served_by or "OK"
    return outcome


# --- plots -------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def plot_latency_cdf(result: dict[str, Any]) -> bytes:
    targets = result["targets"]
    deadline_ms = float(result["settings"]["deadline_ms"])
    fig = Figure(figsize=(5.0 * max(1, len(targets)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(targets)), squeeze=False)[0]
    for ax, target in zip(axes, targets, strict=False):
        step = focus_step(target)
        records = (step or {}).get("records")
        drawn = False
        for cls in result["settings"]["mix"]:
            values = _ok_response_ms(records, cls) if records else []
            if values:
                n = len(values)
                ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=f"{cls} (n={n})")
                drawn = True
        ax.axvline(deadline_ms, color="red", linestyle="--", linewidth=1, label=f"deadline {deadline_ms:g} ms")
        if drawn:
            ax.set_xscale("log")
        rate = f" at {step['rate']:g}/s" if step else ""
        ax.set_title(f"{target['name']}{rate}")
        ax.set_xlabel("response time of OK answers (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def plot_goodput(result: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    top = 1.0
    for k, target in enumerate(result["targets"]):
        steps = target["steps"]
        if not steps:
            continue
        x = [st["offered_rate"] or 0.0 for st in steps]
        y = [st["goodput"] or 0.0 for st in steps]
        top = max(top, *x, *y)
        # Targets that keep up draw the same line: markers and dashes keep each one visible.
        marker, dashes = MARKERS[k % len(MARKERS)], LINESTYLES[k % len(LINESTYLES)]
        (line,) = ax.plot(x, y, label=target["name"], marker=marker, linestyle=dashes, alpha=0.85)
        knee = (target.get("knee") or {}).get("knee_rate")
        at_knee = [st for st in steps if st["rate"] == knee]
        if at_knee:
            ax.plot(
                [at_knee[0]["offered_rate"]],
                [at_knee[0]["goodput"]],
                marker="*",
                markersize=16,
                color=line.get_color(),
                linestyle="none",
                label=f"{target['name']} knee {knee_text(target)}",
            )
    ax.plot([0, top], [0, top], color="gray", linestyle=":", linewidth=1, label="goodput = offered")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("goodput (OK within deadline, /s)")
    ax.set_title("goodput vs offered load")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def _answers_by_second(target: dict[str, Any]) -> tuple[dict[str, Counter[int]], list[tuple[float, float]]]:
    """Counts per label per 1 s bin (sweep steps end to end), and (start s, rate) of each step."""
    counts: dict[str, Counter[int]] = {}
    starts: list[tuple[float, float]] = []
    offset = 0.0
    for step in target["steps"]:
        starts.append((offset, step["rate"]))
        records = step.get("records") or {}
        for t, outcome, served in zip(
            records.get("t_s", []), records.get("outcome", []), records.get("served_by", []), strict=True
        ):
            counts.setdefault(answer_label(outcome, served), Counter())[int(offset + t)] += 1
        offset += float(step["duration_s"])
    return counts, starts


def _label_order(labels: set[str]) -> list[str]:
    known = [k for k in COLORS if k in labels]
    return known + sorted(labels - set(known))


def plot_served_by(result: dict[str, Any]) -> bytes:
    targets = result["targets"]
    fig = Figure(figsize=(10.0, 2.8 * max(1, len(targets))), layout="constrained")
    axes = fig.subplots(max(1, len(targets)), 1, squeeze=False)[:, 0]
    for ax, target in zip(axes, targets, strict=False):
        counts, starts = _answers_by_second(target)
        bins = sorted({b for c in counts.values() for b in c})
        bottom = dict.fromkeys(bins, 0)
        errors = iter(ERROR_COLORS * 4)
        for label in _label_order(set(counts)):
            heights = [counts[label].get(b, 0) for b in bins]
            color = COLORS.get(label) or next(errors)
            ax.bar(bins, heights, width=1.0, align="edge", bottom=[bottom[b] for b in bins], color=color, label=label)
            for b, h in zip(bins, heights, strict=True):
                bottom[b] += h
        if len(starts) > 1:
            for start, rate in starts:
                ax.axvline(start, color="black", linewidth=0.6, alpha=0.5)
                ax.annotate(
                    f"{rate:g}/s",
                    (start, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(2, -2),
                    textcoords="offset points",
                    fontsize="x-small",
                    va="top",
                    ha="left",
                )
        kind = "served_by" if target.get("has_served_by") else "outcome"
        ax.set_title(f"{target['name']}: {kind} per second")
        ax.set_xlabel("seconds (measured windows end to end)")
        ax.set_ylabel("requests")
        ax.margins(y=0.12)  # room for the step labels
        if counts:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    return _png(fig)


def figures(result: dict[str, Any]) -> dict[str, bytes]:
    """The three plots as PNG bytes, by name."""
    return {
        "latency CDF per class": plot_latency_cdf(result),
        "goodput vs offered load": plot_goodput(result),
        "served_by over time": plot_served_by(result),
    }


# --- HTML --------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:0.8em 0}
th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px}td.n{text-align:right}th{background:#f0f0f0}
.bad{color:#b00;font-weight:bold}.ok{color:#070}img{max-width:100%;display:block;margin:0.5em 0 1.5em}
code{background:#f4f4f4;padding:1px 3px}"""


def _shares(shares: dict[str, float | None] | None) -> str:
    if not shares:
        return "-"
    return ", ".join(f"{k} {100 * (v or 0):.1f}%" for k, v in shares.items())


def _row(cells: list[tuple[str, bool]]) -> str:
    return "<tr>" + "".join(f'<td class="n">{c}</td>' if num else f"<td>{c}</td>" for c, num in cells) + "</tr>"


def hot_cache_cells(target: dict[str, Any], st: dict[str, Any]) -> tuple[str, str]:
    """(hit rate %, store reads/s) of a step's measured window, ``-`` where not measured."""
    window = st.get("features") or {}
    if target.get("kind") != "predict" or "error" in window or not window:
        return "-", "-"
    rate = window.get("hot_cache_hit_rate")
    return fmt(None if rate is None else 100 * rate, ".1f"), fmt(window.get("store_reads_per_s"), ".0f")


def _step_row(target: dict[str, Any], st: dict[str, Any]) -> str:
    rt = st["response_time"]
    behind = '<span class="bad">yes</span>' if st["fell_behind"] else "no"
    verdict = (
        '<span class="ok">pass</span>'
        if st["passed"]
        else f'<span class="bad">fail</span>: {html.escape(str(st["reason"]))}'
    )
    errors = ", ".join(f"{html.escape(k)} {v}" for k, v in st["errors"].items()) or "-"
    pct = fmt(100 * st["goodput"] / st["offered_rate"], ".1f") if st["offered_rate"] else "-"
    hit, reads = hot_cache_cells(target, st)
    return _row(
        [
            (html.escape(target["name"]), False),
            (f"{st['rate']:g}", True),
            (fmt(st["offered_rate"], ".1f"), True),
            (fmt(st["send_rate"], ".1f"), True),
            (fmt(st["goodput"], ".1f"), True),
            (pct, True),
            (f"{fmt(rt['p50_ms'])} / {fmt(rt['p95_ms'])} / {fmt(rt['p99_ms'])}", True),
            (errors, False),
            (html.escape(_shares(st.get("served_by"))), False),
            (hit, True),
            (reads, True),
            (fmt(st["start_lag_p99_ms"]), True),
            (behind, False),
            (verdict, False),
        ]
    )


def _summary_table(result: dict[str, Any]) -> str:
    head = (
        "target",
        "rate/s",
        "offered/s",
        "sent/s",
        "goodput/s",
        "goodput %",
        "p50 / p95 / p99 ms",
        "errors",
        "served_by",
        "hot cache hit %",
        "Feast reads/s",
        "gen lag p99 ms",
        "fell behind",
        "verdict",
    )
    rows = [_step_row(t, st) for t in result["targets"] for st in t["steps"]]
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _knees(result: dict[str, Any]) -> str:
    items = [
        f"<li><b>{html.escape(t['name'])}</b>: knee {html.escape(knee_text(t))} "
        f"({html.escape(t['knee']['stopped_reason'])})</li>"
        for t in result["targets"]
        if t.get("knee")
    ]
    return f"<h2>Knee</h2><ul>{''.join(items)}</ul>" if items else ""


def _class_table(result: dict[str, Any]) -> str:
    rows = []
    for t in result["targets"]:
        st = focus_step(t)
        if st is None:
            continue
        for cls, c in st["classes"].items():
            errors = ", ".join(f"{html.escape(k)} {v}" for k, v in c["errors"].items()) or "-"
            rt = c["response_time"]
            rows.append(
                _row(
                    [
                        (html.escape(t["name"]), False),
                        (f"{st['rate']:g}", True),
                        (html.escape(cls), False),
                        (str(c["requests"]), True),
                        (fmt(100 * c["ok_in_time"] if c["ok_in_time"] is not None else None, ".1f"), True),
                        (f"{fmt(rt['p50_ms'])} / {fmt(rt['p95_ms'])} / {fmt(rt['p99_ms'])}", True),
                        (html.escape(", ".join(f"{k} {v}" for k, v in c["served_by"].items()) or "-"), False),
                        (errors, False),
                    ]
                )
            )
    head = ("target", "rate/s", "class", "requests", "OK in time %", "p50 / p95 / p99 ms", "served_by", "errors")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def entities_text(result: dict[str, Any]) -> str:
    """How ``Predict`` targets drew entity ids, and where the hot-cache figures come from."""
    parts = []
    for t in result["targets"]:
        e = t.get("entities")
        if not e:
            continue
        low, high = e["ids"]
        how = f"Zipf (s = {e['zipf_s']:g})" if e["distribution"] == "zipf" else "uniform"
        source = (
            f"hot-cache hit rate and Feast reads from the router's counters ({t['metrics']})"
            if t.get("metrics")
            else "hot cache not measured (no --metrics)"
        )
        parts.append(f"{t['name']}: one entity per request, {how} over ids {low}..{high}; {source}")
    return "; ".join(parts)


def render_html(result: dict[str, Any]) -> str:
    """The self-contained HTML report (plots inline as base64 PNG)."""
    s = result["settings"]
    targets = ", ".join(
        f"{html.escape(t['name'])} ({html.escape(t['kind'])} {html.escape(t['url'])})" for t in result["targets"]
    )
    mix = ", ".join(f"{html.escape(k)} {v:g}" for k, v in s["mix"].items())
    plots = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}">'
        for name, png in figures(result).items()
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>inferline bench {html.escape(str(result.get("started", "")))}</title>
<style>{_CSS}</style></head><body>
<h1>inferline bench — {html.escape(s["mode"])}</h1>
<p>Started {html.escape(str(result.get("started", "")))}; targets {targets}.<br>
Open-loop Poisson arrivals; {s["duration_s"]:g} s measured per run after {s["warmup_s"]:g} s warm-up;
deadline {s["deadline_ms"]:g} ms; mix {mix}; {s["generators"]} generator process(es).<br>
Goodput: OK answers within the deadline per second. Latencies: response time of OK answers
(scheduled arrival to answer, so generator lag counts against the target). A run whose generator
p99 start lag exceeded {fmt(result.get("max_start_lag_ms"), "g")} ms fell behind its schedule.
Knee criteria: {html.escape(str(s.get("knee_criteria", "")))}.<br>
Entities: {html.escape(entities_text(result) or "-")}; hit rate and reads per second over each measured window.</p>
<h2>Summary</h2>{_summary_table(result)}{_knees(result)}
<h2>Per class (knee step, or the last step)</h2>{_class_table(result)}
{plots}
</body></html>
"""
