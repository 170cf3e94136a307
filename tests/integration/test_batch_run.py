"""``inferline batch run`` against the real bundled Triton and the materialised Feast demo repo.

Every score is checked against an oracle that shares no code with the job: the features
read straight from the Feast source file (the latest row per driver, or for point-in-time
jobs the latest row at or before each row's time within the view's TTL, by
``pandas.merge_asof``), scored by a direct tritonclient call.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from inferline.batch import BatchInputError, BatchJobFailed, BatchJobSpec, run_batch
from inferline.core.config import InferlineConfig, load_config
from inferline.triton.launcher import TritonLauncher
from tests.integration.batch_fixtures import paused_by_the_routers, routers_queue_wait
from tests.integration.router_fixtures import write_test_config
from tests.waiting import eventually

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUTE = "driver_ranking"
STORED = ["conv_rate", "acc_rate", "avg_daily_trips"]
FEATURES = [*STORED, "trip_distance_km"]
DEFAULTS = {"conv_rate": 0.5, "acc_rate": 0.7, "avg_daily_trips": 480.0, "trip_distance_km": 6.0}
TTL = pd.Timedelta(days=7)


def feast_source(config: InferlineConfig) -> pd.DataFrame:
    """The demo feature view's source rows; skips (fails in CI) when make setup has not run."""
    data = config.feature_store.feast_repo / "data"
    if not (data / "online_store.db").is_file():
        message = f"requires_feast: run make setup (no materialized Feast data under {data})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    frame = pd.read_parquet(data / "driver_stats.parquet")
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True).dt.as_unit("ns")
    return frame


def batch_config(tmp: pathlib.Path, **environ: str) -> InferlineConfig:
    """The default config (absolute paths), with ``INFERLINE_*`` overrides."""
    return load_config(write_test_config(tmp / "inferline.yaml"), environ=environ)


def expected_features(source: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (driver_id, trip_distance_km, optional event_timestamp) with every feature filled as Feast would."""
    rows = rows.reset_index(drop=True).assign(_order=lambda f: np.arange(len(f)))
    if "event_timestamp" in rows:
        stats = source.sort_values("event_timestamp").rename(columns={"event_timestamp": "feature_ts"})
        left = rows.sort_values("event_timestamp")
        joined = pd.merge_asof(
            left, stats, left_on="event_timestamp", right_on="feature_ts", by="driver_id", direction="backward"
        )
        stale = joined["event_timestamp"] - joined["feature_ts"] > TTL
        joined.loc[stale, STORED] = np.nan
    else:
        latest = source.sort_values("event_timestamp").groupby("driver_id").tail(1)
        joined = rows.merge(latest[["driver_id", *STORED]], on="driver_id", how="left")
    joined = joined.sort_values("_order").reset_index(drop=True)
    if "trip_distance_km" not in joined:
        joined["trip_distance_km"] = np.nan
    return joined.fillna(DEFAULTS)


def direct_scores(url: str, features: pd.DataFrame, model: str = "driver_ranker") -> np.ndarray:
    """The model's scores of ``features`` [FEATURES] by plain tritonclient calls of 128 rows."""
    matrix = features[FEATURES].to_numpy(dtype=np.float32)
    out = []
    with grpcclient.InferenceServerClient(url) as client:
        for start in range(0, len(matrix), 128):
            part = matrix[start : start + 128]
            tensor = grpcclient.InferInput("features", list(part.shape), "FP32")
            tensor.set_data_from_numpy(part)
            out.append(client.infer(model, [tensor], client_timeout=60).as_numpy("score").reshape(-1))
    return np.concatenate(out)


def read_output(path: pathlib.Path) -> pd.DataFrame:
    return ds.dataset(path).to_table().to_pandas().sort_values("input_row").reset_index(drop=True)


def spec(input_path: pathlib.Path, output: pathlib.Path, **options: object) -> BatchJobSpec:
    return BatchJobSpec.build(route=ROUTE, input_path=input_path, output_dir=output, **{"chunk_rows": 300, **options})


@pytest.mark.parametrize(
    ("processes", "view_scan"),
    [(0, "never"), (2, "never"), (0, "always"), (2, "always")],
    ids=["in-process", "2-read-processes", "in-process-view-scan", "2-read-processes-view-scan"],
)
async def test_online_features_scores_match_the_oracle(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, processes: int, view_scan: str
) -> None:
    """Scores as the model gives them for Feast's values, whether the job reads its entities
    a thousand at a time or reads the store whole first (``--view-scan``)."""
    config = batch_config(tmp_path)
    source = feast_source(config)
    n = 1000
    rows = pd.DataFrame(
        {
            "driver_id": (1001 + (np.arange(n) * 37) % 1000).astype(np.int64),
            "trip_distance_km": np.linspace(0.5, 25.0, n),
        }
    )
    rows.loc[[3, 700], "driver_id"] = [5, 99999]  # drivers the store has never seen: defaults
    rows.loc[10, "trip_distance_km"] = np.nan  # a missing request-time feature: its default
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "in.parquet", row_group_size=128)

    job = spec(tmp_path / "in.parquet", tmp_path / "out", feature_processes=processes, view_scan=view_scan)
    summary = await run_batch(config, job, triton_server.grpc_url)

    assert (summary["status"], summary["rows"], summary["errors"], summary["chunks"]) == ("complete", n, 0, 4)
    if view_scan == "always":  # every driver from the scan; driver 5, which it did not find, is not read
        assert summary["this_run"]["features"] == {"entities_read": 0, "view_scans": 1, "entities_scanned": 100_000}
    else:  # 1,000 rows of 100,000 drivers: the default would not scan either
        assert summary["this_run"]["features"] == {"entities_read": 1000, "view_scans": 0, "entities_scanned": 0}
    out = read_output(tmp_path / "out")
    assert out["input_row"].tolist() == list(range(n))
    assert out["driver_id"].tolist() == rows["driver_id"].tolist()
    want = direct_scores(triton_server.grpc_url, expected_features(source, rows))
    np.testing.assert_allclose(out["score"].to_numpy(), want, atol=1e-5)
    assert out.loc[3, "defaulted_features"] == "conv_rate,acc_rate,avg_daily_trips"
    assert out.loc[10, "defaulted_features"] == "trip_distance_km"
    assert set(out["decision"]) <= {"accept", "reject"}
    assert (out["decision"] == "accept").tolist() == (out["score"] >= 0.5).tolist()
    assert (tmp_path / "out/_errors.csv").read_text() == "row,column,reason\n"


async def test_event_times_give_point_in_time_features(tmp_path: pathlib.Path, triton_server: TritonLauncher) -> None:
    config = batch_config(tmp_path)
    source = feast_source(config)
    first, last = source["event_timestamp"].min(), source["event_timestamp"].max()
    n = 600
    rng = np.random.default_rng(3)
    offsets = pd.to_timedelta(rng.uniform(0, (last - first).total_seconds() + 3600, n), unit="s")
    rows = pd.DataFrame(
        {
            "driver_id": rng.integers(1001, 2001, n).astype(np.int64),
            "event_timestamp": (first + offsets).as_unit("ns"),
            "trip_distance_km": rng.uniform(1, 20, n),
        }
    )
    rows.loc[0, "event_timestamp"] = first - pd.Timedelta(hours=1)  # before any value: defaults
    rows.loc[1, "event_timestamp"] = first + pd.Timedelta(hours=2)  # two rows of one driver at the same time
    rows.loc[2] = rows.loc[1]
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "in.parquet")

    summary = await run_batch(config, spec(tmp_path / "in.parquet", tmp_path / "out"), triton_server.grpc_url)

    assert (summary["rows"], summary["errors"]) == (n, 0)
    out = read_output(tmp_path / "out")
    expected = expected_features(source, rows)
    assert out["event_timestamp"].tolist() == rows["event_timestamp"].tolist()
    np.testing.assert_allclose(out["score"].to_numpy(), direct_scores(triton_server.grpc_url, expected), atol=1e-5)
    assert out.loc[0, "defaulted_features"] == "conv_rate,acc_rate,avg_daily_trips"
    assert out.loc[1, "score"] == out.loc[2, "score"]
    latest = expected_features(source, rows.drop(columns="event_timestamp"))
    assert not np.allclose(expected[STORED].to_numpy(), latest[STORED].to_numpy())  # the times mattered


async def test_bad_csv_rows_go_to_the_errors_file(tmp_path: pathlib.Path, triton_server: TritonLauncher) -> None:
    config = batch_config(tmp_path)
    lines = ["driver_id,trip_distance_km,comment"]
    lines += [f"{1001 + i},{1 + i % 9},ok" for i in range(700)]
    lines[1 + 5] = "driver-7,3,bad key"
    lines[1 + 6] = ",3,no key"
    lines[1 + 650] = "1650,three,bad number"
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")

    registry = CollectorRegistry()
    summary = await run_batch(
        config, spec(tmp_path / "in.csv", tmp_path / "out"), triton_server.grpc_url, registry=registry
    )

    assert (summary["input_rows"], summary["rows"], summary["errors"]) == (700, 697, 3)
    rows = {
        o: registry.get_sample_value("inferline_batch_rows_total", {"route": ROUTE, "outcome": o})
        for o in ("scored", "error")
    }
    assert rows == {"scored": 697, "error": 3}
    assert registry.get_sample_value("inferline_batch_chunks_total", {"route": ROUTE}) == 3
    assert (tmp_path / "out/_errors.csv").read_text().splitlines() == [
        "row,column,reason",
        "5,driver_id,unparseable entity key (needs an int64)",
        "6,driver_id,null entity key",
        "650,trip_distance_km,unparseable number",
    ]
    out = read_output(tmp_path / "out")
    assert sorted({*out["input_row"], 5, 6, 650}) == list(range(700))


async def test_a_second_run_is_refused_and_a_finished_job_resumes_to_nothing(
    tmp_path: pathlib.Path, triton_server: TritonLauncher
) -> None:
    config = batch_config(tmp_path)
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1401), pa.int64())}), tmp_path / "in.parquet")
    first = await run_batch(config, spec(tmp_path / "in.parquet", tmp_path / "out"), triton_server.grpc_url)
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*"))

    with pytest.raises(BatchInputError, match=r"already holds this job.*--resume"):
        await run_batch(config, spec(tmp_path / "in.parquet", tmp_path / "out"), triton_server.grpc_url)
    again = await run_batch(
        config, spec(tmp_path / "in.parquet", tmp_path / "out", resume=True), triton_server.grpc_url
    )

    assert (again["rows"], again["this_run"]["rows"], first["rows"]) == (400, 0, 400)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == parts


def test_cli_refuses_bad_input_before_any_work(tmp_path: pathlib.Path) -> None:
    config = write_test_config(tmp_path / "inferline.yaml")
    pq.write_table(pa.table({"driver_id": pa.array([1.5, 2.5])}), tmp_path / "floats.parquet")
    command = [sys.executable, "-m", "inferline.cli", "batch", "run", "--config", str(config), "--route", ROUTE]
    command += ["--input", str(tmp_path / "floats.parquet"), "--output", str(tmp_path / "out")]
    command += ["--triton-url", "127.0.0.1:1"]  # never reached
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "entity column 'driver_id' is double, needs an integer type" in done.stderr
    assert not (tmp_path / "out").exists()


async def test_the_job_gives_way_when_the_online_queue_wait_rises(
    tmp_path: pathlib.Path, triton_server: TritonLauncher
) -> None:
    """Without a copy for the batch class the job's own requests share the online model's queue:
    with a target of 1 ns any queueing reads as online pressure, so the controller must hold the
    job back (down to pauses) on Triton's real statistics, and the job must still finish."""
    config = batch_config(tmp_path)
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1201), pa.int64())}), tmp_path / "in.parquet")
    # 8-row requests at most 1,000 rows/s: the job spans many 20 ms intervals, each with requests.
    options = {"yield_queue_ms": 1e-6, "yield_interval_s": 0.02, "request_rows": 8, "concurrency": 4}
    options["max_rows_per_s"] = 1000

    summary = await run_batch(
        config, spec(tmp_path / "in.parquet", tmp_path / "out", **options), triton_server.grpc_url
    )

    assert (summary["rows"], summary["errors"]) == (200, 0)
    assert summary["yield"]["intervals"] > 0
    assert summary["yield"]["throttled_share"] > 0


async def test_a_job_outside_the_routers_yields_to_their_queue_wait(
    tmp_path: pathlib.Path, triton_server: TritonLauncher
) -> None:
    """``--router-metrics``: the job reads the routers' queue-wait gauge off their Prometheus
    endpoint (a real one here, whose value the test sets), pauses while it is over the target,
    and finishes once it falls."""
    config = batch_config(tmp_path)
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1401), pa.int64())}), tmp_path / "in.parquet")
    options = {"yield_interval_s": 0.02, "request_rows": 8, "concurrency": 4, "max_rows_per_s": 1000}
    job_registry = CollectorRegistry()
    with routers_queue_wait(1.0) as (queue_wait, url):  # far over any target: the router is drowning
        job_spec = spec(tmp_path / "in.parquet", tmp_path / "out", **options, router_metrics=[url])
        job = asyncio.create_task(run_batch(config, job_spec, triton_server.grpc_url, registry=job_registry))
        await eventually(
            lambda: job.done() or paused_by_the_routers(job_registry, ROUTE, 1.0), "the job paused on the routers' wait"
        )
        assert not job.done()
        queue_wait.set(0.0)
        summary = await job

    assert (summary["rows"], summary["errors"]) == (400, 0)
    assert summary["yield"]["throttled_share"] > 0


async def test_a_chunk_of_bad_rows_only_commits_an_empty_part(
    tmp_path: pathlib.Path, triton_server: TritonLauncher
) -> None:
    config = batch_config(tmp_path)
    keys = [str(1001 + i) if not 5 <= i < 10 else "" for i in range(15)]
    (tmp_path / "in.csv").write_text("driver_id,trip_distance_km\n" + "".join(f"{k},2.5\n" for k in keys))

    summary = await run_batch(config, spec(tmp_path / "in.csv", tmp_path / "out", chunk_rows=5), triton_server.grpc_url)

    assert (summary["chunks"], summary["rows"], summary["errors"]) == (3, 10, 5)
    assert pq.read_table(tmp_path / "out/part-000001.parquet").num_rows == 0
    out = read_output(tmp_path / "out")  # one schema across the parts, the empty one included
    assert out["input_row"].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]


@pytest.mark.parametrize("processes", [0, 2], ids=["in-process", "2-read-processes"])
async def test_a_feast_error_stops_the_job_part_way_with_feasts_message(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, processes: int
) -> None:
    """The same way in worker processes as on the in-process thread: resumable, naming Feast's error."""
    config = batch_config(tmp_path)
    feast_source(config)
    route = config.routes[ROUTE]
    features = [f.model_copy(update={"source": "no_such_view:conv_rate"}) if f.source else f for f in route.features]
    config = config.model_copy(update={"routes": {ROUTE: route.model_copy(update={"features": features})}})
    pq.write_table(pa.table({"driver_id": pa.array(range(1001, 1101), pa.int64())}), tmp_path / "in.parquet")

    job = spec(tmp_path / "in.parquet", tmp_path / "out", feature_processes=processes)
    with pytest.raises(BatchJobFailed, match=r"stopped part-way: .*FeatureViewNotFoundException"):
        await run_batch(config, job, triton_server.grpc_url)


@pytest.mark.parametrize(("deadline_s", "met"), [(3600.0, True), (1e-3, False)], ids=["an-hour", "a-millisecond"])
async def test_a_deadline_measures_the_variant_on_triton_and_says_whether_it_keeps_it(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, deadline_s: float, met: bool
) -> None:
    config = batch_config(tmp_path)
    n = 600
    rows = pd.DataFrame({"driver_id": (1001 + np.arange(n) % 50).astype(np.int64), "trip_distance_km": 3.0})
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "in.parquet")

    summary = await run_batch(config, spec(tmp_path / "in.parquet", tmp_path / "out", deadline_s=deadline_s),
                              triton_server.grpc_url)  # fmt: skip

    assert (summary["status"], summary["rows"]) == ("complete", n)  # a deadline it cannot keep still runs
    choice = summary["variant_choice"]
    assert (choice["variant"], choice["deadline_met"]) == ("driver_ranker", met)
    rate = choice["measured_rows_per_s"]["driver_ranker"]  # measured on the real Triton
    assert rate > 0
    assert ("no variant keeps" in choice["reason"]) is not met
