"""The PromQL of deploy/grafana (dashboard panels, template variables, alert rules) and the series it selects.

Shared by the asset tests (the expressions are valid and name exported metrics) and the
start-up tests (every selector matches a series before any traffic).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "inferline-dashboard.json"
ALERTS = GRAFANA / "alerts.yaml"

Sample = tuple[str, dict[str, str]]
"""A series of a scrape: (sample name, labels)."""
Selector = tuple[str, list[tuple[str, str, str]]]
"""(metric name, [(label, op, value)]) with op one of = != =~ !~."""

_GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel that queries data, including those nested in collapsed rows."""
    for panel in items:
        if panel["type"] == "row":
            yield from panels(panel.get("panels", []))
        else:
            yield panel


def rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yaml: recording rules (``record``) and alerts (``alert``)."""
    with ALERTS.open() as f:
        document = yaml.safe_load(f)
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def exprs() -> dict[str, str]:
    """Every PromQL expression (dashboard targets, template variable queries, rules) by where it is."""
    board = dashboard()
    found = {
        f"panel {panel['title']!r} {target['refId']}": target["expr"]
        for panel in panels(board["panels"])
        for target in panel["targets"]
    }
    found.update(
        (f"variable {var['name']}", var["definition"]) for var in board["templating"]["list"] if var["type"] == "query"
    )
    found.update((f"alert {rule['alert']}", rule["expr"]) for rule in alerts())
    found.update((f"record {rule['record']} {i}", rule["expr"]) for i, rule in enumerate(rules()) if "record" in rule)
    return found


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by values PromQL accepts ($__rate_interval → 5m, $x → .*, budget → 0.1)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in ("__rate_interval", "__interval", "__range"):
            return "5m"
        if "budget" in name:
            return "0.1"
        return ".*"

    return _GRAFANA_VARIABLE.sub(value, expr)


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression (Grafana variables substituted first)."""
    found: list[Selector] = []

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            matchers = [(m.name, _OPS[str(m.op).rpartition(".")[2]], m.value) for m in node.matchers.matchers]
            found.append((node.name or "", matchers))
            return
        for attribute in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            for item in child if isinstance(child, list) else [child]:
                if item is not None and not isinstance(item, (str, int, float)):
                    walk(item)

    walk(promql_parser.parse(as_promql(expr)))
    return found


def _matches(selector: Selector, sample: Sample) -> bool:
    name, matchers = selector
    sample_name, labels = sample
    if name != sample_name:
        return False
    for label, op, value in matchers:
        actual = labels.get(label, "")
        ok = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not ok:
            return False
    return True


def unmatched(selected: Iterable[Selector], samples: Iterable[Sample]) -> list[Selector]:
    """The selectors no sample matches."""
    series = list(samples)
    return [selector for selector in selected if not any(_matches(selector, sample) for sample in series)]


def dashboard_and_alert_selectors(keep: Any = lambda name: True) -> dict[str, list[Selector]]:
    """Selectors of inferline's own series per expression (not recorded ``a:b`` series, not ``up``)."""
    out: dict[str, list[Selector]] = {}
    for where, expr in exprs().items():
        if where.startswith("variable "):
            continue  # label_values(...) is Grafana's, not PromQL
        chosen = [s for s in selectors(expr) if s[0].startswith("inferline_") and keep(s[0])]
        if chosen:
            out[where] = chosen
    return out
