"""``run_job``: one shard of a batch job, from the input's chunks to committed part files.

Pipeline: a reader (a thread, one chunk at a time) feeds a bounded queue; ``workers``
tasks each take a chunk, parse it, fetch its features, score it on Triton and commit it.
Memory is bounded by (queue + workers) chunks, whatever the input's size. Chunks commit
independently and in any order (``output.py``): a crash, a cancel or a failure loses only
uncommitted chunks, which ``--resume`` redoes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from inferline.batch.course import DeadlineCourse
from inferline.batch.errors import BatchJobFailed
from inferline.batch.feature_workers import default_processes
from inferline.batch.features import BatchFeatures
from inferline.batch.metrics import BatchMetrics
from inferline.batch.output import ChunkRecord, OutputDir, part_name
from inferline.batch.plan import JobPlan, JobVariants
from inferline.batch.progress import JobProgress
from inferline.batch.publish import CachePublisher
from inferline.batch.rows import ParsedChunk, RowError, parse_chunk
from inferline.batch.scoring import BatchScorer, ModelTarget, RateLimit, Scored
from inferline.batch.source import Chunk
from inferline.batch.spec import DEFAULT_YIELD_QUEUE_MS
from inferline.batch.stats import BatchEfficiency
from inferline.batch.switching import VariantSwitcher
from inferline.batch.throttle import (
    AdjustableGate,
    OnlineYield,
    RouterMetricsWait,
    RouterQueueWait,
    TritonQueueWait,
    WaitSignal,
    YieldPolicy,
)
from inferline.batch.variant_choice import DeadlineChoice
from inferline.core.config import InferlineConfig
from inferline.core.entities import EntityId
from inferline.triton.class_copies import ClassModelMap
from inferline.triton.executor import TritonExecutor

logger = logging.getLogger(__name__)

WORKERS = 2
"""Chunks in progress at once: one's features are fetched while another's rows are scored."""
INVALID_SCORE = "model output invalid (not finite or outside [score_min, score_max])"


class JobObserver(Protocol):
    """Told of a run's progress (the BatchJobs service keeps its jobs' state with it)."""

    def started(self, total_rows: int | None, done: Mapping[int, ChunkRecord]) -> None:
        """The run has claimed the output: the shard's input rows, and the chunks earlier runs committed."""

    def committed(self, record: ChunkRecord) -> None:
        """One more chunk is committed (called on the job's event loop)."""


class BatchJob:
    """One shard of a batch job against a running Triton (see the module docstring)."""

    def __init__(
        self,
        config: InferlineConfig,
        plan: JobPlan,
        triton_url: str,
        *,
        interactive: bool | None = None,
        metrics: BatchMetrics | None = None,
        observer: JobObserver | None = None,
        router_wait: RouterQueueWait | None = None,
    ):
        """``router_wait``: the queue wait of the router that runs this job (BatchJobs service
        jobs), which the job yields to besides Triton's queue time."""
        self._router_wait = router_wait
        self._config = config
        self._metrics = metrics
        self._observer = observer
        self._plan = plan
        self._url = triton_url
        self._interactive = interactive
        spec = plan.spec
        self._out = OutputDir(spec.output_dir, spec.shard.label, spec.shard.count > 1)

    async def run(self) -> dict[str, Any]:
        """Run the shard to completion and return its summary (also written to the job's state).

        Raises:
            BatchInputError: the output directory cannot be used (before any work).
            BatchJobFailed: stopped part-way; ``--resume`` continues.
            asyncio.CancelledError: cancelled (SIGINT/SIGTERM); committed chunks stay.
        """
        spec, plan = self._plan.spec, self._plan
        started = time.monotonic()  # the deadline counts from here
        done = self._out.open(plan.identity(), resume=spec.resume)
        # Streamed: the job's requests are many and alike, and a message on an open stream
        # costs the job's event loop ~40 % less than a unary call (``InferStream``).
        executor = TritonExecutor(
            self._url, default_max_in_flight=spec.concurrency, tls=self._config.triton.tls, stream_calls=True
        )
        features: BatchFeatures | None = None
        publisher: CachePublisher | None = None
        try:
            already = sum(r.input_rows for r in done.values())
            total = self._shard_rows(plan.input.num_rows)
            rows_left = None if total is None else total - already
            variants = JobVariants(self._config, plan, executor)
            candidates = await variants.ready(first_only=spec.deadline_s is None)
            choice = await DeadlineChoice().choose(candidates, rows_left, spec.deadline_s, variants.measure)
            target = choice.target
            logger.info("batch %s: variant %s: %s", spec.shard.label, target.variant, choice.reason)
            efficiency = BatchEfficiency(executor)
            await efficiency.track(target.model)
            processes = spec.feature_processes
            if processes is None:
                processes = default_processes()
            features = await asyncio.to_thread(
                functools.partial(
                    BatchFeatures, plan.route, self._config.feature_store, offline=plan.offline,
                    processes=processes, scan=spec.view_scan, rows=rows_left,
                )
            )  # fmt: skip
            if features.read_pids:
                logger.info(
                    "batch %s: %d feature read processes (pids %s)",
                    spec.shard.label, len(features.read_pids), " ".join(map(str, features.read_pids)),
                )  # fmt: skip
            if spec.publish_cache:
                assert spec.tenant is not None
                publisher = CachePublisher(self._config.score_cache, plan.route.degradation, spec.tenant, spec.route)
            gate = AdjustableGate(spec.concurrency)
            scorer = BatchScorer(
                executor,
                target,
                plan.route.postprocess,
                concurrency=spec.concurrency,
                timeout_s=spec.request_timeout_s,
                attempts=spec.attempts,
                rate=RateLimit(spec.max_rows_per_s),
                gate=gate,
            )
            controller = self._online_yield(executor, gate, target)
            switcher = None
            if spec.deadline_s is not None and rows_left is not None:
                course = DeadlineCourse(
                    spec.deadline_s, rows_left, target.model, lambda: gate.paused_s, started=started
                )
                cost = self._config.device_classes[target.device].cost_per_hour
                on_switch = None if self._metrics is None else self._metrics.switched
                switcher = VariantSwitcher(
                    course, variants, scorer, efficiency, choice.rates, cost, spec.shard.label, on_switch
                )
            if self._metrics is not None:
                scorer.on_retry = self._metrics.retries.inc
                self._metrics.concurrency_limit.set(spec.concurrency)
            logger.info(
                "batch %s: route %s, model %s (priority %d, %d rows per request), %s features, %d chunks already done",
                spec.shard.label, spec.route, target.model, target.priority, target.request_rows,
                "offline point-in-time" if plan.offline else "online", len(done),
            )  # fmt: skip
            if self._observer is not None:
                self._observer.started(total, done)
            yielding = None
            if controller is not None:
                await controller.start()
                yielding = asyncio.create_task(controller.run(), name="batch-yield")
            try:
                with JobProgress(total, already, interactive=self._interactive) as progress:
                    records = await self._pipeline(done, features, scorer, publisher, progress, switcher)
            finally:
                if yielding is not None:
                    yielding.cancel()
                    await asyncio.gather(yielding, return_exceptions=True)
            cost_per_hour = None if switcher is None else switcher.cost_per_hour()
            summary = await self._summary(records, progress, scorer, efficiency, publisher, cost_per_hour)
            summary["this_run"]["features"] = features.summary()
            summary["yield"] = None if controller is None else controller.summary()
            summary["variant_choice"] = choice.summary()
            if switcher is not None:
                summary["variant_choice"] |= switcher.summary()
            await asyncio.to_thread(self._out.finish, records, summary)
            return summary
        finally:
            if features is not None:
                await features.close()
            if publisher is not None:
                await publisher.close()
            await executor.close()
            self._out.close()

    def _online_yield(self, executor: TritonExecutor, gate: AdjustableGate, target: ModelTarget) -> OnlineYield | None:
        """The controller that gives Triton back to online traffic, or None (see ``yield_queue_ms``)."""
        spec = self._plan.spec
        copies = ClassModelMap(self._config.triton.class_copies)
        online = {
            copies.resolve(variant.model, cls)
            for variant in self._plan.route.full_variants
            for cls in self._config.traffic_classes
            if cls != spec.traffic_class
        }
        target_ms = spec.yield_queue_ms
        router: WaitSignal | None = self._router_wait
        if router is None and spec.router_metrics:
            router = RouterMetricsWait(spec.router_metrics)  # a job outside the routers (batch run)
        router_target_s = self._router_target_s()
        if target_ms is None:
            if target.model in online and router is not None:
                # Triton's statistics would mix the job's requests with the online ones: the
                # router's signal alone, which holds no request of the job's.
                policy = YieldPolicy(spec.concurrency, router_target_s)
                return OnlineYield(router, policy, gate, spec.yield_interval_s, self._metrics)
            if target.model in online:
                logger.info(
                    "batch: not yielding to online traffic: model %s has no copy for class %s "
                    "(triton.class_copies), so its queue statistics mix the job's requests with the "
                    "online ones; --yield-queue-ms yields anyway",
                    target.model,
                    spec.traffic_class,
                )
                return None
            target_ms = DEFAULT_YIELD_QUEUE_MS
        if target_ms <= 0:
            return None
        policy = YieldPolicy(spec.concurrency, target_ms / 1000)
        more = [] if router is None else [(router, router_target_s)]
        triton = TritonQueueWait(executor, online)
        return OnlineYield(triton, policy, gate, spec.yield_interval_s, self._metrics, more=more)

    def _router_target_s(self) -> float:
        """The router queue wait a job yields above: a third of the smallest queue-wait target
        of the other traffic classes, so the job steps back well before the router would shed
        an online request for that wait."""
        spec = self._plan.spec
        targets = [
            c.queue_wait_target_ms for name, c in self._config.traffic_classes.items() if name != spec.traffic_class
        ]
        return min(targets, default=DEFAULT_YIELD_QUEUE_MS * 3) / 3 / 1000

    def _shard_rows(self, num_rows: int | None) -> int | None:
        if num_rows is None:
            return None
        spec = self._plan.spec
        chunks = -(-num_rows // spec.chunk_rows)
        owned = [c for c in range(chunks) if spec.shard.owns(c)]
        return sum(min(spec.chunk_rows, num_rows - c * spec.chunk_rows) for c in owned)

    async def _pipeline(
        self,
        done: dict[int, ChunkRecord],
        features: BatchFeatures,
        scorer: BatchScorer,
        publisher: CachePublisher | None,
        progress: JobProgress,
        switcher: VariantSwitcher | None,
    ) -> dict[int, ChunkRecord]:
        records = dict(done)
        queue: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=WORKERS)

        async def read() -> None:
            chunks = self._plan.input.chunks(self._plan.spec.chunk_rows)
            while (chunk := await asyncio.to_thread(_next_owned, chunks, self._plan, done)) is not None:
                await queue.put(chunk)
            for _ in range(WORKERS):
                await queue.put(None)

        async def work() -> None:
            while (chunk := await queue.get()) is not None:
                record, model = await self._chunk(chunk, features, scorer, publisher)
                records[record.chunk] = record
                progress.advance(record.rows, record.errors)
                if self._metrics is not None:
                    self._metrics.committed(record.rows, record.errors)
                if self._observer is not None:
                    self._observer.committed(record)
                if switcher is not None:
                    await switcher.committed(record.input_rows, model)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read(), name="batch-read")
                for i in range(WORKERS):
                    group.create_task(work(), name=f"batch-work-{i}")
        except* Exception as failed:
            first = failed.exceptions[0]
            if isinstance(first, BatchJobFailed):
                raise first from None
            # The input breaking mid-way, a full disk, a model answering garbage: stop, resumable.
            raise BatchJobFailed(f"stopped part-way: {type(first).__name__}: {first}") from first
        return records

    async def _chunk(
        self, chunk: Chunk, features: BatchFeatures, scorer: BatchScorer, publisher: CachePublisher | None
    ) -> tuple[ChunkRecord, str]:
        """Score and commit one chunk: its record, and the model that scored it."""
        plan = self._plan
        parsed = parse_chunk(chunk, plan.input.columns, plan.route)
        values, defaulted = await features.matrix(parsed)
        target = scorer.target  # the chunk keeps it if the job changes variant meanwhile
        columns = [features.names.index(name) for name in target.features]
        scored = await scorer.score(values[:, columns], target)
        computed_ms = time.time_ns() // 1_000_000  # whole ms: the part column and the cache entries agree exactly
        table, errors = self._part(parsed, scored, defaulted[:, columns], target, computed_ms)
        if publisher is not None:
            # Before the commit: a crash in between republishes on resume (idempotent), never skips.
            ok = scored.valid
            ids: list[EntityId] = np.asarray(parsed.ids)[ok].tolist()
            await publisher.publish(ids, scored.scores[ok].tolist(), computed_ms / 1000)
        record = ChunkRecord(
            chunk=chunk.index,
            first_row=chunk.first_row,
            input_rows=parsed.input_rows,
            rows=table.num_rows,
            errors=len(errors),
            part=part_name(chunk.index),
            part_bytes=0,
        )
        return await asyncio.to_thread(self._out.commit, record, table, errors), target.model

    def _part(
        self,
        parsed: ParsedChunk,
        scored: Scored,
        defaulted: np.ndarray,
        target: ModelTarget,
        computed_ms: int,
    ) -> tuple[pa.Table, list[RowError]]:
        """The part table of the valid scores, and the chunk's row errors plus the invalid scores."""
        plan = self._plan
        ok = scored.valid
        errors = list(parsed.errors)
        if not ok.all():
            errors += [RowError(int(r), "score", INVALID_SCORE) for r in parsed.rows[~ok]]
            errors.sort(key=lambda e: e.row)
        post = plan.route.postprocess
        scores = scored.scores[ok]
        entity_type = pa.int64() if plan.route.entity.type == "int64" else pa.string()
        columns: dict[str, pa.Array] = {
            "input_row": pa.array(parsed.rows[ok], pa.int64()),
            plan.input.columns.entity: pa.array(np.asarray(parsed.ids)[ok], entity_type),
        }
        if parsed.timestamps is not None:
            columns[plan.input.columns.timestamp or "event_timestamp"] = pa.array(
                parsed.timestamps[ok], pa.timestamp("ns", tz="UTC")
            )
        n = int(ok.sum())
        columns |= {
            "score": pa.array(scores, pa.float32()),
            # Taken from the two labels by index: NumPy's where over strings, then its
            # conversion to Arrow, cost ~3.5 ms of the event loop per 8,192 rows (py-spy).
            "decision": pa.array([post.decision_below, post.decision_above], pa.string()).take(
                pa.array(scores >= post.threshold).cast(pa.int8())
            ),
            "model": pa.repeat(pa.scalar(target.variant, pa.string()), n),
            "model_version": pa.repeat(pa.scalar(scored.model_version, pa.string()), n),
            "computed_at": pa.repeat(pa.scalar(computed_ms, pa.int64()), n).cast(pa.timestamp("ms", tz="UTC")),
            "defaulted_features": defaulted_names(defaulted[ok], target.features),
        }
        return pa.table(columns), errors

    async def _summary(
        self,
        records: dict[int, ChunkRecord],
        progress: JobProgress,
        scorer: BatchScorer,
        efficiency: BatchEfficiency,
        publisher: CachePublisher | None,
        cost_per_hour: float | None,
    ) -> dict[str, Any]:
        """``cost_per_hour``: the run's device cost per hour over its variants (None: the last one's)."""
        spec, target = self._plan.spec, scorer.target
        elapsed_s = progress.elapsed_s
        this_run = progress.rows + progress.errors
        if cost_per_hour is None:
            cost_per_hour = self._config.device_classes[target.device].cost_per_hour
        rows_per_execution = await efficiency.rows_per_execution()
        return {
            "status": "complete",
            "route": spec.route,
            "shard": f"{spec.shard.index}/{spec.shard.count}",
            "model": target.model,
            "chunks": len(records),
            "input_rows": sum(r.input_rows for r in records.values()),
            "rows": sum(r.rows for r in records.values()),
            "errors": sum(r.errors for r in records.values()),
            "this_run": {
                "rows": progress.rows,
                "errors": progress.errors,
                "elapsed_s": round(elapsed_s, 3),
                "rows_per_s": round(this_run / elapsed_s, 1) if elapsed_s > 0 else None,
                "requests": scorer.requests,
                "retries": scorer.retries,
                "rows_per_execution": rows_per_execution,
                "batch_efficiency": None
                if rows_per_execution is None
                else round(rows_per_execution / target.request_rows, 3),
                "cost_per_1k_rows": round(cost_per_hour * elapsed_s / 3600 / this_run * 1000, 6) if this_run else None,
            },
            "published": None if publisher is None else {"rows": publisher.published, "stale": publisher.stale},
            "errors_file": str(self._out.errors_path),
        }


def _next_owned(chunks: Iterator[Chunk], plan: JobPlan, done: dict[int, ChunkRecord]) -> Chunk | None:
    """The next chunk this shard still has to do (blocking read; run in a thread)."""
    for chunk in chunks:
        if plan.spec.shard.owns(chunk.index) and chunk.index not in done:
            return chunk
    return None


def defaulted_names(defaulted: np.ndarray, names: Sequence[str]) -> pa.Array:
    """Per row, the comma-separated names of its features that took their default ("" for none).

    Built per distinct pattern of defaulted features rather than per row: a chunk has
    thousands of rows and a handful of patterns (most rows none), and joining names row by
    row was the largest single cost of writing a part (py-spy, 200,000 rows).
    """
    if not defaulted.any():  # the common chunk: every feature found (nothing to sort)
        return pa.repeat(pa.scalar("", pa.string()), len(defaulted))
    width = defaulted.shape[1]
    if width <= 62:  # one int64 code per row: np.unique on 1-D codes, not on rows (a sort of row views)
        bits = np.arange(width, dtype=np.int64)
        codes, which = np.unique(defaulted.astype(np.int64) @ (np.int64(1) << bits), return_inverse=True)
        patterns = ((codes[:, np.newaxis] >> bits) & 1).astype(bool)
    else:
        patterns, which = np.unique(defaulted, axis=0, return_inverse=True)
    labels = pa.array([",".join(n for n, d in zip(names, row, strict=True) if d) for row in patterns.tolist()])
    return labels.take(pa.array(which.reshape(-1), pa.int64()))
