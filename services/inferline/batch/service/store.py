"""The BatchJobs service's job state: one SQLite file, or one Postgres database, shared by
every process that names it (SQLite for the processes of one host; Postgres for replicas on
several).

A job is a row: what it does (the caller's spec and the validated ``BatchJobSpec``), its
state and progress, and which process runs it (``owner``) until when (``lease_until``).
A process *claims* a job with one atomic ``UPDATE`` (queued or running, and nobody's, or
its owner's lease run out), renews its leases while it runs them, and gives them back
unfinished when it shuts down (owner cleared, state kept), so a restarted process — or
another one sharing the file — resumes them at once; after a crash (SIGKILL) the lease
runs out first. Every change to a claimed job names its owner, so a process that lost a
job (its lease ran out while it stalled) cannot overwrite the new owner's state.

A cancel is a flag any process may set; the owner sees it within a poll and stops the job.
A queued job nobody owns is cancelled on the spot.

SQLite in WAL mode: readers (Get, List) never wait for the writer; writers wait up to
``BUSY_TIMEOUT_MS`` for each other, across processes. Postgres: the same SQL (through
``_Postgres``, which gives psycopg sqlite3's calls), reads outside transactions, and each
write transaction takes a lock on the table that only other writers wait for — what
SQLite's ``BEGIN IMMEDIATE`` does, so both keep one set of claim and lease rules. Methods
are blocking (a few hundred microseconds on a local disk, a round trip or a few to
Postgres): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from inferline.core.errors import DependencyUnavailable

BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    request_id TEXT,
    api_spec TEXT NOT NULL,
    job_spec TEXT NOT NULL,
    output_key TEXT NOT NULL,
    errors_file TEXT NOT NULL,
    state TEXT NOT NULL,
    rows_total INTEGER NOT NULL DEFAULT 0,
    rows_done INTEGER NOT NULL DEFAULT 0,
    rows_scored INTEGER NOT NULL DEFAULT 0,
    row_errors INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    runs INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    updated_at REAL NOT NULL,
    owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs (tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state, seq) WHERE state IN ('QUEUED', 'RUNNING');
"""


_DATABASE_ERRORS = (sqlite3.OperationalError, psycopg.OperationalError, psycopg.InterfaceError)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
"""A job store location starting with one of these is a Postgres connection URL (libpq's)."""
_POSTGRES_SCHEMA = (
    _SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    .replace(" INTEGER NOT NULL DEFAULT 0", " BIGINT NOT NULL DEFAULT 0")
    .replace(" REAL", " DOUBLE PRECISION")  # Postgres's REAL is 4 bytes: a Unix time would lose minutes
    + "CREATE TABLE IF NOT EXISTS jobs_schema (version INTEGER NOT NULL);"
)
_SCHEMA_LOCK = 0x696E666572
"""The advisory lock under which a process creates the tables (two starting at once would race)."""


class _Row(tuple):  # type: ignore[type-arg]
    """A result row read by position or by column name, as ``sqlite3.Row``."""

    names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self.names.index(key) if isinstance(key, str) else key)


def _rows(cursor: Any) -> Callable[[Sequence[Any]], _Row]:
    """psycopg row factory: ``_Row`` with the cursor's column names."""
    names = tuple(c.name for c in cursor.description or ())
    row_type = type("Row", (_Row,), {"names": names, "__slots__": ()})

    def make(values: Sequence[Any]) -> _Row:
        row: _Row = row_type(values)
        return row

    return make


class _Postgres:
    """A psycopg connection behind the sqlite3 calls the store makes (``execute`` with ``?``
    placeholders, rows by name or position): the store's SQL is written once, for both."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._in_write = False
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[_Row]:
        return psycopg.connect(self._url, autocommit=True, row_factory=_rows)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if not self._in_write:
            self._reconnect_if_lost()
        try:
            return self._conn.execute(sql.replace("?", "%s"), tuple(args))
        finally:
            if sql in ("COMMIT", "ROLLBACK"):
                self._in_write = False

    def begin_write(self) -> None:
        self._reconnect_if_lost()
        self._conn.execute("BEGIN")
        self._in_write = True
        try:
            # Other writers wait for this one (the mode conflicts with itself); plain reads do not.
            self._conn.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        except BaseException:
            self._in_write = False
            with contextlib.suppress(*_DATABASE_ERRORS):
                self._conn.execute("ROLLBACK")
            raise

    def _reconnect_if_lost(self) -> None:
        """A connection lost (a server restart) is replaced before a read or a new transaction,
        never in the middle of one (that would carry on outside it)."""
        if self._conn.broken or self._conn.closed:
            self._conn = self._connect()

    def create_schema(self) -> int:
        """Create the tables if missing; the schema version they hold."""
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in filter(str.strip, _POSTGRES_SCHEMA.split(";")):
                self._conn.execute(statement)
            row = self._conn.execute("SELECT MAX(version) FROM jobs_schema").fetchone()
            if row is None or row[0] is None:
                self._conn.execute("INSERT INTO jobs_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                return SCHEMA_VERSION
            return int(row[0])

    def close(self) -> None:
        self._conn.close()


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class JobRecord:
    seq: int
    job_id: str
    tenant: str
    request_id: str | None
    api_spec: dict[str, Any]
    """The caller's spec (the proto's JSON form): what Get and List return."""
    job_spec: dict[str, Any]
    """The validated ``BatchJobSpec`` (server paths): what the job runs."""
    output_key: str
    """Output directory and shard: two active jobs may not share one."""
    errors_file: str
    state: JobState
    rows_total: int
    rows_done: int
    rows_scored: int
    row_errors: int
    error: str
    runs: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    updated_at: float
    owner: str | None
    lease_until: float | None
    cancel_requested: bool


@dataclass(frozen=True)
class NewJob:
    """A job to insert, as the servicer validated it."""

    job_id: str
    tenant: str
    request_id: str | None
    api_spec: dict[str, Any]
    job_spec: dict[str, Any]
    output_key: str
    errors_file: str


class OutputInUse(Exception):
    """Another queued or running job writes the same output directory and shard."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class TooManyJobs(Exception):
    """The tenant has its limit of queued and running jobs."""


class RequestReused(Exception):
    """A request id seen before, with another spec."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


@dataclass(frozen=True)
class Progress:
    rows_total: int
    rows_done: int
    rows_scored: int
    row_errors: int


class JobStore:
    """Job rows in a SQLite file or a Postgres database (see the module docstring); safe to use
    from several threads."""

    def __init__(self, location: pathlib.Path | str, clock: Callable[[], float] = time.time) -> None:
        """``location``: a SQLite file's path, or a Postgres URL (``postgresql://...``, ``POSTGRES_SCHEMES``)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._db: Any
        if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
            self._db = _Postgres(location)
            self._postgres = True
            version = self._db.create_schema()
            where = "the Postgres database"
        else:
            self._postgres = False
            self._db = self._open_sqlite(pathlib.Path(location))
            where = str(location)
            with self._write() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(f"{where}: job state of a newer inferline (schema {version} > {SCHEMA_VERSION})")

    @staticmethod
    def _open_sqlite(path: pathlib.Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: each statement is its own transaction unless _write opens one.
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This store's connection, one thread at a time. The database failing (a Postgres
        restart, a SQLite file locked past the busy timeout) is ``DependencyUnavailable``:
        callers get UNAVAILABLE, the runner tries again at its next pass, and the next call
        opens a new Postgres connection."""
        with self._lock:
            try:
                yield
            except _DATABASE_ERRORS as err:
                raise DependencyUnavailable("the batch jobs' state store is unavailable: try again") from err

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction, taken at once (SQLite's ``BEGIN IMMEDIATE``, Postgres's table
        lock): no upgrade deadlock between processes."""
        with self._locked():
            if self._postgres:
                self._db.begin_write()
            else:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(*_DATABASE_ERRORS):  # a lost connection has no transaction left
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[JobRecord]:
        with self._locked():
            rows = self._db.execute(sql, args).fetchall()
        return [_record(row) for row in rows]

    # --- the servicer's side -------------------------------------------------------------

    def insert(self, job: NewJob, max_active: int) -> tuple[JobRecord, bool]:
        """Queue ``job``, or return the job an earlier request with its ``request_id`` created.

        Returns:
            (the job, whether it is new).

        Raises:
            RequestReused: the request id created a job with another spec.
            TooManyJobs: the tenant has ``max_active`` jobs queued or running.
            OutputInUse: an active job writes the same output directory and shard.
        """
        with self._write() as db:
            if job.request_id is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE tenant = ? AND request_id = ?", (job.tenant, job.request_id)
                ).fetchone()
                if row is not None:
                    earlier = _record(row)
                    if earlier.api_spec != job.api_spec:
                        raise RequestReused(earlier.job_id)
                    return earlier, False
            (active,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?)", (job.tenant, *ACTIVE)
            ).fetchone()
            if active >= max_active:
                raise TooManyJobs()
            row = db.execute(
                "SELECT job_id FROM jobs WHERE output_key = ? AND state IN (?, ?)", (job.output_key, *ACTIVE)
            ).fetchone()
            if row is not None:
                raise OutputInUse(row[0])
            now = self._clock()
            db.execute(
                "INSERT INTO jobs (job_id, tenant, request_id, api_spec, job_spec, output_key, errors_file, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id, job.tenant, job.request_id, json.dumps(job.api_spec, sort_keys=True),
                    json.dumps(job.job_spec, sort_keys=True), job.output_key, job.errors_file,
                    JobState.QUEUED.value, now, now,
                ),
            )  # fmt: skip
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        return _record(row), True

    def by_request(self, tenant: str, request_id: str) -> JobRecord | None:
        """The tenant's job an earlier submit with ``request_id`` created."""
        found = self._read("SELECT * FROM jobs WHERE tenant = ? AND request_id = ?", (tenant, request_id))
        return found[0] if found else None

    def active_jobs(self, tenant: str) -> int:
        """The tenant's queued and running jobs."""
        with self._locked():
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?)", (tenant, *ACTIVE)
            ).fetchone()
        return int(count)

    def get(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job ``job_id``; None for no such job, or another tenant's."""
        found = self._read("SELECT * FROM jobs WHERE tenant = ? AND job_id = ?", (tenant, job_id))
        return found[0] if found else None

    def page(
        self, tenant: str, states: Collection[JobState], before_seq: int | None, limit: int
    ) -> tuple[list[JobRecord], bool]:
        """The tenant's jobs newest first (sequence below ``before_seq``), at most ``limit``; whether more follow."""
        sql = "SELECT * FROM jobs WHERE tenant = ?"
        args: list[Any] = [tenant]
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += [s.value for s in states]
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        found = self._read(sql, args)
        return found[:limit], len(found) > limit

    def request_cancel(self, tenant: str, job_id: str) -> JobRecord | None:
        """Flag the job cancelled; a queued job nobody runs (or whose owner's lease ran out) ends CANCELLED now.

        Returns:
            The job after the change; None for no such job of the tenant's.
        """
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE tenant = ? AND job_id = ?", (tenant, job_id)).fetchone()
            if row is None:
                return None
            job = _record(row)
            if not job.state.active:
                return job
            if job.owner is None or (job.lease_until or 0) < now:
                db.execute(
                    "UPDATE jobs SET state = ?, cancel_requested = 1, owner = NULL, lease_until = NULL, "
                    "ended_at = ?, updated_at = ? WHERE job_id = ?",
                    (JobState.CANCELLED.value, now, now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE job_id = ?", (now, job_id))
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _record(row)

    # --- the runner's side ---------------------------------------------------------------

    def claim(self, owner: str, limit: int, lease_s: float) -> list[JobRecord]:
        """Take up to ``limit`` jobs to run: queued or running ones nobody holds, oldest first.

        A running job is one whose owner stopped without finishing it (shut down: owner
        cleared; crashed: lease run out). A job flagged cancelled is ended CANCELLED instead.
        """
        now = self._clock()
        claimed: list[JobRecord] = []
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) AND (owner IS NULL OR lease_until < ?) ORDER BY seq",
                (*ACTIVE, now),
            ).fetchall()
            for row in rows:
                job = _record(row)
                if job.cancel_requested:
                    db.execute(
                        "UPDATE jobs SET state = ?, owner = NULL, lease_until = NULL, ended_at = ?, updated_at = ? "
                        "WHERE job_id = ?",
                        (JobState.CANCELLED.value, now, now, job.job_id),
                    )
                    continue
                if len(claimed) >= limit:
                    continue
                db.execute(
                    "UPDATE jobs SET owner = ?, lease_until = ? WHERE job_id = ?", (owner, now + lease_s, job.job_id)
                )
                claimed.append(_record(db.execute("SELECT * FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()))
        return claimed

    def renew(self, owner: str, job_ids: Collection[str], lease_s: float) -> tuple[set[str], set[str]]:
        """Extend ``owner``'s leases of ``job_ids``.

        Returns:
            (the jobs still held, those of them flagged cancelled). A job not held any more
            was taken over by another process after this one's lease ran out.
        """
        if not job_ids:
            return set(), set()
        now = self._clock()
        marks = ", ".join("?" * len(job_ids))
        with self._write() as db:
            db.execute(
                f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND job_id IN ({marks})",
                (now + lease_s, owner, *job_ids),
            )
            rows = db.execute(
                f"SELECT job_id, cancel_requested FROM jobs WHERE owner = ? AND job_id IN ({marks})", (owner, *job_ids)
            ).fetchall()
        return {r[0] for r in rows}, {r[0] for r in rows if r[1]}

    def cancel_flagged(self, owner: str) -> set[str]:
        """Jobs ``owner`` runs that a caller asked to cancel."""
        with self._locked():
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE owner = ? AND cancel_requested = 1", (owner,)
            ).fetchall()
        return {r[0] for r in rows}

    def started(self, owner: str, job_id: str) -> bool:
        """A run of the job begins: RUNNING, one run more. False: the job is not ``owner``'s any more."""
        now = self._clock()
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, runs = runs + 1, started_at = COALESCE(started_at, ?), error = '', "
                "updated_at = ? WHERE job_id = ? AND owner = ?",
                (JobState.RUNNING.value, now, now, job_id, owner),
            )
        return bool(cursor.rowcount == 1)

    def progress(self, owner: str, job_id: str, progress: Progress) -> None:
        now = self._clock()
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET rows_total = ?, rows_done = ?, rows_scored = ?, row_errors = ?, updated_at = ? "
                "WHERE job_id = ? AND owner = ?",
                (
                    progress.rows_total, progress.rows_done, progress.rows_scored, progress.row_errors, now,
                    job_id, owner,
                ),
            )  # fmt: skip

    def note(self, owner: str, job_id: str, error: str) -> None:
        """Tell callers why a job is held up (its ``error``), state unchanged."""
        now = self._clock()
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET error = ?, updated_at = ? WHERE job_id = ? AND owner = ?", (error, now, job_id, owner)
            )

    def finish(
        self, owner: str, job_id: str, state: JobState, error: str = "", progress: Progress | None = None
    ) -> None:
        """The job ended (SUCCEEDED, FAILED or CANCELLED); ``owner`` lets go of it."""
        now = self._clock()
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, ended_at = ?, updated_at = ?, owner = NULL, lease_until = NULL "
                "WHERE job_id = ? AND owner = ?",
                (state.value, error, now, now, job_id, owner),
            )
            if progress is not None:
                db.execute(
                    "UPDATE jobs SET rows_total = ?, rows_done = ?, rows_scored = ?, row_errors = ? WHERE job_id = ?",
                    (progress.rows_total, progress.rows_done, progress.rows_scored, progress.row_errors, job_id),
                )

    def release(self, owner: str, job_ids: Collection[str]) -> None:
        """Give unfinished jobs back (shutting down): their state stays, the next process to claim resumes them."""
        if not job_ids:
            return
        now = self._clock()
        marks = ", ".join("?" * len(job_ids))
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET owner = NULL, lease_until = NULL, updated_at = ? "
                f"WHERE owner = ? AND job_id IN ({marks})",
                (now, owner, *job_ids),
            )

    def purge_ended(self, ended_before: float) -> int:
        """Delete the rows of jobs that ended before ``ended_before`` (their outputs stay); how many."""
        with self._write() as db:
            cursor = db.execute("DELETE FROM jobs WHERE state NOT IN (?, ?) AND ended_at < ?", (*ACTIVE, ended_before))
        return int(cursor.rowcount)


def _record(row: Any) -> JobRecord:
    return JobRecord(
        seq=row["seq"],
        job_id=row["job_id"],
        tenant=row["tenant"],
        request_id=row["request_id"],
        api_spec=json.loads(row["api_spec"]),
        job_spec=json.loads(row["job_spec"]),
        output_key=row["output_key"],
        errors_file=row["errors_file"],
        state=JobState(row["state"]),
        rows_total=row["rows_total"],
        rows_done=row["rows_done"],
        rows_scored=row["rows_scored"],
        row_errors=row["row_errors"],
        error=row["error"],
        runs=row["runs"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        updated_at=row["updated_at"],
        owner=row["owner"],
        lease_until=row["lease_until"],
        cancel_requested=bool(row["cancel_requested"]),
    )
