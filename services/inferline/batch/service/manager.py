"""``JobRunner``: runs the BatchJobs service's jobs for the serving process.

Each job runs in a child process of its own (``JobProcess``), at a lower CPU priority: a
chunk's parsing, Feast reads and table building are milliseconds of Python at a time, and
in the router's process they held its GIL and showed up as loop lag — the very signal
admission sheds online requests by (measured: a job on a thread of the router raised its
loop lag p99 from 2.4 ms to 19–27 ms; docs/batch.md, "The BatchJobs service"). This side
keeps the jobs' state: claims, leases, progress and cancels, on an event loop and thread of
its own so that SQLite's calls never wait on the router's loop.

A supervisor task on that loop, every ``POLL_S``:

* claims queued jobs (and running ones nobody holds: after a restart, or a crash once
  the lease ran out) while fewer than ``batch_jobs.max_running`` run here, and starts
  them — always with ``resume``, so a job a restart interrupted continues from its
  committed chunks (the submit already refused a directory holding another job);
* renews its leases every third of ``batch_jobs.lease_s``, and stops a job another
  process took over (this one stalled past its lease);
* stops jobs a caller cancelled through another process sharing the state;
* hourly (and at start), deletes the rows of jobs ended over ``batch_jobs.retention_days`` ago.

A cancel through this process stops its job at once (``cancel``). A stopped job's
in-flight Triton calls are left to finish unobserved and its uncommitted chunks are
dropped, as with ``batch run``'s SIGTERM; committed ones stay, so a job submitted with
``resume`` on the same output continues. At shutdown the running jobs are stopped the
same way and given back unfinished (state kept), so the next start resumes them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from inferline.batch.errors import BatchError, OutputBusy
from inferline.batch.metrics import BatchMetricFamilies, BatchMetrics
from inferline.batch.output import ChunkRecord
from inferline.batch.service.process import JobProcess
from inferline.batch.service.request import TenantDirs
from inferline.batch.service.store import JobRecord, JobState, JobStore, Progress
from inferline.batch.spec import BatchJobSpec
from inferline.core.config import InferlineConfig
from inferline.core.errors import DependencyUnavailable, redact_addresses

logger = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the supervisor looks for work and for cancels sent through other processes."""
PURGE_EVERY_S = 3600.0
"""How often ended jobs past ``batch_jobs.retention_days`` are deleted (and once at start)."""
STOP_WAIT_S = 5.0
"""Longest wait for the running jobs to stop at shutdown."""


class _Progress:
    """A run's counts, told to the store as chunks commit (``JobObserver``).

    One write at a time, in the background: chunks committing while a write is under way
    are written together by the next one, so the store never goes back to older counts.
    """

    def __init__(self, store: JobStore, owner: str, job_id: str) -> None:
        self._store = store
        self._owner = owner
        self._job_id = job_id
        self.total = 0
        self.done = self.scored = self.errors = 0
        self._writer: asyncio.Task[None] | None = None
        self._dirty = False

    def started(self, total_rows: int | None, done: Mapping[int, ChunkRecord]) -> None:
        self.total = total_rows or 0
        self.done = sum(r.input_rows for r in done.values())
        self.scored = sum(r.rows for r in done.values())
        self.errors = sum(r.errors for r in done.values())
        self._save()

    def committed(self, record: ChunkRecord) -> None:
        self.done += record.input_rows
        self.scored += record.rows
        self.errors += record.errors
        self._save()

    def snapshot(self) -> Progress:
        return Progress(self.total, self.done, self.scored, self.errors)

    def _save(self) -> None:
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await asyncio.to_thread(self._store.progress, self._owner, self._job_id, self.snapshot())
            except Exception:  # the next commit writes again; the end writes the final counts
                logger.exception("batch job %s: could not save its progress", self._job_id)
                return

    async def flush(self) -> None:
        """Wait for the write under way (the job's end then writes last)."""
        if self._writer is not None:
            self._dirty = False
            await asyncio.gather(self._writer, return_exceptions=True)


class JobRunner:
    def __init__(
        self,
        config: InferlineConfig,
        store: JobStore,
        triton_url: str,
        registry: CollectorRegistry | None = None,
        *,
        online_wait_s: Callable[[], float] | None = None,
    ) -> None:
        """``online_wait_s``: the router's queue wait; each job's process is told it as it runs
        and yields its Triton concurrency when it rises (``RouterQueueWait``)."""
        self._online_wait_s = online_wait_s
        self._config = config
        self._jobs = config.batch_jobs
        self._store = store
        self._url = triton_url
        self._families = None if registry is None else BatchMetricFamilies(registry)
        self._metrics: dict[str, BatchMetrics] = {}
        self.owner = f"{uuid.uuid4().hex[:12]}"
        """This process's name in the store's ``owner`` column."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._supervisor: concurrent.futures.Future[None] | None = None
        self._supervisor_task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._wake: asyncio.Event | None = None

    # --- called from the serving loop ----------------------------------------------------

    async def start(self) -> None:
        """Start the jobs' loop and its supervisor (which picks up jobs left running by the last process)."""
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._wake = asyncio.Event()
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name="batch-jobs", daemon=True)
        self._thread.start()
        await asyncio.to_thread(ready.wait)
        assert self._loop is not None
        self._supervisor = asyncio.run_coroutine_threadsafe(self._supervise(), self._loop)

    def wake(self) -> None:
        """A job was submitted: look for work now rather than at the next poll."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def cancel(self, job_id: str) -> bool:
        """Stop ``job_id`` if it runs here (the store has its cancel flag set). Returns whether it runs here."""
        if self._loop is None or job_id not in self._running:
            return False
        self._loop.call_soon_threadsafe(self._cancel_task, job_id)
        return True

    async def close(self) -> None:
        """Stop the running jobs, give them back unfinished (the next start resumes them), stop the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            stopping = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            await asyncio.wait_for(asyncio.wrap_future(stopping), STOP_WAIT_S + 1)
        except TimeoutError:
            logger.warning("batch jobs: not all jobs stopped within %.0f s", STOP_WAIT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, STOP_WAIT_S)
            self._loop = None

    # --- on the jobs' loop ---------------------------------------------------------------

    def _cancel_task(self, job_id: str) -> None:
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            await asyncio.gather(self._supervisor_task, return_exceptions=True)
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)

    async def _supervise(self) -> None:
        assert self._wake is not None
        self._supervisor_task = asyncio.current_task()
        renew_every = self._jobs.lease_s / 3
        renewed_at = time.monotonic()
        store_down = False
        purge_at = time.monotonic()
        while not self._stopping:
            try:
                if time.monotonic() - renewed_at >= renew_every:
                    renewed_at = time.monotonic()
                    await self._renew()
                else:
                    for job_id in await asyncio.to_thread(self._store.cancel_flagged, self.owner):
                        self._cancel_task(job_id)
                if time.monotonic() >= purge_at:
                    purge_at = time.monotonic() + PURGE_EVERY_S
                    await self._purge()
                free = self._jobs.max_running - len(self._running)
                if free > 0 and not self._stopping:
                    claimed = await asyncio.to_thread(self._store.claim, self.owner, free, self._jobs.lease_s)
                    if self._stopping:  # shutting down meanwhile: the next process runs them
                        await asyncio.to_thread(self._store.release, self.owner, [r.job_id for r in claimed])
                        return
                    for record in claimed:
                        self._launch(record)
                if store_down:
                    store_down = False
                    logger.info("batch jobs: the state store is back")
            except DependencyUnavailable as err:
                # One line when the store goes away (not one per pass): the passes go on, and
                # the jobs' leases run out if it stays away (their next owner resumes them).
                if not store_down:
                    store_down = True
                    logger.warning("batch jobs: %s (%s); trying every %.1f s", err, err.__cause__, POLL_S)
            except Exception:
                logger.exception("batch jobs: supervisor pass failed (tried again in %.1f s)", POLL_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _purge(self) -> None:
        """Delete the rows of jobs ended longer ago than ``batch_jobs.retention_days``."""
        ended_before = time.time() - self._jobs.retention_days * 86_400
        purged = await asyncio.to_thread(self._store.purge_ended, ended_before)
        if purged:
            logger.info(
                "batch jobs: deleted %d ended jobs' rows (older than %g days)", purged, self._jobs.retention_days
            )

    async def _renew(self) -> None:
        held, cancelled = await asyncio.to_thread(
            self._store.renew, self.owner, list(self._running), self._jobs.lease_s
        )
        for job_id in list(self._running):
            if job_id not in held:
                logger.warning("batch job %s: taken over by another process (this one stalled past its lease)", job_id)
                self._cancel_task(job_id)
            elif job_id in cancelled:
                self._cancel_task(job_id)

    def _launch(self, record: JobRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._run(record), name=f"batch-job-{record.job_id}")
        self._running[record.job_id] = task
        task.add_done_callback(lambda _: self._finished(record.job_id))

    def _finished(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        if self._wake is not None:
            self._wake.set()  # a slot is free

    async def _run(self, record: JobRecord) -> None:
        try:
            await self._run_job(record)
        except asyncio.CancelledError:
            raise
        except Exception:  # the store failed: the lease runs out, and a claim runs the job again (resumed)
            logger.exception("batch job %s: could not record its state", record.job_id)

    async def _run_job(self, record: JobRecord) -> None:
        job_id, store, owner = record.job_id, self._store, self.owner
        if not await asyncio.to_thread(store.started, owner, job_id):
            return
        # Resume always: the submit refused an output holding another job, and a job started
        # before (a restart, a takeover) continues from its committed chunks.
        spec = BatchJobSpec.model_validate({**record.job_spec, "resume": True})
        progress = _Progress(store, owner, job_id)
        dirs = TenantDirs.of(self._jobs, record.tenant)
        logger.info("batch job %s (tenant %s, route %s): run %d", job_id, record.tenant, spec.route, record.runs + 1)
        try:
            job = JobProcess(
                self._config,
                spec,
                self._url,
                observer=progress,
                metrics=self._route_metrics(spec.route),
                online_wait_s=self._online_wait_s,
            )
            summary = await job.run()
        except asyncio.CancelledError:
            await progress.flush()
            if self._stopping:
                await asyncio.to_thread(store.release, owner, [job_id])
                logger.info("batch job %s: stopped for shutdown; the next start resumes it", job_id)
            else:
                await asyncio.to_thread(store.finish, owner, job_id, JobState.CANCELLED, "", progress.snapshot())
                logger.info("batch job %s: cancelled (%d rows done)", job_id, progress.done)
            return
        except OutputBusy as err:
            # Another process still writes the output: one this process took the job over from
            # (it stops once it sees its lease gone), or a `batch run` on the same directory.
            # The claim is left to run out; the job is claimed again after `lease_s`.
            message = redact_addresses(dirs.hide(str(err), self._named(record, spec)))
            await asyncio.to_thread(store.note, owner, job_id, f"waiting: {message}")
            logger.warning("batch job %s: %s; trying again in %.0f s", job_id, message, self._jobs.lease_s)
            return
        except BatchError as err:
            await progress.flush()
            message = redact_addresses(dirs.hide(str(err), self._named(record, spec)))
            await asyncio.to_thread(store.finish, owner, job_id, JobState.FAILED, message, progress.snapshot())
            logger.warning("batch job %s: failed: %s", job_id, message)
            return
        except Exception as err:
            logger.exception("batch job %s: failed", job_id)
            await progress.flush()
            text = f"internal error: {type(err).__name__}: {err}"
            message = redact_addresses(dirs.hide(text, self._named(record, spec)))
            await asyncio.to_thread(store.finish, owner, job_id, JobState.FAILED, message, progress.snapshot())
            return
        await progress.flush()
        final = Progress(progress.total, int(summary["input_rows"]), int(summary["rows"]), int(summary["errors"]))
        await asyncio.to_thread(store.finish, owner, job_id, JobState.SUCCEEDED, "", final)
        logger.info("batch job %s: done (%d rows, %d errors)", job_id, final.rows_scored, final.row_errors)

    @staticmethod
    def _named(record: JobRecord, spec: BatchJobSpec) -> dict[Any, str]:
        api = record.api_spec
        return {spec.input_path: str(api.get("input", "")), spec.output_dir: str(api.get("output", ""))}

    def _route_metrics(self, route: str) -> BatchMetrics | None:
        """One ``BatchMetrics`` per route in the app's registry (jobs of a route add to the same series)."""
        if self._families is None:
            return None
        metrics = self._metrics.get(route)
        if metrics is None:
            metrics = self._metrics[route] = self._families.route(route)
        return metrics
