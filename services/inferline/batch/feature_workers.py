"""A batch job's online feature reads in worker processes: Feast on every core, not on one GIL.

Why: Feast's ``get_online_features`` is mostly per-entity Python (deduplicating entity
rows, serialising entity keys, parsing the stored protos), ~25 ms per 1,000 entities on
the demo SQLite store, only about half of it SQL. In the job's process that Python holds
the GIL: its one read thread was ~80 % busy for a whole run and held the job to ~23,000
rows/s, whatever Triton could take. Each worker process here has its own interpreter and
GIL and its own ``feast.FeatureStore``; the job splits a chunk's misses across them.

Processes come from the ``forkserver`` context, never ``fork``: the job's process holds
gRPC channels and threads (Triton's client, the reader thread), and gRPC's state does not
survive a fork. The fork server imports Feast once (``set_forkserver_preload``; the import
is seconds of CPU, Feast instruments itself with typeguard) and every worker is forked from
it with Feast already loaded (``inferline.feast_import``: without typeguard's instrumentation,
which was most of that import). Workers inherit the job's CPU niceness (the fork server is
started by the job, after a service job has lowered its priority).

Workers end with the job: ``close`` on completion, failure or cancel; and if the job dies
without closing them (SIGKILL), each worker's watchdog thread sees the job's process end
(a pidfd, the kernel's notice of exit) and exits. Not the parent's: a worker's parent is the
fork server, and the fork server does not end with the job while workers live (each holds
a copy of the pipe end whose closing tells the fork server that the job is gone); once the
workers are gone it exits too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from inferline.batch.errors import BatchJobFailed
from inferline.core.entities import EntityId
from inferline.core.processes import pid_alive
from inferline.features.store import FeastOnlineStore

if TYPE_CHECKING:
    from inferline.features.scan import ScanPart

logger = logging.getLogger(__name__)

MAX_DEFAULT_PROCESSES = 4
"""The default number of read processes is the CPUs the job may use, at most this many."""
PRELOAD = [
    "inferline",  # first: Feast then loads without its typeguard instrumentation (inferline.feast_import)
    "feast",
    "feast.infra.passthrough_provider",
    "feast.infra.offline_stores.dask",
    "feast.infra.online_stores.sqlite",
    "numpy",
    "inferline.batch.feature_workers",
]
"""Modules the fork server imports once for every worker it forks. Feast's repository config
imports its offline store's module even for online reads (dask, for the file store: ~200
modules, a quarter of a second here and over a second under a profiler, in every worker)."""
JOB_CHECK_S = 0.5
"""How often a worker checks that the job's process is still there, where no pidfd tells it."""
CLOSE_WAIT_S = 5.0
"""How long ``close`` waits for a worker to finish its read and exit before it is killed."""

_store: FeastOnlineStore | None = None  # the worker's own store
_T = TypeVar("_T")


def default_processes() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_PROCESSES``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_PROCESSES))


class FeatureReadError(Exception):
    """Feast failed a read in a worker; the message names Feast's error.

    Feast's own exception is not sent back as is: many of its classes cannot be rebuilt from
    their pickled arguments, and a result that fails to unpickle breaks the whole pool.
    """


class FeatureReadPool:
    """``processes`` worker processes, each with its own ``feast.FeatureStore`` on ``repo_path``."""

    def __init__(self, repo_path: str, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._size = processes
        self._executor = concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=context, initializer=_start, initargs=(repo_path, os.getpid())
        )
        self._processes: dict[int, BaseProcess] = {}

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (after ``start``)."""
        return sorted(self._processes)

    def start(self, refs: list[str], join_key: str, any_id: EntityId) -> None:
        """Start every worker and make one read of ``any_id`` in each (Feast loads its registry
        and store lazily, on the first read), so that no chunk waits for a worker to start.
        Blocking: run it in a thread.

        A Feast error on these reads is not raised here: the chunks' reads meet it again and
        fail the job part-way, as the in-process store's first read would.

        Raises:
            BatchJobFailed: a worker died while starting.
        """
        # ProcessPoolExecutor starts a worker per submit while none is idle, and a worker
        # takes far longer to start than the submits: one task each starts them all, in parallel.
        futures = [self._executor.submit(_read, refs, join_key, [any_id]) for _ in range(self._size)]
        try:
            for future in futures:
                if isinstance(error := future.exception(), FeatureReadError):
                    logger.warning("feature read process: the first read failed: %s", error)
                elif error is not None:
                    raise error
        except BrokenProcessPool as err:
            raise BatchJobFailed(f"a feature read process died while starting: {err}") from err
        finally:
            # Kept for close, which must find them after the executor has forgotten them.
            self._processes = dict(getattr(self._executor, "_processes", None) or {})

    async def read(self, refs: list[str], join_key: str, ids: list[EntityId]) -> npt.NDArray[np.float32]:
        """Latest values of ``refs`` for ``ids``: float32 [len(ids), len(refs)], NaN where missing.

        Raises:
            FeatureReadError: Feast failed the read (the job stops part-way, as on an
                in-process read's failure).
            BatchJobFailed: a worker process died (killed, out of memory): the pool is
                broken, the job stops part-way and ``--resume`` continues.
        """
        return await self._run(_read, refs, join_key, ids)

    async def scan_entities(self, refs: list[str], join_key: str) -> int | None:
        """``FeastOnlineStore.scan_entities_blocking`` in a worker."""
        return await self._run(_scan_entities, refs, join_key)

    async def scan(self, refs: list[str], join_key: str) -> list[ScanPart]:
        """Every stored value of ``refs``, read whole in one slice per worker, side by side
        (``FeastOnlineStore.scan_blocking``).

        Raises:
            FeatureReadError, BatchJobFailed: as ``read``.
        """
        return list(await asyncio.gather(*(self._run(_scan, refs, join_key, i, self._size) for i in range(self._size))))

    async def _run(self, task: Callable[..., _T], *args: Any) -> _T:
        try:
            result: _T = await asyncio.wrap_future(self._executor.submit(task, *args))
        except BrokenProcessPool as err:
            raise BatchJobFailed(f"a feature read process died: {err}") from err
        return result

    def close(self) -> None:
        """Stop the workers: each finishes the read it is on (pending reads are dropped) and
        exits; one still running after ``CLOSE_WAIT_S`` (a stalled store) is killed. Blocking."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for process in self._processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                logger.warning("feature read process %d: running %.0f s after close; killed", process.pid, CLOSE_WAIT_S)
                process.kill()
                process.join()


def _start(repo_path: str, job: int) -> None:
    """Pool initializer: the watchdog on the job's process, and the worker's own FeatureStore."""
    global _store
    # Ctrl-C reaches the whole process group: the job cancels itself and closes the pool,
    # a worker that died of it first would turn the cancel into a broken pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_job, args=(job,), name="job-watch", daemon=True).start()
    _store = FeastOnlineStore(repo_path, inline_small_reads=False)


def _watch_job(job: int) -> None:
    """Exit when the job's process ``job`` has ended, however it ended."""
    try:
        exited = os.pidfd_open(job)  # readable once the process has exited
    except (AttributeError, OSError):  # no pidfd (not Linux ≥ 5.3), or the job is gone already
        while pid_alive(job):
            time.sleep(JOB_CHECK_S)
    else:
        select.select([exited], [], [])
    os._exit(1)


def as_matrix(refs: list[str], columns: dict[str, list[float | None]]) -> npt.NDArray[np.float32]:
    """A store read's columns (``OnlineStore.read``) as float32 [ids, refs], None → NaN;
    contiguous, so a worker's answer pickles without a copy of its own."""
    return np.ascontiguousarray(np.array([columns[ref] for ref in refs], dtype=np.float32).T)


def _with_store(call: Callable[[FeastOnlineStore], _T]) -> _T:
    """In a worker: ``call`` on the worker's store, a Feast error raised as ``FeatureReadError``."""
    assert _store is not None, "the pool initializer builds the store"
    try:
        return call(_store)
    except Exception as err:
        raise FeatureReadError(f"{type(err).__name__}: {err}") from None


def _read(refs: list[str], join_key: str, ids: list[EntityId]) -> npt.NDArray[np.float32]:
    """In a worker: one Feast read as a float32 matrix (None → NaN)."""
    return as_matrix(refs, _with_store(lambda store: store.read_blocking(refs, join_key, ids)))


def _scan_entities(refs: list[str], join_key: str) -> int | None:
    """In a worker: how many entities a whole read of ``refs`` reads (None: it cannot be read whole)."""
    return _with_store(lambda store: store.scan_entities_blocking(refs, join_key))


def _scan(refs: list[str], join_key: str, part: int, parts: int) -> ScanPart:
    """In a worker: one slice of a whole read of ``refs``."""
    return _with_store(lambda store: store.scan_blocking(refs, join_key, part, parts))
