"""The child process a BatchJobs service job runs in: ``python -m inferline.batch.service.job_process``.

Why a process: a job's Python (Feast's reads, parsing, building part files) on a thread of
the router still holds the router's GIL — measured, a 400,000-row job raised the router's
loop lag p99 from 2.4 ms to 19–61 ms, and loop lag is what admission sheds online requests
by. In a process of its own, at a lower CPU priority (``batch_jobs.process_nice``), the job
takes only the CPU online requests leave.

The parent (``JobProcess``) writes one JSON line to stdin: ``config`` (the router's
validated config), ``spec`` (the job, always with ``resume``), ``triton_url`` and ``nice``;
then, while the job runs, ``{"online_queue_wait_s": ...}`` lines: the router's queue wait,
which the job yields its Triton concurrency to (``RouterQueueWait``).
The child answers with JSON lines on stdout, one object each, ``event`` naming it:

* ``started``: ``total_rows`` and ``done`` (the chunks earlier runs committed);
* ``committed``: one more chunk (a ``ChunkRecord``);
* ``metrics``: the job's retries so far and its concurrency and yield gauges, every second;
* ``switched``: the job moved to another variant (``from_variant``, ``to_variant``), at once;
* ``summary``: the job ended; its summary;
* ``error``: the job ended without a summary; ``kind`` is ``busy`` (another run holds the
  output), ``input`` (refused before any work), ``failed`` (stopped part-way) or
  ``internal`` (a bug: the traceback is in this process's log), and ``message``.

SIGTERM, or the end of stdin (the parent closes it once it has the outcome, and a dead
parent's end of the pipe closes by itself), stops the job as ``batch run``'s SIGTERM does:
in-flight Triton calls are left unobserved, uncommitted chunks dropped, committed ones kept
(the next run resumes from them); the process then exits with 130 and no outcome event.
Anything else the job prints goes to stderr (the router's log), so stdout carries only
these events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import IO, Any

from prometheus_client import CollectorRegistry

from inferline.batch.errors import BatchError, BatchInputError, OutputBusy
from inferline.batch.job import BatchJob
from inferline.batch.metrics import BatchMetrics
from inferline.batch.output import ChunkRecord
from inferline.batch.plan import plan_job
from inferline.batch.spec import BatchJobSpec
from inferline.batch.throttle import RouterQueueWait
from inferline.core.config import InferlineConfig
from inferline.core.logging import configure_logging

logger = logging.getLogger("inferline.batch.service.job_process")

METRICS_EVERY_S = 1.0
"""How often the job's retries and gauges are sent to the router (which serves them)."""
CANCELLED_EXIT = 130


class _Events:
    """JSON lines to the parent, one flush each: a line is whole or absent."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()


class _Observer:
    """``JobObserver`` that tells the parent of the run's progress."""

    def __init__(self, events: _Events) -> None:
        self._events = events

    def started(self, total_rows: int | None, done: Mapping[int, ChunkRecord]) -> None:
        records = [dataclasses.asdict(r) for r in done.values()]
        self._events.send("started", total_rows=total_rows, done=records)

    def committed(self, record: ChunkRecord) -> None:
        self._events.send("committed", record=dataclasses.asdict(record))


class _RelayedMetrics(BatchMetrics):
    """The job's metrics in this process; a variant switch is also told to the parent at once
    (the router serves the counter: there is no other running total to send)."""

    def __init__(self, registry: CollectorRegistry, route: str, events: _Events) -> None:
        super().__init__(registry, route)
        self._events = events

    def switched(self, from_variant: str, to_variant: str) -> None:
        super().switched(from_variant, to_variant)
        self._events.send("switched", from_variant=from_variant, to_variant=to_variant)


async def _send_metrics(events: _Events, registry: CollectorRegistry, route: str) -> None:
    labels = {"route": route}
    while True:
        await asyncio.sleep(METRICS_EVERY_S)
        events.send(
            "metrics",
            retries=registry.get_sample_value("inferline_batch_retries_total", labels) or 0.0,
            concurrency_limit=registry.get_sample_value("inferline_batch_concurrency_limit", labels),
            online_queue_wait_s=registry.get_sample_value("inferline_batch_online_queue_wait_seconds", labels),
        )


async def _run(
    config: InferlineConfig, spec: BatchJobSpec, triton_url: str, events: _Events, router_wait: RouterQueueWait
) -> dict[str, Any]:
    plan = await asyncio.to_thread(plan_job, config, spec)
    registry = CollectorRegistry()
    metrics = _RelayedMetrics(registry, spec.route, events)
    observer = _Observer(events)
    job = BatchJob(
        config, plan, triton_url, interactive=False, metrics=metrics, observer=observer, router_wait=router_wait
    )
    reporter = asyncio.ensure_future(_send_metrics(events, registry, spec.route))
    try:
        return await job.run()
    finally:
        reporter.cancel()


async def _listen(reader: asyncio.StreamReader, router_wait: RouterQueueWait) -> None:
    """Reads the router's queue wait lines off stdin into ``router_wait``; returns at stdin's
    end: the parent closed it, or died (SIGKILL, a crash). A job whose router is gone stops at
    once, rather than holding its output's lock against the process that takes the job over."""
    async for line in reader:
        router_wait.push(float(json.loads(line)["online_queue_wait_s"]))


async def _stdin() -> asyncio.StreamReader:
    """stdin as one stream for everything the parent sends: its first line (the job) and the
    queue-wait lines after it (a buffered ``sys.stdin`` read first would swallow some)."""
    reader = asyncio.StreamReader(limit=1 << 24)  # the first line holds the whole config
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _main(events: _Events) -> int:
    reader = await _stdin()
    payload = json.loads(await reader.readline())
    os.nice(int(payload["nice"]))
    config = InferlineConfig.model_validate(payload["config"])
    spec = BatchJobSpec.model_validate(payload["spec"])
    router_wait = RouterQueueWait()
    task = asyncio.ensure_future(_run(config, spec, str(payload["triton_url"]), events, router_wait))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    watcher = asyncio.ensure_future(_listen(reader, router_wait))
    watcher.add_done_callback(lambda _: task.cancel())
    try:
        summary = await task
    except asyncio.CancelledError:
        return CANCELLED_EXIT
    except OutputBusy as err:
        events.send("error", kind="busy", message=str(err))
    except BatchInputError as err:
        events.send("error", kind="input", message=str(err))
    except BatchError as err:
        events.send("error", kind="failed", message=str(err))
    except Exception as err:
        logger.exception("batch job: failed")
        events.send("error", kind="internal", message=f"{type(err).__name__}: {err}")
    else:
        events.send("summary", summary=summary)
    finally:
        watcher.cancel()
    return 0


def main() -> int:
    # The events get stdout's pipe to themselves; anything else printed goes to stderr.
    events = _Events(os.fdopen(os.dup(sys.stdout.fileno()), "w"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    configure_logging()
    import uvloop

    return uvloop.run(_main(events))


if __name__ == "__main__":
    sys.exit(main())
