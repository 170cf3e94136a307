"""scripts/dashboard_picture.py: the queries it sends Prometheus, its legends and the bench phases it reads."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import ModuleType

import promql_parser
import pytest

from tests.dashboard_queries import ROOT, dashboard, panels


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_picture", ROOT / "scripts" / "dashboard_picture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


picture = _script()


@pytest.mark.parametrize(
    "expr", [t["expr"] for p in panels(dashboard()["panels"]) for t in p["targets"]], ids=lambda e: e[:60]
)
def test_every_panel_query_is_sent_as_valid_promql(expr: str) -> None:
    query = picture._promql(expr)
    assert "$" not in query
    promql_parser.parse(query)


def test_legends_fill_in_the_series_labels() -> None:
    labels = {"route": "driver_ranking", "traffic_class": "critical"}
    assert picture._legend("{{route}} {{traffic_class}} 1h", labels) == "driver_ranking critical 1h"
    assert picture._legend("{{ model }}", {}) == "value"


def test_bench_reports_give_the_phases_in_order(tmp_path: pathlib.Path) -> None:
    for name, started in (("overload", "2026-12-02T10:40:00+0000"), ("healthy", "2026-12-02T10:38:00+0000")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"started": started, "duration_s": 45.5}))
    (healthy, t0, t1), (overload, u0, _) = picture._phases_of(tmp_path)
    assert (healthy, overload) == ("healthy", "overload")
    assert t1 - t0 == 45.5 and u0 - t0 == 120
