"""The output directory's commit protocol: refuse or resume, torn manifests, orphan parts, shards."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from inferline.batch.errors import BatchInputError
from inferline.batch.output import ChunkRecord, OutputDir, part_name
from inferline.batch.rows import RowError
from inferline.batch.spec import BatchJobSpec, Shard

IDENTITY = {"route": "r", "input": "/data/in.parquet", "chunk_rows": 10}


def record(chunk: int, rows: int = 2, errors: int = 0) -> ChunkRecord:
    return ChunkRecord(chunk, chunk * 10, rows + errors, rows, errors, part_name(chunk), 0)


def table(first: int, n: int = 2) -> pa.Table:
    return pa.table({"input_row": pa.array(range(first, first + n), pa.int64())})


def opened(root: pathlib.Path, *, resume: bool = False, identity: dict[str, object] | None = None) -> OutputDir:
    out = OutputDir(root, "shard-0-of-1", multi_shard=False)
    out.open(identity or IDENTITY, resume=resume)
    return out


def test_committed_chunks_are_found_by_a_resumed_run(tmp_path: pathlib.Path) -> None:
    out = opened(tmp_path / "out")
    out.commit(record(0), table(0), [])
    out.commit(record(1, errors=1), table(10), [RowError(12, "driver_id", "null entity key")])
    out.close()
    again = OutputDir(tmp_path / "out", "shard-0-of-1", multi_shard=False)
    done = again.open(IDENTITY, resume=True)
    assert sorted(done) == [0, 1]
    assert done[1].errors == 1
    again.finish(done, {"status": "complete"})
    again.close()
    assert (tmp_path / "out/_errors.csv").read_text() == "row,column,reason\n12,driver_id,null entity key\n"
    assert ds.dataset(tmp_path / "out").to_table().num_rows == 4  # state and errors are hidden from readers


def test_a_second_run_is_refused_without_resume(tmp_path: pathlib.Path) -> None:
    opened(tmp_path / "out").close()
    with pytest.raises(BatchInputError, match=r"already holds this job.*--resume"):
        opened(tmp_path / "out")


def test_resume_refuses_a_different_job(tmp_path: pathlib.Path) -> None:
    opened(tmp_path / "out").close()
    with pytest.raises(BatchInputError, match=r"chunk_rows differs.*was 10, now 20"):
        opened(tmp_path / "out", resume=True, identity={**IDENTITY, "chunk_rows": 20})


def test_a_foreign_directory_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    with pytest.raises(BatchInputError, match="not an inferline batch output"):
        opened(tmp_path / "out")


def test_a_second_concurrent_run_is_refused(tmp_path: pathlib.Path) -> None:
    first = opened(tmp_path / "out")
    try:
        with pytest.raises(BatchInputError, match="another run of shard-0-of-1 is using it"):
            opened(tmp_path / "out", resume=True)
    finally:
        first.close()


def test_a_torn_manifest_line_is_dropped(tmp_path: pathlib.Path) -> None:
    out = opened(tmp_path / "out")
    out.commit(record(0), table(0), [])
    out.commit(record(1), table(10), [])
    out.close()
    manifest = tmp_path / "out/_inferline/shard-0-of-1/manifest.jsonl"
    manifest.write_bytes(manifest.read_bytes()[:-7])  # killed mid-append
    again = OutputDir(tmp_path / "out", "shard-0-of-1", multi_shard=False)
    assert sorted(again.open(IDENTITY, resume=True)) == [0]
    again.commit(record(1), table(10), [])  # redone: the same part name, replaced
    again.close()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["chunk"] for line in lines] == [0, 1]
    assert sorted(ds.dataset(tmp_path / "out").to_table().column("input_row").to_pylist()) == [0, 1, 10, 11]


def test_a_part_without_its_manifest_line_is_redone(tmp_path: pathlib.Path) -> None:
    out = opened(tmp_path / "out")
    out.commit(record(0), table(0), [])
    out.close()
    (tmp_path / "out" / part_name(1)).write_bytes(b"half a part")  # renamed in, then killed
    (tmp_path / "out" / f".{part_name(2)}.1.2.tmp").write_bytes(b"never renamed")
    again = OutputDir(tmp_path / "out", "shard-0-of-1", multi_shard=False)
    assert sorted(again.open(IDENTITY, resume=True)) == [0]
    assert not (tmp_path / "out" / f".{part_name(2)}.1.2.tmp").exists()
    again.close()


def test_a_lost_part_is_redone(tmp_path: pathlib.Path) -> None:
    out = opened(tmp_path / "out")
    out.commit(record(0), table(0), [])
    out.close()
    (tmp_path / "out" / part_name(0)).unlink()
    again = OutputDir(tmp_path / "out", "shard-0-of-1", multi_shard=False)
    assert again.open(IDENTITY, resume=True) == {}
    again.close()


def test_shards_share_a_directory(tmp_path: pathlib.Path) -> None:
    shards = [OutputDir(tmp_path / "out", Shard(index=i, count=2).label, multi_shard=True) for i in range(2)]
    for i, out in enumerate(shards):
        out.open({**IDENTITY, "shard": f"{i}/2"}, resume=False)
        out.commit(record(i), table(i * 10), [RowError(i * 10 + 5, "driver_id", "null entity key")])
        out.finish([i], {"status": "complete"})
        out.close()
    assert ds.dataset(tmp_path / "out").to_table().num_rows == 4
    assert (tmp_path / "out/_errors-shard-1-of-2.csv").read_text().endswith("15,driver_id,null entity key\n")


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ({**IDENTITY, "shard": "1/2", "chunk_rows": 20}, "holds another job .shard-0-of-2.: chunk_rows differ"),
        ({**IDENTITY, "shard": "0/1"}, "shard count differ"),
    ],
)
def test_only_shards_of_one_job_share_a_directory(
    tmp_path: pathlib.Path, identity: dict[str, object], message: str
) -> None:
    first = OutputDir(tmp_path / "out", "shard-0-of-2", multi_shard=True)
    first.open({**IDENTITY, "shard": "0/2"}, resume=False)
    first.close()
    count = str(identity["shard"]).split("/")[1]
    other = OutputDir(tmp_path / "out", f"shard-{str(identity['shard'])[0]}-of-{count}", multi_shard=True)
    with pytest.raises(BatchInputError, match=message):
        other.open(identity, resume=False)


@pytest.mark.parametrize(("text", "message"), [("2", "expected I/N"), ("2/2", "must be below"), ("0/0", "count")])
def test_bad_shards_are_refused(text: str, message: str) -> None:
    with pytest.raises(BatchInputError, match=message):
        Shard.parse(text)


def test_shards_split_chunks_round_robin() -> None:
    shard = Shard.parse("1/3")
    assert [c for c in range(9) if shard.owns(c)] == [1, 4, 7]


def test_bad_options_name_the_option() -> None:
    with pytest.raises(BatchInputError, match="chunk_rows"):
        BatchJobSpec.build(route="r", input_path="in.csv", output_dir="out", chunk_rows=0)
    with pytest.raises(BatchInputError, match="publish_cache needs a tenant"):
        BatchJobSpec.build(route="r", input_path="in.csv", output_dir="out", publish_cache=True)
