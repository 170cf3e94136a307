"""The job's input: a Parquet or CSV file, checked before any work, then read in fixed-size chunks.

Chunk ``k`` is always input rows ``[k * chunk_rows, (k + 1) * chunk_rows)``, whatever the
file's row groups or CSV blocks: chunk numbers are what shards split on, part files are
named after and ``--resume`` skips by, so they must not depend on how the file was written.
Only the columns the route needs are read, a chunk at a time: memory is bounded by the
chunk size, not the file size.

Column types are checked up front for Parquet (the schema is in the footer). CSV has no
types: its columns are read as text and each value is parsed per row (``rows.py``), so
an unparseable value fails its row, not the job; the whole CSV is parsed once before any
work, so a truncated or malformed file is refused up front too.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inferline.batch.errors import BatchInputError
from inferline.core.config import RouteConfig

DEFAULT_TIMESTAMP_COLUMN = "event_timestamp"
CSV_BLOCK_BYTES = 1 << 20
"""Bytes of CSV parsed at a time: with the chunk, what bounds the reader's memory."""
CSV_SCAN_ROWS = 65536
_FINGERPRINT_BYTES = 1 << 20

Format = Literal["parquet", "csv"]


@dataclass(frozen=True)
class Columns:
    """The input columns the job reads, and what each is for."""

    entity: str
    timestamp: str | None
    request_features: tuple[str, ...]
    """Request-time features (no Feast source) the input provides; the others take their default."""

    @property
    def all(self) -> list[str]:
        return [self.entity, *([self.timestamp] if self.timestamp else []), *self.request_features]


@dataclass(frozen=True)
class Chunk:
    index: int
    first_row: int
    table: pa.Table


def _format(path: pathlib.Path) -> Format:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise BatchInputError(f"input {path}: unknown format {suffix or '(no suffix)'!r}; use .parquet, .pq or .csv")


class InputFile:
    """One input file, opened and checked against a route: ``InputFile.open`` raises before any work."""

    def __init__(self, path: pathlib.Path, fmt: Format, columns: Columns, num_rows: int | None) -> None:
        self.path = path
        self.format = fmt
        self.columns = columns
        self.num_rows = num_rows
        """Rows in the file (Parquet: from the footer; CSV: counted by the scan in ``open``)."""

    @classmethod
    def open(
        cls, path: pathlib.Path, route: RouteConfig, timestamp_column: str | None, *, detect_timestamp: bool = True
    ) -> InputFile:
        """Open ``path`` and check it has what ``route`` needs.

        ``timestamp_column``: a column that must exist (point-in-time features); None looks
        for ``event_timestamp`` (when ``detect_timestamp``) and goes without when it is absent.

        Raises:
            BatchInputError: missing, unreadable or truncated file; unknown format; no entity
                column; a named timestamp column missing; a Parquet column of the wrong type.
        """
        if not path.is_file():
            raise BatchInputError(f"input {path}: no such file")
        fmt = _format(path)
        names, schema = _read_schema(path, fmt)
        entity = route.entity.join_key
        if entity not in names:
            raise BatchInputError(f"input {path}: no entity column {entity!r} (columns: {', '.join(names)})")
        if timestamp_column is not None and timestamp_column not in names:
            raise BatchInputError(f"input {path}: no timestamp column {timestamp_column!r}")
        detected = DEFAULT_TIMESTAMP_COLUMN if detect_timestamp and DEFAULT_TIMESTAMP_COLUMN in names else None
        timestamp = timestamp_column or detected
        request = tuple(f.name for f in route.features if f.source is None and f.name in names)
        columns = Columns(entity, timestamp, request)
        if schema is not None:
            _check_parquet_types(path, schema, columns, route)
            return cls(path, fmt, columns, pq.ParquetFile(path).metadata.num_rows)
        source = cls(path, fmt, columns, None)
        source.num_rows = source._scan_csv()
        return source

    def _scan_csv(self) -> int:
        """Parse the whole CSV once before any work (its needed columns, as text): a truncated or
        malformed file fails here, not after hours of committed chunks. Returns its row count.

        pyarrow's parser runs at hundreds of MB/s: a small cost next to scoring the rows.
        """
        rows = 0
        try:
            for batch in self._batches(CSV_SCAN_ROWS):
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as err:
            raise BatchInputError(f"input {self.path}: unreadable or truncated CSV file: {err}") from err
        return rows

    def fingerprint(self) -> str:
        """Size and hash of the head and tail: tells a resumed job it reads the file it started on."""
        size = self.path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with self.path.open("rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(0, size - _FINGERPRINT_BYTES))
            digest.update(f.read(_FINGERPRINT_BYTES))
        return f"{size}:{digest.hexdigest()[:32]}"

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        """Every chunk of ``chunk_rows`` rows (the last may be shorter), in order.

        Raises:
            pa.ArrowException, OSError: the file breaks mid-way (the job stops; committed chunks stay).
        """
        index, first_row = 0, 0
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in self._batches(chunk_rows):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= chunk_rows:
                table = pa.Table.from_batches(pending)
                yield Chunk(index, first_row, table.slice(0, chunk_rows).combine_chunks())
                rest = table.slice(chunk_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
                index, first_row = index + 1, first_row + chunk_rows
        if pending_rows:
            yield Chunk(index, first_row, pa.Table.from_batches(pending).combine_chunks())

    def _batches(self, chunk_rows: int) -> Iterator[pa.RecordBatch]:
        if self.format == "parquet":
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=chunk_rows, columns=self.columns.all)
            return
        convert = pacsv.ConvertOptions(
            include_columns=self.columns.all,
            column_types={name: pa.string() for name in self.columns.all},
            strings_can_be_null=True,
        )
        reader = pacsv.open_csv(
            self.path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES), convert_options=convert
        )
        yield from reader


def _read_schema(path: pathlib.Path, fmt: Format) -> tuple[list[str], pa.Schema | None]:
    """Column names (and the Parquet schema), reading only the footer or the first CSV block."""
    try:
        if fmt == "parquet":
            schema = pq.ParquetFile(path).schema_arrow
            return list(schema.names), schema
        options = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
        convert = pacsv.ConvertOptions(column_types={}, strings_can_be_null=True)
        reader = pacsv.open_csv(path, read_options=options, convert_options=convert)
        return list(reader.schema.names), None
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if fmt == "parquet" else "CSV"
        raise BatchInputError(f"input {path}: unreadable or truncated {kind} file: {err}") from err


def _check_parquet_types(path: pathlib.Path, schema: pa.Schema, columns: Columns, route: RouteConfig) -> None:
    def typed(name: str) -> Any:
        return schema.field(name).type

    entity_type = typed(columns.entity)
    if route.entity.type == "int64" and not pa.types.is_integer(entity_type):
        raise BatchInputError(f"input {path}: entity column {columns.entity!r} is {entity_type}, needs an integer type")
    if route.entity.type == "string" and not (pa.types.is_string(entity_type) or pa.types.is_large_string(entity_type)):
        raise BatchInputError(f"input {path}: entity column {columns.entity!r} is {entity_type}, needs a string type")
    if columns.timestamp is not None:
        ts_type = typed(columns.timestamp)
        if not (pa.types.is_timestamp(ts_type) or pa.types.is_date(ts_type)):
            raise BatchInputError(
                f"input {path}: timestamp column {columns.timestamp!r} is {ts_type}, needs a timestamp or date type"
            )
    for name in columns.request_features:
        feature_type = typed(name)
        if not (pa.types.is_integer(feature_type) or pa.types.is_floating(feature_type)):
            raise BatchInputError(f"input {path}: feature column {name!r} is {feature_type}, needs a numeric type")
