"""The Grafana dashboard and the alert rules in deploy/grafana load, and query only metrics inferline exports."""

from __future__ import annotations

import re

import promql_parser
import pytest
from prometheus_client import CollectorRegistry

from inferline.core.config import load_config
from inferline.core.metrics import LATENCY_BUCKETS_S, ServingMetrics
from tests.dashboard_queries import ROOT, alerts, as_promql, dashboard, exprs, panels

CONFIG = ROOT / "deploy" / "local" / "inferline.yaml"
STATISTICS = ROOT / "services" / "inferline" / "triton" / "statistics.py"

# Sample names of the collectors that inferline.triton.statistics adds (Triton statistics, cost, devices);
# inferline_model_calls_total is ServingMetrics' own.
# Used only while that module does not exist; once it does, its own metric names are read from its source.
EXPECTED_TRITON_METRICS = frozenset(
    {
        "inferline_triton_inferences_total",
        "inferline_triton_executions_total",
        "inferline_triton_batch_efficiency",
        "inferline_triton_queue_seconds_total",
        "inferline_triton_compute_seconds_total",
        "inferline_triton_busy_seconds_total",
        "inferline_cost_total",
        "inferline_cost_per_1k_requests",
        "inferline_device_utilization",
    }
)

_METRIC = re.compile(r"\binferline_[a-z0-9_]+")
_VARIABLE = re.compile(r"\$\{?(\w+)")
_DURATION = re.compile(r"^[0-9]+[smhdwy]$")
# The series a family of each type exposes, as suffixes of the family name.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
_ANY_SUFFIX = ("", "_total", "_bucket", "_count", "_sum")
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _serving_sample_names() -> set[str]:
    """Series names of ServingMetrics, by family type: a gauge has no ``_bucket``, a counter only ``_total``."""
    registry = CollectorRegistry()
    ServingMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _triton_sample_names() -> set[str]:
    """Names the statistics collectors export, read from the module's source (its types are not known here)."""
    if not STATISTICS.exists():
        return set(EXPECTED_TRITON_METRICS)
    declared = set(_METRIC.findall(STATISTICS.read_text()))
    return {name + suffix for name in declared for suffix in _ANY_SUFFIX}


def _unclosed(expr: str) -> list[str]:
    """Brackets left open or closed without an opener, outside string literals; empty when balanced."""
    stack: list[str] = []
    quote = ""
    escaped = False
    for char in expr:
        if escaped:
            escaped = False
        elif quote:
            escaped, quote = char == "\\", "" if char == quote else quote
        elif char in "\"'`":
            quote = char
        elif char in _CLOSING:
            stack.append(_CLOSING[char])
        elif char in _CLOSING.values() and (not stack or stack.pop() != char):
            return [char]
    return stack + ([quote] if quote else [])


def _call_arguments(expr: str, function: str) -> list[str]:
    """The text between the parentheses of each call of ``function`` in ``expr``."""
    arguments = []
    for match in re.finditer(rf"\b{function}\s*\(", expr):
        depth, start = 1, match.end()
        for end in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            if depth == 0:
                arguments.append(expr[start:end])
                break
    return arguments


def test_dashboard_has_the_datasource_and_filter_variables() -> None:
    variables = {var["name"]: var for var in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "traffic_class"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_queries_the_templated_datasource() -> None:
    found = list(panels(dashboard()["panels"]))
    assert found
    for panel in found:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    found = list(panels(dashboard()["panels"]))
    assert len({panel["id"] for panel in found}) == len(found)
    cells: dict[tuple[int, int], str] = {}
    for panel in found:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_uses_only_defined_variables() -> None:
    defined = {var["name"] for var in dashboard()["templating"]["list"]}
    for where, expr in exprs().items():
        for name in _VARIABLE.findall(expr):
            assert name.startswith("__") or name in defined, f"${name} undefined in {where}"


def test_alert_rules_are_complete() -> None:
    rules = alerts()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_every_traffic_class_has_burn_alerts_against_its_own_deadline() -> None:
    """Each class pages (or tickets) on its own budget; its summary states its deadline, a latency bucket bound."""
    by_name = {rule["alert"]: rule for rule in alerts()}
    for name, cls in load_config(CONFIG).traffic_classes.items():
        deadline_s = cls.default_deadline_ms / 1000
        assert deadline_s in LATENCY_BUCKETS_S, name
        for suffix in ("ErrorBudgetBurn", "ErrorBudgetBurnSlow"):
            rule = by_name[f"Inferline{name.title()}{suffix}"]
            assert rule["labels"]["traffic_class"] == name
            assert f'traffic_class="{name}"' in rule["expr"]
            assert f"deadline {deadline_s:g} s" in rule["annotations"]["summary"]


def test_quota_refusals_never_page() -> None:
    """An over-quota tenant is the tenant's signal: only an info alert reads the quota counter."""
    for rule in alerts():
        if "inferline_quota_exceeded_total" in rule["expr"] or "QUOTA_EXCEEDED" in rule["expr"]:
            assert rule["labels"]["severity"] == "info" or 'reason!="QUOTA_EXCEEDED"' in rule["expr"], rule["alert"]


def test_every_referenced_metric_is_exported() -> None:
    exported = _serving_sample_names() | _triton_sample_names()
    referenced = {name for expr in exprs().values() for name in _METRIC.findall(expr)}
    assert referenced
    assert not referenced - exported, f"not exported by inferline: {sorted(referenced - exported)}"


@pytest.mark.parametrize("expr", list(exprs().values()), ids=list(exprs()))
def test_promql_brackets_are_balanced(expr: str) -> None:
    assert not _unclosed(expr), expr


_QUANTILE_EXPRS = {where: expr for where, expr in exprs().items() if "histogram_quantile" in expr}


@pytest.mark.parametrize("expr", list(_QUANTILE_EXPRS.values()), ids=list(_QUANTILE_EXPRS))
def test_histogram_quantile_aggregates_bucket_rates_by_le(expr: str) -> None:
    arguments = _call_arguments(expr, "histogram_quantile")
    assert arguments, expr
    for argument in arguments:
        assert re.search(r"\binferline_[a-z0-9_]+_bucket\b", argument), expr
        assert re.search(r"\b(rate|increase)\s*\(", argument), expr
        assert re.search(r"\bby\s*\(\s*le\b", argument), expr


@pytest.mark.parametrize("where", [w for w in exprs() if not w.startswith("variable ")])
def test_every_expression_is_valid_promql(where: str) -> None:
    """Parsed by promql-parser (the Rust port of Prometheus' own parser), Grafana variables substituted.

    Template variables' ``label_values(...)`` queries are Grafana's, not PromQL: left out."""
    try:
        promql_parser.parse(as_promql(exprs()[where]))
    except ValueError as err:
        pytest.fail(f"{where}: {err}")
