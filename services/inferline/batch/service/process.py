"""``JobProcess``: one BatchJobs service job run in a child process, seen from the router.

The child (``job_process``) runs the same ``BatchJob`` as ``batch run``; this side starts it,
relays its progress events to the job's observer and the router's batch metrics, and turns
its outcome back into what an in-process ``BatchJob.run`` would have returned or raised —
so the runner (``manager.py``) keeps one way of handling a job's end.

Cancelling the awaiting task stops the child with SIGTERM (it drops uncommitted chunks and
exits, committed ones stay) and, if it has not exited within ``STOP_WAIT_S``, SIGKILL:
commits are atomic (a part is renamed into place, then its manifest line is written), so a
killed job is still resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from inferline.batch.errors import BatchError, BatchInputError, BatchJobFailed, OutputBusy
from inferline.batch.job import JobObserver
from inferline.batch.metrics import BatchMetrics
from inferline.batch.output import ChunkRecord
from inferline.batch.spec import BatchJobSpec
from inferline.core.config import InferlineConfig
from inferline.core.processes import nice_prefix

logger = logging.getLogger(__name__)

ONLINE_WAIT_EVERY_S = 0.1
"""How often the router's queue wait is told to a job's process (which keeps the peak per yield interval)."""
EVENT_LINE_LIMIT = 1 << 26
"""Longest event line read from a child: ``started`` lists every chunk earlier runs committed
(a resumed job of 100-row chunks over millions of rows has tens of thousands)."""
STOP_WAIT_S = 3.0
"""How long a child stopped by SIGTERM may take to exit before it is killed."""
_ERRORS: dict[str, type[BatchError]] = {"busy": OutputBusy, "input": BatchInputError, "failed": BatchJobFailed}


def _with_processes(spec: BatchJobSpec, config: InferlineConfig) -> BatchJobSpec:
    """``spec`` with the service's number of feature read processes, unless it names its own."""
    if spec.feature_processes is not None:
        return spec
    return spec.model_copy(update={"feature_processes": config.batch_jobs.feature_processes})


class JobProcessError(BatchError):
    """The child failed on a bug (its traceback is in its log) or died without saying why."""


class JobProcess:
    def __init__(
        self,
        config: InferlineConfig,
        spec: BatchJobSpec,
        triton_url: str,
        *,
        observer: JobObserver,
        metrics: BatchMetrics | None = None,
        online_wait_s: Callable[[], float] | None = None,
    ) -> None:
        """``online_wait_s``: the router's queue wait, told to the child every
        ``ONLINE_WAIT_EVERY_S`` while it runs (it yields to it)."""
        self._online_wait_s = online_wait_s
        self._payload = {
            "config": config.model_dump(mode="json"),
            "spec": _with_processes(spec, config).model_dump(mode="json"),
            "triton_url": triton_url,
            "nice": config.batch_jobs.process_nice,
        }
        self._observer = observer
        self._metrics = metrics
        self._retries_seen = 0.0
        self.pid: int | None = None

    async def run(self) -> dict[str, Any]:
        """Run the job to its end and return its summary.

        Raises:
            OutputBusy, BatchInputError, BatchJobFailed: as ``BatchJob.run`` would have.
            JobProcessError: the child failed on a bug, or died (killed, out of memory).
            asyncio.CancelledError: cancelled; the child is stopped first.
        """
        # The config goes through a pipe, never argv or the environment: it holds tenants' key hashes.
        # Started by the router's boosted event loop: nice_prefix puts it back at the router's own
        # priority, below which the child then sets the job's own.
        child = await asyncio.create_subprocess_exec(
            *nice_prefix(),
            sys.executable,
            "-m",
            "inferline.batch.service.job_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=EVENT_LINE_LIMIT,
        )
        self.pid = child.pid
        assert child.stdin is not None and child.stdout is not None
        outcome: dict[str, Any] | None = None
        try:
            # stdin stays open while the job runs: its end tells the child to stop (if this
            # process dies, the kernel closes it).
            child.stdin.write(json.dumps(self._payload).encode() + b"\n")
            await child.stdin.drain()
            teller = None if self._online_wait_s is None else asyncio.ensure_future(self._tell(child.stdin))
            try:
                async for line in child.stdout:
                    event = json.loads(line)
                    if event["event"] in ("summary", "error"):
                        outcome = event
                    else:
                        self._relay(event)
            finally:
                if teller is not None:
                    teller.cancel()
                    await asyncio.gather(teller, return_exceptions=True)
            child.stdin.close()
            code = await child.wait()
        except BaseException:
            await self._stop(child)
            raise
        if outcome is None:
            raise JobProcessError(f"the job's process exited with status {code} before the job ended")
        if outcome["event"] == "summary":
            summary: dict[str, Any] = outcome["summary"]
            return summary
        error = _ERRORS.get(outcome["kind"])
        if error is None:
            raise JobProcessError(f"internal error: {outcome['message']}")
        raise error(outcome["message"])

    async def _tell(self, stdin: asyncio.StreamWriter) -> None:
        """The router's queue wait to the child, one JSON line every ``ONLINE_WAIT_EVERY_S``."""
        assert self._online_wait_s is not None
        with contextlib.suppress(ConnectionError):  # the child has exited: its outcome follows
            while True:
                stdin.write(json.dumps({"online_queue_wait_s": self._online_wait_s()}).encode() + b"\n")
                await stdin.drain()
                await asyncio.sleep(ONLINE_WAIT_EVERY_S)

    def _relay(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "started":
            done = [ChunkRecord(**r) for r in event["done"]]
            self._observer.started(event["total_rows"], {r.chunk: r for r in done})
        elif kind == "committed":
            record = ChunkRecord(**event["record"])
            self._observer.committed(record)
            if self._metrics is not None:
                self._metrics.committed(record.rows, record.errors)
        elif kind == "switched" and self._metrics is not None:
            self._metrics.switched(event["from_variant"], event["to_variant"])
        elif kind == "metrics" and self._metrics is not None:
            retries = float(event["retries"])
            self._metrics.retries.inc(max(0.0, retries - self._retries_seen))
            self._retries_seen = max(self._retries_seen, retries)
            if event["concurrency_limit"] is not None:
                self._metrics.concurrency_limit.set(event["concurrency_limit"])
            if event["online_queue_wait_s"] is not None:
                self._metrics.online_queue_wait.set(event["online_queue_wait_s"])

    @staticmethod
    async def _stop(child: asyncio.subprocess.Process) -> None:
        if child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(child.wait()), STOP_WAIT_S)
        except TimeoutError:
            logger.warning("batch job process %d: not stopped %.0f s after SIGTERM; killed", child.pid, STOP_WAIT_S)
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
