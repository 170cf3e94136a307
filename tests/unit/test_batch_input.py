"""Batch input: checks before any work, fixed chunk boundaries, and per-row parsing into rows and errors."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferline.batch.errors import BatchInputError
from inferline.batch.rows import parse_chunk
from inferline.batch.source import InputFile
from inferline.core.config import RouteConfig

ROUTE = RouteConfig.model_validate(
    {
        "entity": {"join_key": "driver_id", "type": "int64"},
        "features": [
            {"name": "conv_rate", "source": "stats:conv_rate", "default": 0.5},
            {"name": "trip_km", "default": 6.0},
        ],
        "primary": {"model": "m", "features": ["conv_rate", "trip_km"]},
    }
)


def write_parquet(path: pathlib.Path, table: pa.Table, row_group_size: int | None = None) -> pathlib.Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def ids_table(n: int) -> pa.Table:
    return pa.table({"driver_id": pa.array(range(n), pa.int64()), "trip_km": pa.array(np.arange(n) * 0.5)})


@pytest.mark.parametrize("row_group_size", [7, 64, 1000])
def test_chunks_are_fixed_row_ranges_whatever_the_row_groups(tmp_path: pathlib.Path, row_group_size: int) -> None:
    source = InputFile.open(write_parquet(tmp_path / "in.parquet", ids_table(250), row_group_size), ROUTE, None)
    chunks = list(source.chunks(100))
    assert [(c.index, c.first_row, c.table.num_rows) for c in chunks] == [(0, 0, 100), (1, 100, 100), (2, 200, 50)]
    assert chunks[1].table.column("driver_id").to_pylist() == list(range(100, 200))
    assert source.num_rows == 250


def test_csv_chunks_match_parquet_chunks(tmp_path: pathlib.Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("driver_id,trip_km,unused\n" + "".join(f"{i},{i * 0.5},x\n" for i in range(250)))
    chunks = list(InputFile.open(csv, ROUTE, None).chunks(100))
    assert [(c.index, c.first_row, c.table.num_rows) for c in chunks] == [(0, 0, 100), (1, 100, 100), (2, 200, 50)]
    assert chunks[0].table.column_names == ["driver_id", "trip_km"]  # only what the route needs is read


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("in.parquet", None, "no such file"),
        ("in.json", b"{}", "unknown format"),
        ("in.parquet", b"PAR1 truncated", "unreadable or truncated Parquet"),
        ("in.csv", b"", "unreadable or truncated CSV"),
        ("in.csv", b"entity,trip_km\n1,2\n", "no entity column 'driver_id'"),
    ],
)
def test_unusable_files_fail_before_work(
    tmp_path: pathlib.Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BatchInputError, match=message):
        InputFile.open(path, ROUTE, None)


def test_a_truncated_csv_file_fails_before_work(tmp_path: pathlib.Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("driver_id,trip_km,note\n" + "".join(f"{i},{i},x\n" for i in range(100_000)) + "100000,5")
    with pytest.raises(BatchInputError, match=r"unreadable or truncated CSV file: .*Expected 3 columns, got 2"):
        InputFile.open(csv, ROUTE, None)


def test_csv_rows_are_counted_up_front(tmp_path: pathlib.Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("driver_id\n" + "".join(f"{i}\n" for i in range(1234)))
    assert InputFile.open(csv, ROUTE, None).num_rows == 1234


def test_a_truncated_parquet_file_fails_before_work(tmp_path: pathlib.Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", ids_table(100))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(BatchInputError, match="unreadable or truncated Parquet"):
        InputFile.open(path, ROUTE, None)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"driver_id": pa.array([1.5])}, "entity column 'driver_id' is double, needs an integer type"),
        ({"driver_id": pa.array(["7"])}, "entity column 'driver_id' is string"),
        ({"driver_id": pa.array([1]), "trip_km": pa.array(["far"])}, "feature column 'trip_km' is string"),
        ({"driver_id": pa.array([1]), "event_timestamp": pa.array([3])}, "timestamp column 'event_timestamp' is int64"),
    ],
)
def test_parquet_columns_of_the_wrong_type_fail_before_work(
    tmp_path: pathlib.Path, columns: dict[str, pa.Array], message: str
) -> None:
    path = write_parquet(tmp_path / "in.parquet", pa.table(columns))
    with pytest.raises(BatchInputError, match=message):
        InputFile.open(path, ROUTE, None)


def test_a_named_timestamp_column_must_exist(tmp_path: pathlib.Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", ids_table(3))
    with pytest.raises(BatchInputError, match="no timestamp column 'asof'"):
        InputFile.open(path, ROUTE, "asof")


def test_event_timestamp_is_found_unless_online_features_are_asked_for(tmp_path: pathlib.Path) -> None:
    table = ids_table(3).append_column("event_timestamp", pa.array([0, 1, 2], pa.timestamp("s")))
    path = write_parquet(tmp_path / "in.parquet", table)
    assert InputFile.open(path, ROUTE, None).columns.timestamp == "event_timestamp"
    assert InputFile.open(path, ROUTE, None, detect_timestamp=False).columns.timestamp is None


def test_bad_csv_values_fail_their_rows_only(tmp_path: pathlib.Path) -> None:
    csv = tmp_path / "in.csv"
    rows = [
        "driver_id,trip_km,event_timestamp",
        "1,2.5,2026-01-01T00:00:00Z",  # 0: good
        ",2.5,2026-01-01T00:00:00Z",  # 1: null key
        "x7,2.5,2026-01-01T00:00:00Z",  # 2: unparseable key
        "99999999999999999999,1,2026-01-01T00:00:00Z",  # 3: beyond int64
        "5,far,2026-01-01T00:00:00Z",  # 4: unparseable feature
        "6,,2026-01-01T00:00:00Z",  # 5: null feature: its default, not an error
        "7,1,yesterday",  # 6: unparseable time
        "8,1,",  # 7: null time
        " 9 ,1,2026-01-01 05:00:00",  # 8: good (spaces, no zone: UTC)
    ]
    csv.write_text("\n".join(rows) + "\n")
    source = InputFile.open(csv, ROUTE, None)
    parsed = parse_chunk(next(source.chunks(100)), source.columns, ROUTE)
    assert [(e.row, e.column, e.reason.split(" (")[0]) for e in parsed.errors] == [
        (1, "driver_id", "null entity key"),
        (2, "driver_id", "unparseable entity key"),
        (3, "driver_id", "unparseable entity key"),
        (4, "trip_km", "unparseable number"),
        (6, "event_timestamp", "unparseable timestamp"),
        (7, "event_timestamp", "null timestamp"),
    ]
    assert parsed.rows.tolist() == [0, 5, 8]
    assert parsed.ids.tolist() == [1, 6, 9]
    assert np.isnan(parsed.request_features["trip_km"][1])
    assert parsed.timestamps is not None
    assert str(parsed.timestamps[2]) == "2026-01-01 05:00:00+00:00"


def test_null_parquet_keys_are_row_errors(tmp_path: pathlib.Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", pa.table({"driver_id": pa.array([1, None, 3], pa.int64())}))
    source = InputFile.open(path, ROUTE, None)
    parsed = parse_chunk(next(source.chunks(10)), source.columns, ROUTE)
    assert [(e.row, e.reason) for e in parsed.errors] == [(1, "null entity key")]
    assert parsed.ids.tolist() == [1, 3]


@pytest.mark.parametrize("processes", [-1, 65])
def test_feature_processes_out_of_range_is_refused_by_name(tmp_path: pathlib.Path, processes: int) -> None:
    from inferline.batch.spec import BatchJobSpec

    with pytest.raises(BatchInputError, match="feature_processes"):
        BatchJobSpec.build(route="r", input_path=tmp_path, output_dir=tmp_path, feature_processes=processes)


def test_a_service_job_gets_the_services_feature_processes_unless_it_names_its_own(tmp_path: pathlib.Path) -> None:
    from inferline.batch.service.process import _with_processes
    from inferline.batch.spec import BatchJobSpec
    from inferline.core.config import load_config

    default = pathlib.Path(__file__).resolve().parents[2] / "deploy/local/inferline.yaml"
    config = load_config(default, environ={"INFERLINE_BATCH_JOBS__FEATURE_PROCESSES": "3"})
    spec = BatchJobSpec.build(route="r", input_path=tmp_path, output_dir=tmp_path)
    assert spec.feature_processes is None
    assert _with_processes(spec, config).feature_processes == 3
    assert _with_processes(spec.model_copy(update={"feature_processes": 0}), config).feature_processes == 0


def test_an_unknown_view_scan_mode_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    from inferline.batch.spec import BatchJobSpec

    with pytest.raises(BatchInputError, match=r"view_scan.*'auto', 'always' or 'never'"):
        BatchJobSpec.build(route="r", input_path=tmp_path, output_dir=tmp_path, view_scan="sometimes")
    assert BatchJobSpec.build(route="r", input_path=tmp_path, output_dir=tmp_path).view_scan == "auto"
