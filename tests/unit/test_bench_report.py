"""The bench report: per-step analysis of generator results, JSON and self-contained HTML with plots."""

from __future__ import annotations

import base64
import json
import math
import pathlib
import random
import re
from collections import Counter
from typing import Any

import pytest

from inferline.bench.analysis import analyse_step, send_rate
from inferline.bench.harness import json_safe
from inferline.bench.loadgen import OK, LatencySummary, LoadResult, RequestRecord, poisson_schedule
from inferline.bench.mix import DEFAULT_MIX, TrafficMix
from inferline.bench.multiproc import GenResult
from inferline.bench.recording import make_targets, parse_target
from inferline.bench.report import answer_label, focus_step, load_result, report_paths, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEADLINE_S = 0.1
WARMUP_S = 0.5
DURATION_S = 2.0


def _load_result(records: list[RequestRecord], rate: float) -> LoadResult:
    """A ``LoadResult`` holding ``records`` (the analysis recomputes everything else from them)."""
    empty = LatencySummary.of([])
    errors = Counter(r.outcome for r in records if r.outcome != OK)
    return LoadResult(
        rate=rate, duration_s=DURATION_S, deadline_s=DEADLINE_S, offered_rate=len(records) / DURATION_S,
        achieved_rate=0.0, goodput=0.0, sent=len(records), ok=0, ok_within_deadline=0, missed_deadline=0,
        latency=empty, response_time=empty, errors=dict(errors), start_lag_p50_ms=0.0, start_lag_p99_ms=0.0,
        start_lag_max_ms=0.0, fell_behind=False, generator_cpu=0.1, records=records,
    )  # fmt: skip


def fake_generator(rate: float, seed: int, *, served: bool, slow: bool) -> GenResult:
    """One generator's run: Poisson arrivals, 5 % shed, latencies past the deadline when ``slow``."""
    rng = random.Random(seed)
    offsets = poisson_schedule(rate, WARMUP_S + DURATION_S, seed)
    records = []
    for i, offset in enumerate(offsets):
        if offset < WARMUP_S:
            continue
        outcome = "RESOURCE_EXHAUSTED" if rng.random() < 0.05 else OK
        latency = rng.uniform(0.09, 0.2) if slow and rng.random() < 0.3 else rng.uniform(0.002, 0.03)
        records.append(RequestRecord(i, offset, rng.uniform(0.0, 0.001), latency, outcome))
    served_by = [rng.choice((1, 1, 1, 2, 3)) if served else 0 for _ in offsets]
    return GenResult(
        _load_result(records, rate), DEFAULT_MIX.draw(len(offsets), seed), served_by, {"RESOURCE_EXHAUSTED: shed": 3},
        0.2, WARMUP_S,
    )  # fmt: skip


def synthetic_result() -> dict[str, Any]:
    """Two targets (predict with served_by, direct Triton), two sweep steps each."""
    targets = []
    for name, kind, served in (("predict", "predict", True), ("triton", "triton", False)):
        steps = []
        for k, rate in enumerate((80.0, 120.0)):
            gens = [fake_generator(rate, 10 * k + 1, served=served, slow=k == 1)]
            step, _ = analyse_step(gens, DEFAULT_MIX.classes, deadline_s=DEADLINE_S, has_served_by=served)
            step["passed"], step["reason"] = k == 0, None if k == 0 else "p99 150.0 ms >= 100 ms"
            steps.append(step)
        knee = {
            "knee_rate": 80.0, "knee_goodput": steps[0]["goodput"], "knee_is_lower_bound": False,
            "stopped_reason": "first failing step at 120/s: p99 150.0 ms >= 100 ms", "generator_fell_behind_at": [],
        }  # fmt: skip
        targets.append(
            {"name": name, "kind": kind, "url": "127.0.0.1:1", "has_served_by": served, "steps": steps, "knee": knee}
        )
    settings = {"mode": "sweep", "rates": [80.0, 120.0], "duration_s": DURATION_S, "warmup_s": WARMUP_S,
                "deadline_ms": 100.0, "mix": DEFAULT_MIX.to_dict(), "generators": 1, "seed": 1,
                "knee_criteria": "p99 < 100 ms"}  # fmt: skip
    return {
        "benchmark": "inferline bench",
        "started": "now",
        "settings": settings,
        "max_start_lag_ms": 5.0,
        "targets": targets,
    }


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return synthetic_result()


@pytest.fixture(scope="module")
def written(result: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return write_report(result, tmp_path_factory.mktemp("bench") / "run.1")


def test_analysis_counts_every_measured_request(result: dict[str, Any]) -> None:
    step = result["targets"][0]["steps"][0]
    records = step["records"]
    assert len(records["t_s"]) == step["sent"] > 100
    assert sum(c["requests"] for c in step["classes"].values()) == step["sent"]
    assert set(records["class"]) == set(DEFAULT_MIX.classes)
    assert step["errors"] == {"RESOURCE_EXHAUSTED": records["outcome"].count("RESOURCE_EXHAUSTED")}
    assert min(records["t_s"]) >= 0 and max(records["t_s"]) < DURATION_S


def test_served_by_shares_only_where_answers_carry_it(result: dict[str, Any]) -> None:
    predict, triton = result["targets"]
    shares = predict["steps"][0]["served_by"]
    assert set(shares) == {"PRIMARY", "LIGHT", "CACHE"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert triton["steps"][0]["served_by"] is None
    assert set(triton["steps"][0]["records"]["served_by"]) == {None}


def test_send_rate_equals_offered_when_the_generator_keeps_up() -> None:
    gen = fake_generator(100.0, 3, served=False, slow=False)
    assert send_rate([gen]) == pytest.approx(len(gen.result.records) / DURATION_S)


def test_send_rate_drops_when_the_generator_lags() -> None:
    gen = fake_generator(100.0, 3, served=False, slow=False)
    late = [RequestRecord(r.index, r.scheduled_s, 0.5, r.latency_s, r.outcome) for r in gen.result.records]
    lagging = GenResult(_load_result(late, 100.0), gen.classes, gen.served_by, {}, 0.0, WARMUP_S)
    assert send_rate([lagging]) < 0.9 * send_rate([gen])


def test_report_files_are_written_next_to_each_other(written: tuple[pathlib.Path, pathlib.Path]) -> None:
    json_path, html_path = written
    assert (json_path.name, html_path.name) == ("run.1.json", "run.1.html")
    assert json_path.stat().st_size > 0 and html_path.stat().st_size > 0
    assert report_paths(json_path.parent / "run.1") == written


def test_json_round_trips(result: dict[str, Any], written: tuple[pathlib.Path, pathlib.Path]) -> None:
    loaded = load_result(written[0])
    assert loaded == json.loads(json.dumps(json_safe(result), allow_nan=False))
    assert loaded["targets"][0]["steps"][1]["goodput"] == result["targets"][0]["steps"][1]["goodput"]


def test_html_embeds_three_png_plots(written: tuple[pathlib.Path, pathlib.Path]) -> None:
    page = written[1].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert page.count("data:image/png;base64,") == 3
    assert len(images) == 3
    for data in images:
        assert base64.b64decode(data).startswith(PNG_MAGIC)
    assert "<script" not in page and "http" not in page.split("<body>", 1)[1]  # self-contained


def test_html_shows_the_summary_numbers(result: dict[str, Any], written: tuple[pathlib.Path, pathlib.Path]) -> None:
    page = written[1].read_text()
    for target in result["targets"]:
        for step in target["steps"]:
            assert f"{step['goodput']:.1f}" in page
            assert f"{step['offered_rate']:.1f}" in page
            assert f"{step['response_time']['p99_ms']:.2f}" in page
    assert "knee 80/s" in page
    assert "RESOURCE_EXHAUSTED" in page


def test_focus_step_is_the_knee_step(result: dict[str, Any]) -> None:
    target = result["targets"][0]
    assert focus_step(target) is target["steps"][0]
    assert focus_step({**target, "knee": None}) is target["steps"][-1]
    assert focus_step({**target, "steps": []}) is None


def test_answer_labels() -> None:
    assert answer_label("OK", "LIGHT") == "LIGHT"
    assert answer_label("OK", None) == "OK"
    assert answer_label("UNAVAILABLE", None) == "UNAVAILABLE"


def test_mix_parses_and_draws_by_share() -> None:
    mix = TrafficMix.parse("critical=0.3, standard=0.7")
    assert mix.classes == ("critical", "standard")
    drawn = mix.draw(10_000, seed=5)
    assert drawn == mix.draw(10_000, seed=5)
    assert drawn.count(0) / len(drawn) == pytest.approx(0.3, abs=0.03)
    for bad in ("critical", "critical=x", "a=1,a=2", "a=0"):
        with pytest.raises(ValueError):
            TrafficMix.parse(bad)


def test_targets_parse_and_get_unique_names() -> None:
    assert parse_target("triton=127.0.0.1:8001") == ("triton", "127.0.0.1:8001")
    with pytest.raises(ValueError):
        parse_target("redis=127.0.0.1:6379")
    with pytest.raises(ValueError):
        parse_target("predict")
    specs = make_targets(["predict=a:1", "kserve=a:1", "predict=b:2"])
    assert [t.name for t in specs] == ["predict", "kserve", "predict-3"]
    assert [t.call_timeout_s(0.1) for t in specs] == [0.1, 0.1, 0.1]
    (direct,) = make_targets(["triton=c:3"])
    assert math.isclose(direct.call_timeout_s(0.1), 5.1)  # never cancels a call in flight at Triton
