"""deploy/grafana/alerts.yaml evaluated by Prometheus' own promtool against healthy, batch-heavy and overloaded series.

Each scenario is a few hours of counters as the router exports them (requests by outcome,
the ``total`` latency histogram, quota refusals), written as a ``promtool test rules`` file
with every alert of the rules file expected at the scenario's check time: the ones named
fire with exactly those labels, all the others stay silent. Annotations are left out of the
evaluated copy (their templates are checked by ``promtool check rules``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from inferline.core.metrics import LATENCY_BUCKETS_S

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "grafana" / "alerts.yaml"
ROUTE = "driver_ranking"
DEADLINES_S = {"critical": 0.1, "standard": 0.25, "batch": 2.0}
MINUTES = 7 * 60
"""Series length: past the 6 h window of the slower page."""
CHECK_AT = "6h50m"


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        message = "requires_promtool: promtool is missing (make promtool installs Debian's prometheus package)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@dataclass
class Traffic:
    """One class's requests per minute on ROUTE, by outcome; in-time answers take ``latency_s``."""

    traffic_class: str
    per_minute: int
    latency_s: float
    late: int = 0
    """OK answers later than the class's deadline (observed at twice the deadline)."""
    shed: int = 0
    quota: int = 0
    unavailable: int = 0
    invalid: int = 0
    """INVALID_ARGUMENT: the caller's mistake, outside every budget."""


@dataclass
class Scenario:
    traffic: list[Traffic]
    fires: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    """Alert name → the label sets (besides alertname) expected at CHECK_AT; any other alert: none."""
    quota_tenants: dict[str, int] = field(default_factory=dict)
    """Tenant → quota refusals per minute."""


def _counter(name: str, labels: dict[str, str], per_minute: float) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": f"0+{per_minute:g}x{MINUTES}"}


def _series(scenario: Scenario) -> list[dict[str, str]]:
    series = []
    for t in scenario.traffic:
        base = {"route": ROUTE, "traffic_class": t.traffic_class}
        outcomes = [
            ("PRIMARY", "", "OK", t.per_minute - t.shed - t.quota - t.unavailable - t.invalid),
            ("", "SHED", "RESOURCE_EXHAUSTED", t.shed),
            ("", "QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED", t.quota),
            ("", "", "UNAVAILABLE", t.unavailable),
            ("", "", "INVALID_ARGUMENT", t.invalid),
        ]
        for served_by, reason, code, n in outcomes:
            labels = {**base, "served_by": served_by, "reason": reason, "code": code}
            series.append(_counter("inferline_requests_total", labels, n))
        answered = outcomes[0][3]
        late_at = DEADLINES_S[t.traffic_class] * 2
        latency = {**base, "layer": "total"}
        for bound in [*map(str, LATENCY_BUCKETS_S), "+Inf"]:
            upto = float(bound)
            n = (answered - t.late if t.latency_s <= upto else 0) + (t.late if late_at <= upto else 0)
            series.append(_counter("inferline_layer_latency_seconds_bucket", {**latency, "le": bound}, n))
        series.append(_counter("inferline_layer_latency_seconds_count", latency, answered))
    for tenant, n in scenario.quota_tenants.items():
        series.append(_counter("inferline_quota_exceeded_total", {"tenant": tenant}, n))
    return series


def _rules_without_annotations(path: pathlib.Path) -> pathlib.Path:
    document = yaml.safe_load(ALERTS.read_text())
    names = []
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            if "alert" in rule:
                names.append(rule["alert"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _alert_names() -> list[str]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def _labels(name: str) -> dict[str, str]:
    """The labels alertname ``name`` carries from its rule (severity, service, ...)."""
    document = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in document["groups"] for r in g["rules"] if r.get("alert") == name]
    labels: dict[str, str] = rule["labels"]
    return labels


def _run(scenario: Scenario, tmp_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    promtool = _promtool()
    rules = _rules_without_annotations(tmp_path / "rules.yaml")
    unknown = set(scenario.fires) - set(_alert_names())
    assert not unknown, f"scenario expects alerts the rules do not have: {unknown}"
    tests: dict[str, Any] = {
        "rule_files": [rules.name],
        "evaluation_interval": "2m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _series(scenario),
                "alert_rule_test": [
                    {
                        "eval_time": CHECK_AT,
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {**_labels(name), **labels}} for labels in scenario.fires.get(name, [])
                        ],
                    }
                    for name in _alert_names()
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )


def _page(traffic_class: str) -> dict[str, list[dict[str, str]]]:
    name = f"Inferline{traffic_class.title()}ErrorBudgetBurn"
    return {name: [{"route": ROUTE, "traffic_class": traffic_class}]}


HEALTHY = [
    Traffic("critical", 600, latency_s=0.02),
    Traffic("standard", 1200, latency_s=0.04, unavailable=1, invalid=30),  # 0.08 % failed: within 0.5 %
    Traffic("batch", 300, latency_s=0.3),
]


def test_the_rules_file_passes_promtool_check() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_file_is_rendered_from_the_default_configuration() -> None:
    script = ROOT / "scripts" / "render_alerts.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_healthy_traffic_pages_nobody(tmp_path: pathlib.Path) -> None:
    result = _run(Scenario(HEALTHY), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_batch_heavy_traffic_within_its_own_deadline_pages_nobody(tmp_path: pathlib.Path) -> None:
    """Slow batch answers (1.5 s, far over critical's 0.1 s, under batch's 2 s) and a little batch shedding."""
    traffic = [
        Traffic("critical", 600, latency_s=0.03),
        Traffic("standard", 600, latency_s=0.1),
        Traffic("batch", 20_000, latency_s=1.5, shed=100),  # 0.5 % shed: half of batch's 1 % budget
    ]
    result = _run(Scenario(traffic), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_late_critical_answers_page(tmp_path: pathlib.Path) -> None:
    """3 % of critical answers past 0.1 s burns a 0.1 % budget 30 times too fast."""
    traffic = [Traffic("critical", 600, latency_s=0.02, late=18), *HEALTHY[1:]]
    fires = {
        **_page("critical"),
        "InferlineCriticalErrorBudgetBurnSlow": [{"route": ROUTE, "traffic_class": "critical"}],
    }
    result = _run(Scenario(traffic, fires=fires), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_overload_pages_for_critical_and_warns_for_shed_batch(tmp_path: pathlib.Path) -> None:
    """Overloaded: critical is degraded late, standard and batch are shed; batch's burn is a ticket (warning)."""
    traffic = [
        Traffic("critical", 600, latency_s=0.05, late=30),
        Traffic("standard", 1200, latency_s=0.2, shed=240),
        Traffic("batch", 3000, latency_s=1.0, shed=2400),
    ]
    fires = {
        **_page("critical"),
        **_page("standard"),
        **_page("batch"),
        "InferlineCriticalErrorBudgetBurnSlow": [{"route": ROUTE, "traffic_class": "critical"}],
        "InferlineStandardErrorBudgetBurnSlow": [{"route": ROUTE, "traffic_class": "standard"}],
        "InferlineBatchErrorBudgetBurnSlow": [{"route": ROUTE, "traffic_class": "batch"}],
        "InferlineShedding": [{"route": ROUTE}],
    }
    result = _run(Scenario(traffic, fires=fires), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _labels("InferlineCriticalErrorBudgetBurn")["severity"] == "critical"
    assert _labels("InferlineBatchErrorBudgetBurn")["severity"] == "warning"


def test_a_tenant_over_its_quota_is_a_tenant_signal_not_a_page(tmp_path: pathlib.Path) -> None:
    """Half of standard's requests refused for quota: only the low-severity tenant alert fires."""
    traffic = [HEALTHY[0], Traffic("standard", 1200, latency_s=0.04, quota=600), HEALTHY[2]]
    fires = {"InferlineTenantOverQuota": [{"tenant": "acme"}]}
    result = _run(Scenario(traffic, fires=fires, quota_tenants={"acme": 600}), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _labels("InferlineTenantOverQuota")["severity"] == "info"
