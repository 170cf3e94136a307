"""The output directory: part files committed atomically, a manifest of them, and the job's state.

Layout (``S`` is the shard's label, ``shard-I-of-N``)::

    DIR/part-000042.parquet          the scores of input chunk 42 (pyarrow.dataset(DIR) reads them all)
    DIR/_errors.csv                  bad rows: row, column, reason (``_errors-S.csv`` with N > 1 shards)
    DIR/_inferline/S/job.json        what the job is (route, input fingerprint, chunking): --resume checks it
    DIR/_inferline/S/manifest.jsonl  one line per committed chunk
    DIR/_inferline/S/errors/         bad rows per chunk, merged into the errors file at the end

Exactly once: a chunk is committed by writing its errors and its part to temporary files,
fsyncing them, renaming them into place and fsyncing the directory, and only then appending
its manifest line (fsynced). A crash at any point leaves either no trace of the chunk, or a
part file without a manifest line, which a resumed run writes again under the same name
(rename replaces it): the chunk's rows appear once, whatever was killed where. A torn last
manifest line (a crash mid-append) is dropped when the manifest is loaded. Shards write
disjoint chunk numbers, so shards of one job share the directory without coordination.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import pathlib
import shutil
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from inferline.batch.errors import BatchInputError, OutputBusy
from inferline.batch.rows import RowError

STATE_DIR = "_inferline"
ERROR_FIELDS = ("row", "column", "reason")


@dataclass(frozen=True)
class ChunkRecord:
    """A committed chunk, as its manifest line."""

    chunk: int
    first_row: int
    input_rows: int
    rows: int
    """Rows in the part file (scored)."""
    errors: int
    """Rows in the errors file."""
    part: str
    part_bytes: int


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: pathlib.Path, write: Any) -> int:
    """Write ``path`` via a temporary sibling: ``write(file)``, fsync, rename, fsync the directory.

    Returns:
        The file's size in bytes.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    tmp.rename(path)
    _fsync_dir(path.parent)
    return size


def write_part(table: pa.Table, file: IO[bytes]) -> None:
    """Write a part file, dictionary-encoding only its text columns.

    Parquet's writer tries a dictionary for every column by default and gives up on the
    many-valued ones (row numbers, ids, scores) only after building part of one: a third of
    the write's CPU for 8,192 rows, on the cores Triton needs. The text columns (decision,
    model, version, defaulted features) hold a few values each and keep their dictionary.
    """
    text = [field.name for field in table.schema if pa.types.is_string(field.type)]
    pq.write_table(table, file, use_dictionary=text)


class OutputDir:
    """One shard's view of the output directory (see the module docstring)."""

    def __init__(self, root: pathlib.Path, shard_label: str, multi_shard: bool) -> None:
        self.root = root
        self.state = root / STATE_DIR / shard_label
        self._errors_dir = self.state / "errors"
        self._manifest_path = self.state / "manifest.jsonl"
        self.errors_path = root / (f"_errors-{shard_label}.csv" if multi_shard else "_errors.csv")
        self.summary_path = self.state / "summary.json"
        self._multi_shard = multi_shard
        self._lock_file: IO[bytes] | None = None
        self._manifest: IO[bytes] | None = None
        self._write_lock = threading.Lock()

    def open(self, identity: dict[str, Any], *, resume: bool) -> dict[int, ChunkRecord]:
        """Claim the directory for this shard and load what earlier runs committed.

        ``identity``: what defines the job; a resumed run must match it (a different input or
        chunking would commit different rows under the same chunk numbers).

        Returns:
            Committed chunks whose part file is in place, by chunk number (empty when fresh).

        Raises:
            BatchInputError: the directory holds this shard's job and ``resume`` is False; it
                holds another job; it is not an inferline output; another run holds it.
        """
        job_path = self.state / "job.json"
        existing = self._check_root(resume)
        self._errors_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            return self._claim(job_path, existing, identity)
        except BaseException:
            self.close()
            raise

    def check(self, identity: dict[str, Any], *, resume: bool) -> None:
        """``open``'s refusals, read-only (nothing created, nothing locked): what the BatchJobs
        service checks when a job is submitted, before the job runs and opens the directory.

        Raises:
            BatchInputError: as ``open`` (but for another run holding the directory now).
        """
        existing = self._check_root(resume)
        if (self.root / STATE_DIR).is_dir():
            self._check_other_shards(identity)
        if existing:
            _check_identity(self.state / "job.json", identity)

    def _check_root(self, resume: bool) -> bool:
        """Refuse a directory that is no output of ours, or holds this shard's job without ``resume``.

        Returns:
            Whether the directory holds this shard's job already.
        """
        if self.root.exists() and not self.root.is_dir():
            raise BatchInputError(f"output {self.root}: not a directory")
        if self.root.is_dir() and not (self.root / STATE_DIR).is_dir() and any(self.root.iterdir()):
            raise BatchInputError(f"output {self.root}: not empty and not an inferline batch output; choose another")
        existing = (self.state / "job.json").is_file()
        if existing and not resume:
            raise BatchInputError(
                f"output {self.root} already holds this job ({self.state.name}): pass --resume to continue it, "
                "or choose another directory"
            )
        return existing

    def _claim(self, job_path: pathlib.Path, existing: bool, identity: dict[str, Any]) -> dict[int, ChunkRecord]:
        self._check_other_shards(identity)
        if existing:
            _check_identity(job_path, identity)
        else:
            atomic_write(job_path, lambda f: f.write(json.dumps(identity, indent=2, sort_keys=True).encode()))
        # Temporary files of a killed run. Those of parts only when no other shard may be
        # writing beside this one; a leftover there is hidden (dot file) and harmless.
        leftovers = [*self.state.glob(".*.tmp"), *self._errors_dir.glob(".*.tmp")]
        if not self._multi_shard:
            leftovers += self.root.glob(".*.tmp")
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        records = self._load_manifest()
        self._manifest = self._manifest_path.open("ab")
        return {c: r for c, r in records.items() if self._part_intact(r)}

    def _check_other_shards(self, identity: dict[str, Any]) -> None:
        """Shards sharing the directory must be shards of one job: the same everything but the
        index, or their part files (named by chunk number) would hold different rows."""
        count = str(identity.get("shard", "0/1")).split("/")[-1]
        for other in sorted((self.root / STATE_DIR).glob("*/job.json")):
            if other.parent == self.state:
                continue
            try:
                recorded = json.loads(other.read_text())
            except (OSError, ValueError):
                continue  # being written by a starting shard: its own check covers the pair
            differs = sorted(
                k for k in set(recorded) | set(identity) if k != "shard" and recorded.get(k) != identity.get(k)
            )
            if str(recorded.get("shard", "0/1")).split("/")[-1] != count:
                differs.insert(0, "shard count")
            if differs:
                raise BatchInputError(
                    f"output {self.root} holds another job ({other.parent.name}): {', '.join(differs)} differ; "
                    "shards of one job share a directory, other jobs need their own"
                )

    def _lock(self) -> None:
        self._lock_file = (self.state / "lock").open("wb")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise OutputBusy(f"output {self.root}: another run of {self.state.name} is using it") from None

    def _load_manifest(self) -> dict[int, ChunkRecord]:
        """Committed records; a torn last line is dropped and the manifest rewritten without it."""
        if not self._manifest_path.is_file():
            return {}
        data = self._manifest_path.read_bytes()
        records: dict[int, ChunkRecord] = {}
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        for line in complete:
            try:
                record = ChunkRecord(**json.loads(line))
            except (ValueError, TypeError):
                torn = b"x"  # a corrupt line: rewrite without it
                continue
            records[record.chunk] = record
        if torn:
            body = b"".join(json.dumps(asdict(r)).encode() + b"\n" for r in records.values())
            atomic_write(self._manifest_path, lambda f: f.write(body))
        return records

    def _part_intact(self, record: ChunkRecord) -> bool:
        path = self.root / record.part
        return path.is_file() and path.stat().st_size == record.part_bytes

    def commit(self, record: ChunkRecord, table: pa.Table, errors: list[RowError]) -> ChunkRecord:
        """Commit one chunk (blocking; run it in a thread): errors, part, then the manifest line.

        Returns:
            The record as written (with the part's size).
        """
        errors_path = self._errors_dir / f"chunk-{record.chunk:06d}.csv"
        if errors:
            atomic_write(errors_path, lambda f: f.write(_errors_csv(errors, header=False)))
        else:
            errors_path.unlink(missing_ok=True)
        size = atomic_write(self.root / record.part, lambda f: write_part(table, f))
        committed = ChunkRecord(**{**asdict(record), "part_bytes": size})
        line = json.dumps(asdict(committed)).encode() + b"\n"
        with self._write_lock:
            assert self._manifest is not None
            self._manifest.write(line)
            self._manifest.flush()
            os.fsync(self._manifest.fileno())
        return committed

    def finish(self, chunks: Iterable[int], summary: dict[str, Any]) -> None:
        """Merge the per-chunk errors into the errors file (chunk order) and write the summary."""

        def merge(f: IO[bytes]) -> None:
            f.write((",".join(ERROR_FIELDS) + "\n").encode())
            for chunk in sorted(chunks):
                path = self._errors_dir / f"chunk-{chunk:06d}.csv"
                if path.is_file():
                    with path.open("rb") as part:
                        shutil.copyfileobj(part, f)

        atomic_write(self.errors_path, merge)
        atomic_write(self.summary_path, lambda f: f.write(json.dumps(summary, indent=2).encode()))

    def close(self) -> None:
        for handle in (self._manifest, self._lock_file):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._manifest = self._lock_file = None


def _errors_csv(errors: list[RowError], *, header: bool) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if header:
        writer.writerow(ERROR_FIELDS)
    writer.writerows((e.row, e.column, e.reason) for e in errors)
    return text.getvalue().encode()


def _check_identity(path: pathlib.Path, identity: dict[str, Any]) -> None:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BatchInputError(f"cannot read the job state {path}: {err}") from err
    for key in sorted(set(recorded) | set(identity)):
        if recorded.get(key) != identity.get(key):
            raise BatchInputError(
                f"--resume: {key} differs from the job in {path.parent.parent.parent} "
                f"(was {recorded.get(key)!r}, now {identity.get(key)!r}); use another output directory"
            )
