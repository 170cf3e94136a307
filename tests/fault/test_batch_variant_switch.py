"""A batch job held back past its deadline scores the rest on a faster variant, on a real Triton.

The route's cheap primary is the fault Triton's narrow model (one instance, one row per
batch, 20 ms of sleep each, measured here at 10-50 rows/s) and its dear alternate the full
model (128 rows a request, ~10,000 times that). The first choice keeps the cheap one: its
measured rate scores the few rows well within 80 % of the deadline. Then the job is held back
by the routers' queue wait (a real Prometheus endpoint whose value the test sets) until the
deadline has passed; once let go, the job must see it is behind and, no variant keeping a
deadline already gone, score the rest on the fastest. Each part names the variant of its rows,
and every input row is in the output once.
"""

from __future__ import annotations

import asyncio
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry

from inferline.batch import run_batch
from inferline.core.config import load_config
from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import BASE_ROUTE, NARROW_MODEL, Routers
from tests.integration.batch_fixtures import paused_by_the_routers, routers_queue_wait
from tests.integration.test_batch_run import read_output, spec
from tests.waiting import eventually

ROWS = 40
CHUNK_ROWS = 10
DEADLINE_S = 8.0
"""The narrow model keeps it if it scores 40 rows in 6.4 s: 6.25 rows/s or more."""
HELD_S = DEADLINE_S + 0.5
"""How long the job is held back: past its deadline, so it is behind whatever its rate."""
FEATURES = ["conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km"]


async def test_a_job_behind_its_deadline_scores_the_rest_on_a_faster_variant(
    routers: Routers, fault_triton: TritonLauncher, tmp_path: pathlib.Path
) -> None:
    fault_triton.start()  # no-op while it runs (another fault test may have stopped it)
    route = {
        "primary": {"model": NARROW_MODEL, "features": FEATURES, "device": "cpu"},
        "alternates": [{"model": "driver_ranker", "features": FEATURES, "device": "gpu"}],
    }
    config = load_config(routers.write_config("batch-switch", routes={BASE_ROUTE: route}))
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1001 + ROWS), pa.int64())}), tmp_path / "in.parquet")
    options = {"deadline_s": DEADLINE_S, "chunk_rows": CHUNK_ROWS, "concurrency": 4, "yield_interval_s": 0.02}
    job_registry = CollectorRegistry()
    with routers_queue_wait(1.0) as (queue_wait, url):  # the routers are drowning: the job must wait
        job_spec = spec(tmp_path / "in.parquet", tmp_path / "out", **options, router_metrics=[url])
        job = asyncio.create_task(run_batch(config, job_spec, fault_triton.grpc_url, registry=job_registry))
        await eventually(
            lambda: job.done() or paused_by_the_routers(job_registry, BASE_ROUTE, 1.0), "the job held back"
        )
        assert not job.done()
        # The deadline is time: the job is held until it has passed, then let go.
        await asyncio.sleep(HELD_S)
        queue_wait.set(0.0)
        summary = await job

    assert (summary["status"], summary["rows"], summary["errors"]) == ("complete", ROWS, 0)
    choice = summary["variant_choice"]
    assert (choice["variant"], choice["deadline_met"]) == (NARROW_MODEL, True), choice  # the first: cheap, in time
    assert choice["looks"] >= 1
    [switch] = choice["switches"]
    assert (switch["from"], switch["to"], switch["deadline_met"]) == (NARROW_MODEL, "driver_ranker", False)
    assert 0 < switch["after_rows"] < ROWS and switch["after_s"] > HELD_S
    assert "behind the deadline" in switch["reason"] and "no variant keeps it" in switch["reason"]
    assert choice["deadline_kept"] is False
    out = read_output(tmp_path / "out")
    assert out["input_row"].tolist() == list(range(ROWS))  # every row once, across both variants
    by_variant = out["model"].value_counts().to_dict()
    assert set(by_variant) == {NARROW_MODEL, "driver_ranker"}, by_variant
    # After the switch only the other worker's chunk in flight finishes on the narrow model.
    assert by_variant["driver_ranker"] >= ROWS - switch["after_rows"] - CHUNK_ROWS
    assert summary["model"] == "driver_ranker"
    assert summary["this_run"]["cost_per_1k_rows"] > 0
