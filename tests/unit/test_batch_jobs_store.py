"""The BatchJobs service's job state, in SQLite and in Postgres (a real cluster of the tests'
own, ``tests/postgres_fixtures.py``), every test on both: tenant-scoped reads, idempotent
submits, limits, and the claims and leases by which processes sharing the state (or a
restarted one) split the jobs, take over those of a process that died, and pass cancels to
the one running a job."""

from __future__ import annotations

import pathlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from inferline.batch.service.store import (
    SCHEMA_VERSION,
    JobState,
    JobStore,
    NewJob,
    OutputInUse,
    Progress,
    RequestReused,
    TooManyJobs,
)
from inferline.core.errors import DependencyUnavailable
from tests.postgres_fixtures import fresh_schema, postgres_url

__all__ = ["postgres_url"]  # the session fixture, used through request.getfixturevalue

LEASE_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def job(job_id: str, tenant: str = "a", output: str | None = None, request_id: str | None = None) -> NewJob:
    return NewJob(
        job_id=job_id,
        tenant=tenant,
        request_id=request_id,
        api_spec={"route": "r", "output": output or job_id},
        job_spec={"route": "r"},
        output_key=f"/out/{tenant}/{output or job_id}#shard-0-of-1",
        errors_file=f"{output or job_id}/_errors.csv",
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def path(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> pathlib.Path | str:
    """Where the jobs are kept: a SQLite file, or a fresh schema of the tests' Postgres."""
    if request.param == "sqlite":
        return tmp_path / "state" / "jobs.sqlite"
    return fresh_schema(request.getfixturevalue("postgres_url"))


@pytest.fixture
def open_store(path: pathlib.Path | str, clock: Clock) -> Iterator[Callable[[], JobStore]]:
    """Opens a store on ``path`` (a process of its own, as far as the state goes); all closed at the end."""
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        opened.append(JobStore(path, clock))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def test_jobs_are_read_per_tenant_newest_first(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    for i in range(5):
        store.insert(job(f"a{i}"), max_active=10)
    store.insert(job("b0", tenant="b"), max_active=10)

    assert store.get("a", "a1") is not None
    assert store.get("b", "a1") is None  # another tenant's job does not exist for it
    first, more = store.page("a", set(), None, 2)
    assert [j.job_id for j in first] == ["a4", "a3"] and more
    rest, more = store.page("a", set(), first[-1].seq, 10)
    assert [j.job_id for j in rest] == ["a2", "a1", "a0"] and not more
    assert [j.job_id for j in store.page("b", set(), None, 10)[0]] == ["b0"]
    store.request_cancel("a", "a2")
    assert [j.job_id for j in store.page("a", {JobState.CANCELLED}, None, 10)[0]] == ["a2"]


def test_a_request_id_gives_one_job_per_tenant(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    first, created = store.insert(job("j1", output="o", request_id="k"), max_active=10)
    again, created_again = store.insert(job("j2", output="o", request_id="k"), max_active=10)  # a retry
    assert (created, created_again, again.job_id) == (True, False, "j1")
    with pytest.raises(RequestReused):
        store.insert(job("j3", output="other", request_id="k"), max_active=10)
    theirs, created = store.insert(job("j4", tenant="b", output="o", request_id="k"), max_active=10)
    assert created and theirs.job_id == "j4"
    assert store.by_request("a", "k") == first


def test_limits_of_active_jobs_and_outputs(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    store.insert(job("j1", output="o"), max_active=2)
    with pytest.raises(OutputInUse) as in_use:
        store.insert(job("j2", output="o"), max_active=2)
    assert in_use.value.job_id == "j1"
    store.insert(job("j3"), max_active=2)
    with pytest.raises(TooManyJobs):
        store.insert(job("j4"), max_active=2)
    assert store.active_jobs("a") == 2
    store.insert(job("j5", tenant="b"), max_active=2)  # another tenant's count
    store.request_cancel("a", "j1")  # queued, nobody runs it: cancelled at once
    store.insert(job("j6", output="o"), max_active=2)  # its output is free again


def test_processes_sharing_the_file_claim_disjoint_jobs(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    one, two = open_store(), open_store()
    for i in range(3):
        one.insert(job(f"j{i}"), max_active=10)
    mine = one.claim("p1", 2, LEASE_S)
    theirs = two.claim("p2", 2, LEASE_S)
    assert [j.job_id for j in mine] == ["j0", "j1"] and [j.job_id for j in theirs] == ["j2"]
    assert two.claim("p2", 2, LEASE_S) == []
    assert one.started("p1", "j0") and not two.started("p2", "j0")  # only the owner starts a job
    assert one.get("a", "j0").state is JobState.RUNNING  # type: ignore[union-attr]


def test_a_dead_owners_jobs_are_taken_over_after_the_lease(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    one, two = open_store(), open_store()
    one.insert(job("j"), max_active=10)
    [claimed] = one.claim("p1", 1, LEASE_S)
    one.started("p1", "j")
    one.progress("p1", "j", Progress(100, 40, 39, 1))
    clock.now += LEASE_S / 2
    assert two.claim("p2", 1, LEASE_S) == []  # held
    assert one.renew("p1", ["j"], LEASE_S) == ({"j"}, set())
    clock.now += LEASE_S + 1  # p1 died: no renewal
    [taken] = two.claim("p2", 1, LEASE_S)
    assert (taken.job_id, taken.state, taken.rows_done, taken.runs) == ("j", JobState.RUNNING, 40, 1)
    assert two.started("p2", "j")
    # The old owner, back from a stall, changes nothing and learns it lost the job.
    one.progress("p1", "j", Progress(100, 90, 89, 1))
    one.finish("p1", "j", JobState.SUCCEEDED)
    assert one.renew("p1", ["j"], LEASE_S) == (set(), set())
    now = two.get("a", "j")
    assert now is not None and (now.state, now.owner, now.rows_done, now.runs) == (JobState.RUNNING, "p2", 40, 2)
    assert now.started_at == claimed.created_at  # the first run's start is kept


def test_a_job_given_back_at_shutdown_is_claimed_at_once(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    store.insert(job("j"), max_active=10)
    store.claim("p1", 1, LEASE_S)
    store.started("p1", "j")
    store.release("p1", ["j"])
    restarted = open_store()  # the next process, on the same file
    [again] = restarted.claim("p2", 1, LEASE_S)
    assert (again.job_id, again.state) == ("j", JobState.RUNNING)


def test_cancels_reach_the_owner_or_end_the_job_at_once(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    owner, other = open_store(), open_store()
    for name in ("queued", "running", "orphan"):
        owner.insert(job(name), max_active=10)
    owner.claim("p1", 2, LEASE_S)  # running and queued are oldest: claimed; orphan waits
    for name in ("queued", "running"):
        owner.started("p1", name)

    waiting = other.request_cancel("a", "orphan")
    assert waiting is not None and waiting.state is JobState.CANCELLED and waiting.ended_at == clock.now
    flagged = other.request_cancel("a", "running")  # its owner is alive: it stops it
    assert flagged is not None and flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert owner.cancel_flagged("p1") == {"running"}
    assert owner.renew("p1", ["queued", "running"], LEASE_S) == ({"queued", "running"}, {"running"})
    owner.finish("p1", "running", JobState.CANCELLED, progress=Progress(10, 5, 5, 0))
    ended = other.get("a", "running")
    assert ended is not None and (ended.state, ended.rows_done, ended.owner) == (JobState.CANCELLED, 5, None)
    assert other.request_cancel("a", "running") == ended  # cancelling an ended job changes nothing
    assert other.request_cancel("b", "queued") is None  # nor can another tenant

    # A cancel of a job whose owner died ends it when its lease runs out.
    other.request_cancel("a", "queued")
    clock.now += LEASE_S + 1
    assert other.claim("p2", 5, LEASE_S) == []
    assert other.get("a", "queued").state is JobState.CANCELLED  # type: ignore[union-attr]


def test_state_survives_a_reopen_and_a_newer_schema_is_refused(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    store.insert(job("j"), max_active=10)
    store.close()
    assert open_store().get("a", "j") is not None
    if isinstance(path, str):
        with psycopg.connect(path, autocommit=True) as conn:
            conn.execute("UPDATE jobs_schema SET version = %s", (SCHEMA_VERSION + 1,))
    else:
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer inferline"):
        JobStore(path, clock)


def test_processes_claiming_at_once_never_take_one_job_twice(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    first = open_store()
    for i in range(40):
        first.insert(job(f"j{i}"), max_active=100)
    processes = [open_store() for _ in range(4)]  # a connection each, claiming concurrently
    claimed: list[str] = []
    seen = threading.Lock()

    def claim_until_none_left(store: JobStore, owner: str) -> None:
        while taken := store.claim(owner, 3, LEASE_S):
            with seen:
                claimed.extend(j.job_id for j in taken)

    with ThreadPoolExecutor(len(processes)) as pool:
        list(pool.map(claim_until_none_left, processes, [f"p{i}" for i in range(len(processes))]))
    assert sorted(claimed) == sorted(f"j{i}" for i in range(40))


def test_a_lost_postgres_connection_is_unavailable_once_then_replaced(postgres_url: str, clock: Clock) -> None:
    location = fresh_schema(postgres_url)
    store = JobStore(location, clock)
    try:
        store.insert(job("j"), max_active=10)
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        with pytest.raises(DependencyUnavailable, match="state store is unavailable"):
            store.get("a", "j")
        assert store.get("a", "j") is not None  # on a new connection
        store.insert(job("k"), max_active=10)
        assert [j.job_id for j in store.page("a", set(), None, 10)[0]] == ["k", "j"]
    finally:
        store.close()


def test_ended_jobs_rows_are_purged_after_retention_and_active_ones_never(
    path: pathlib.Path | str, clock: Clock, open_store: Callable[[], JobStore]
) -> None:
    store = open_store()
    for name in ("old", "recent", "queued", "running"):
        store.insert(job(name, request_id=name), max_active=10)
    claimed = {j.job_id for j in store.claim("p", 10, LEASE_S)}
    assert claimed == {"old", "recent", "queued", "running"}
    store.release("p", ["queued"])
    store.started("p", "running")
    store.finish("p", "old", JobState.SUCCEEDED)
    clock.now += 100
    store.finish("p", "recent", JobState.FAILED, "broken")

    assert store.purge_ended(ended_before=clock.now - 50) == 1
    assert store.get("a", "old") is None and store.by_request("a", "old") is None  # the request id is free again
    assert {j.job_id for j in store.page("a", set(), None, 10)[0]} == {"recent", "queued", "running"}
    clock.now += 10**6
    assert store.purge_ended(ended_before=clock.now) == 1  # "recent"; queued and running jobs stay
    assert {j.job_id for j in store.page("a", set(), None, 10)[0]} == {"queued", "running"}
