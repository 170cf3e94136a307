"""Render deploy/grafana/alerts.yaml: per-class error-budget burn alerts, and the operational alerts.

Each traffic class has a service level objective: the share of its requests that get an OK
answer (any ``served_by``) no later than the class's deadline (``default_deadline_ms``).
Its error budget is ``1 - objective``. Bad events are server-side failures (any code but OK
and the caller's own mistakes; RESOURCE_EXHAUSTED from shedding counts, from a tenant over
its quota does not) and OK answers later than the deadline, counted from the ``total``
latency histogram whose bucket bound equals the deadline. Alerts follow the multi-window,
multi-burn-rate recipe of Google's SRE workbook ("Alerting on SLOs"): a long window says the
budget is really burning, a short one (1/12 of it) that it still is, so the alert resets
soon after the burn stops.

    fast:  1h and 5m  burn > 14.4 (2 % of a 30-day budget in an hour)   or
           6h and 30m burn > 6    (5 % in six hours)                      -> SLO_CLASSES severity
    slow:  1d and 2h  burn > 3    (10 % in a day)                         -> warning (a ticket)

Usage: ``python scripts/render_alerts.py [--config deploy/local/inferline.yaml] [--check]``;
``--check`` exits 1 when the file differs from what the configuration renders.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from inferline.core.config import load_config
from inferline.core.metrics import LATENCY_BUCKETS_S

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "deploy" / "local" / "inferline.yaml"
OUT = ROOT / "deploy" / "grafana" / "alerts.yaml"

CALLER_CODES = "INVALID_ARGUMENT|UNAUTHENTICATED|PERMISSION_DENIED|NOT_FOUND"
"""Codes a caller's own request causes: not the operator's budget."""
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d")


@dataclass(frozen=True)
class Objective:
    target: float
    """Share of good requests (e.g. 0.999)."""
    fast_severity: str
    """Severity of the fast burn: ``critical`` pages, ``warning`` is a ticket."""


SLO_CLASSES = {
    "critical": Objective(0.999, "critical"),
    "standard": Objective(0.995, "critical"),
    "batch": Objective(0.99, "warning"),
}
"""Objectives by traffic class; a class not named here gets ``DEFAULT_OBJECTIVE``. Batch work
has no caller waiting on it: its fast burn is a ticket, not a page."""
DEFAULT_OBJECTIVE = Objective(0.99, "warning")
BURNS = (("1h", "5m", 14.4), ("6h", "30m", 6.0))
SLOW_BURN = ("1d", "2h", 3.0)


class _Literal(str):
    """A string dumped as a YAML block (``|``): PromQL stays readable."""


def _dump(data: Any) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=1000, allow_unicode=True)


def le_matcher(bound_s: float) -> str:
    """``le`` of a bucket bound as prometheus_client writes it ("2.0") or Prometheus 3 normalises it ("2")."""
    python, go = str(float(bound_s)), format(bound_s, "g")
    return f'le="{python}"' if python == go else f'le=~"{python.replace(".", "[.]")}|{go}"'


def _recording_rules(deadlines: dict[str, float], budgets: dict[str, float]) -> list[dict[str, Any]]:
    # Constants per class, for the dashboard: burn rate = error ratio / budget; deadline lines.
    rules: list[dict[str, Any]] = [
        {"record": name, "expr": f"vector({value:g})", "labels": {"traffic_class": cls}}
        for cls in deadlines
        for name, value in (
            ("inferline:slo_error_budget", budgets[cls]),
            ("inferline:slo_deadline_seconds", deadlines[cls]),
        )
    ]
    for w in WINDOWS:
        counted = f'code!~"{CALLER_CODES}", reason!="QUOTA_EXCEEDED"'
        late = "\n  or\n".join(
            f'  sum by (route, traffic_class) (rate(inferline_layer_latency_seconds_count{{layer="total", '
            f'traffic_class="{cls}"}}[{w}]))\n'
            f'  - sum by (route, traffic_class) (rate(inferline_layer_latency_seconds_bucket{{layer="total", '
            f'traffic_class="{cls}", {le_matcher(deadline)}}}[{w}]))'
            for cls, deadline in deadlines.items()
        )
        rules += [
            {
                "record": f"inferline:slo_requests:rate{w}",
                "expr": f"sum by (route, traffic_class) (rate(inferline_requests_total{{{counted}}}[{w}]))",
            },
            {
                "record": f"inferline:slo_failed:rate{w}",
                "expr": f'sum by (route, traffic_class) (rate(inferline_requests_total{{code!="OK", {counted}}}[{w}]))',
            },
            {"record": f"inferline:slo_late:rate{w}", "expr": _Literal(f"(\n{late}\n)\n")},
            {
                "record": f"inferline:slo_errors:ratio_rate{w}",
                "expr": _Literal(
                    f"(inferline:slo_failed:rate{w} + on (route, traffic_class) inferline:slo_late:rate{w})\n"
                    f"  / on (route, traffic_class) (inferline:slo_requests:rate{w} > 0)\n"
                ),
            },
        ]
    return rules


def _burn(cls: str, long: str, short: str, factor: float, budget: float) -> str:
    threshold = f"{factor * budget:.6g}"
    ratio = "inferline:slo_errors:ratio_rate"
    return (
        f'({ratio}{long}{{traffic_class="{cls}"}} > {threshold}\n'
        f'  and {ratio}{short}{{traffic_class="{cls}"}} > {threshold})'
    )


def _class_alerts(cls: str, deadline_s: float, objective: Objective) -> list[dict[str, Any]]:
    budget = 1 - objective.target
    name = "Inferline" + cls.title().replace("_", "")
    target = f"{objective.target * 100:g} %"
    where = f"class {cls} (deadline {deadline_s:g} s, objective {target} of requests answered OK in time)"
    first = (
        'Check "Error budget burn by class" and "Requests by code": failures (UNAVAILABLE, INTERNAL, '
        "DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED/SHED) point at Triton, the circuit breakers or admission; "
        'late answers at "Total latency p99 by traffic class" and the layer that eats the budget.'
    )
    fast = " or\n".join(_burn(cls, long, short, factor, budget) for long, short, factor in BURNS)
    slow = _burn(cls, *SLOW_BURN, budget)
    return [
        {
            "alert": f"{name}ErrorBudgetBurn",
            "expr": _Literal(fast + "\n"),
            "for": "2m",
            "labels": {"severity": objective.fast_severity, "service": "inferline", "traffic_class": cls},
            "annotations": {
                "summary": f"Route {{{{ $labels.route }}}}, {where}: error budget burning fast",
                "description": (
                    f"Over 1 h (and still over 5 min) {14.4 * budget * 100:g} % of the requests of {where} "
                    f"failed or were answered late: 14.4 times the rate that spends a 30-day budget of "
                    f"{budget * 100:g} % in 30 days (or 6 times, over 6 h and 30 min). {first}"
                ),
            },
        },
        {
            "alert": f"{name}ErrorBudgetBurnSlow",
            "expr": _Literal(slow + "\n"),
            "for": "15m",
            "labels": {"severity": "warning", "service": "inferline", "traffic_class": cls},
            "annotations": {
                "summary": f"Route {{{{ $labels.route }}}}, {where}: error budget burning steadily",
                "description": (
                    f"Over 1 day (and still over 2 h) the requests of {where} failed or were late 3 times "
                    f"faster than the budget allows: 10 % of the month's budget spent in a day. {first}"
                ),
            },
        },
    ]


def _operational_alerts() -> list[dict[str, Any]]:
    return [
        {
            "alert": "InferlineHighFallbackRate",
            "expr": _Literal(
                'sum by (route) (rate(inferline_requests_total{code="OK", served_by!="PRIMARY"}[5m]))\n'
                "  /\n"
                'sum by (route) (rate(inferline_requests_total{code="OK"}[5m]))\n'
                "  > 0.2\n"
            ),
            "for": "5m",
            "labels": {"severity": "warning", "service": "inferline"},
            "annotations": {
                "summary": (
                    "Route {{ $labels.route }}: {{ $value | humanizePercentage }} of answers come from a fallback"
                ),
                "description": (
                    "More than 20% of the OK answers of route {{ $labels.route }} were served by LIGHT, CACHE or "
                    'BASELINE instead of the primary model for 5 minutes. Check the "Degradation reasons" and '
                    '"Circuit breaker" panels: the primary model is failing, slow, or the features are degraded.'
                ),
            },
        },
        {
            "alert": "InferlineShedding",
            "expr": _Literal(
                'sum by (route) (rate(inferline_requests_total{code="RESOURCE_EXHAUSTED", reason="SHED"}[5m]))\n'
                "  /\n"
                'sum by (route) (rate(inferline_requests_total{reason!="QUOTA_EXCEEDED"}[5m]))\n'
                "  > 0.05\n"
            ),
            "for": "10m",
            "labels": {"severity": "warning", "service": "inferline"},
            "annotations": {
                "summary": "Route {{ $labels.route }}: admission sheds {{ $value | humanizePercentage }} of requests",
                "description": (
                    "For 10 minutes admission control refused more than 5% of the requests of route "
                    "{{ $labels.route }} (RESOURCE_EXHAUSTED, reason SHED): the routers are at capacity and "
                    'shed the lowest classes first ("Shed rate by class and reason", "Concurrency limit vs in '
                    'flight", "Queue wait"). Add routers or Triton capacity. Quota refusals do not count here.'
                ),
            },
        },
        {
            "alert": "InferlineTenantOverQuota",
            "expr": _Literal("sum by (tenant) (rate(inferline_quota_exceeded_total[5m])) > 0\n"),
            "for": "30m",
            "labels": {"severity": "info", "service": "inferline"},
            "annotations": {
                "summary": "Tenant {{ $labels.tenant }} is over its quota ({{ $value | humanize }} refusals/s)",
                "description": (
                    "For 30 minutes tenant {{ $labels.tenant }} sent more than its quota (tenants.*.quota) and "
                    "its excess was refused with RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED. This is the tenant's "
                    "signal, not an outage: tell the tenant's owner, or raise its quota "
                    '("Quota refusals by tenant").'
                ),
            },
        },
        {
            "alert": "InferlineCircuitOpen",
            "expr": "max by (model) (inferline_circuit_open) > 0",
            "for": "1m",
            "labels": {"severity": "critical", "service": "inferline"},
            "annotations": {
                "summary": "Model {{ $labels.model }}: circuit breaker open for more than 1 minute",
                "description": (
                    "The circuit breaker of model {{ $labels.model }} has been open or half-open for more than "
                    "1 minute: Triton is down or the model keeps failing, and requests are served by fallbacks."
                ),
            },
        },
        {
            "alert": "TritonDown",
            "expr": 'up{job="triton"} == 0',
            "for": "1m",
            "labels": {"severity": "critical", "service": "inferline"},
            "annotations": {
                "summary": "Triton {{ $labels.instance }} is down",
                "description": (
                    'Prometheus could not scrape Triton\'s metrics endpoint ({{ $labels.instance }}, job "triton") '
                    "for 1 minute."
                ),
            },
        },
        {
            "alert": "InferlineNoPrimaryAnswers",
            "expr": _Literal(
                'sum by (route) (rate(inferline_requests_total{route!="unknown", '
                f'code!~"{CALLER_CODES}|RESOURCE_EXHAUSTED"}}[2m])) > 0\n'
                "  unless\n"
                'sum by (route) (rate(inferline_requests_total{served_by="PRIMARY"}[2m])) > 0\n'
            ),
            "for": "2m",
            "labels": {"severity": "critical", "service": "inferline"},
            "annotations": {
                "summary": "Route {{ $labels.route }}: no PRIMARY answers while traffic flows",
                "description": (
                    "Route {{ $labels.route }} received requests for 2 minutes without a single answer from its "
                    "primary model: Triton is down or unreachable, or every call fails or misses its deadline. "
                    "Requests refused before any work (caller errors, RESOURCE_EXHAUSTED) do not count as traffic."
                ),
            },
        },
        {
            "alert": "InferlineRecoverySlow",
            "expr": _Literal(
                "histogram_quantile(0.95,\n  sum by (le, model) (rate(inferline_recovery_seconds_bucket[15m]))\n) > 5\n"
            ),
            "for": "1m",
            "labels": {"severity": "warning", "service": "inferline"},
            "annotations": {
                "summary": "Model {{ $labels.model }}: p95 recovery time {{ $value | humanizeDuration }} (over 5 s)",
                "description": (
                    "After model {{ $labels.model }} became healthy again, the first PRIMARY answer took more than "
                    "5 seconds (p95 over 15 minutes). The circuit breaker's reset timeout or the model's warm-up is "
                    "too slow."
                ),
            },
        },
    ]


def render(config_path: pathlib.Path) -> str:
    """The alert rules file for the traffic classes of ``config_path``.

    Raises:
        ValueError: a class's deadline is not a bound of the latency histogram.
    """
    config = load_config(config_path, environ={})  # the file alone: no INFERLINE_* overrides of this shell
    deadlines = {name: cls.default_deadline_ms / 1000 for name, cls in config.traffic_classes.items()}
    for name, deadline in deadlines.items():
        if not any(abs(deadline - bound) < 1e-9 for bound in LATENCY_BUCKETS_S):
            raise ValueError(f"traffic_classes.{name}.default_deadline_ms: {deadline:g} s is no latency bucket bound")
    objectives = {name: SLO_CLASSES.get(name, DEFAULT_OBJECTIVE) for name in deadlines}
    budgets = {name: round(1 - objective.target, 9) for name, objective in objectives.items()}
    class_alerts = [
        rule for name, deadline in deadlines.items() for rule in _class_alerts(name, deadline, objectives[name])
    ]
    document = {
        "groups": [
            {"name": "inferline.slo", "rules": _recording_rules(deadlines, budgets)},
            {"name": "inferline.slo.alerts", "rules": class_alerts},
            {"name": "inferline.serving", "rules": _operational_alerts()},
        ]
    }
    header = (
        "# Prometheus rules of inferline (load with `rule_files:` in prometheus.yml; see README.md here).\n"
        "# GENERATED by scripts/render_alerts.py from the traffic classes of deploy/local/inferline.yaml:\n"
        "# edit the script, then `python scripts/render_alerts.py`. Another configuration:\n"
        "#   python scripts/render_alerts.py --config my.yaml --out my-alerts.yaml\n"
        "# Evaluated by promtool in tests/unit/test_alert_rules.py (healthy, batch-heavy, overloaded series).\n"
    )
    return header + _dump(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the rendering")
    args = parser.parse_args(argv)
    text = render(args.config)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python scripts/render_alerts.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
