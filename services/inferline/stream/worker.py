"""``StreamWorker``: read, score in order per key, write, then acknowledge; claim what the dead left.

Loop: claim entries idle past ``claim_idle_ms`` first (at start, and again every
``claim_idle_ms``), then read new ones, never more than the dispatcher has room for.
Each event runs as a ``KeyedDispatcher`` job: parse → score → commit, where the
``Committer`` writes the outputs of the events finishing together in one sink write and
then acknowledges them in one XACK (a round trip per event bounded the worker). The
acknowledgement comes only after the write, so a crash anywhere before it redelivers the
event, and the sink's dedupe turns the second write into a no-op: each output exactly
once. A job ends only once its output is written, so the next event of its key starts
after it: order per key.

Failures: an unparseable event is parked in the dead-letter stream at once; the stream
engine not answering (``StreamUnavailable``) leaves the event pending, uncounted; any other
failure is counted and the event left pending, to be claimed and retried after the idle
time, until ``max_attempts`` parks it too. The lag is read every ``lag_interval_s`` and
drives ``LagSwitch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from inferline.core.config import RouteConfig
from inferline.stream.commit import Committer
from inferline.stream.errors import StreamUnavailable
from inferline.stream.events import InvalidEvent, output_fields, parse_event
from inferline.stream.metrics import StreamMetrics
from inferline.stream.mode import LagSwitch
from inferline.stream.ordering import KeyedDispatcher
from inferline.stream.ports import Delivery, Output, Sink, Source
from inferline.stream.scoring import EventScorer
from inferline.stream.spec import StreamSpec

logger = logging.getLogger(__name__)

UNAVAILABLE_BACKOFF_S = 1.0
"""Wait before reading again when the stream engine did not answer (it restarts, fails over)."""


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class StreamWorker:
    def __init__(
        self,
        spec: StreamSpec,
        route: RouteConfig,
        source: Source,
        sink: Sink,
        scorer: EventScorer,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self._spec = spec
        self._route = route
        self._source = source
        self._sink = sink
        self._scorer = scorer
        self._metrics = metrics
        self._switch = LagSwitch(spec.lag_high, spec.lag_low)
        self._dispatcher = KeyedDispatcher(spec.max_in_flight)
        self.committer = Committer(sink, source)
        self._held: set[str] = set()  # ids in flight here: a claim must not start them twice
        self.answered = 0
        self.dead_letters = 0
        self.lag_readings = 0
        """Lag readings taken (tests wait on a reading after a change)."""

    @property
    def light(self) -> bool:
        return self._switch.light

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then finish the events in flight (nothing new is read)."""
        await self._source.start()
        await self._read_lag()
        lag_task = asyncio.create_task(self._watch_lag(stop), name="stream-lag")
        try:
            await self._claim_all()
            next_claim = time.monotonic() + self._spec.claim_idle_ms / 1000
            while not stop.is_set():
                room = min(await self._dispatcher.wait_room(), self._spec.read_count)
                if stop.is_set():
                    break
                try:
                    if time.monotonic() >= next_claim:
                        await self._claim_all()
                        next_claim = time.monotonic() + self._spec.claim_idle_ms / 1000
                        continue
                    deliveries = await self._source.read(room)
                except StreamUnavailable as err:  # the engine is away: wait, then read again
                    logger.warning("stream engine unavailable, retrying in %.1f s: %s", UNAVAILABLE_BACKOFF_S, err)
                    await _sleep_or_stop(stop, UNAVAILABLE_BACKOFF_S)
                    continue
                for delivery in deliveries:
                    if delivery.id not in self._held:  # an engine redelivering by itself (JetStream)
                        await self._dispatch(delivery)
            await self._dispatcher.drain()
        finally:
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)

    async def _claim_all(self) -> None:
        """Walk the whole pending list once, taking over every entry idle past the claim time."""
        while True:
            room = await self._dispatcher.wait_room()
            claimed, done = await self._source.claim(min(room, self._spec.read_count))
            for delivery in claimed:
                if delivery.id not in self._held:
                    await self._dispatch(delivery)
            if done:
                return

    async def _dispatch(self, delivery: Delivery) -> None:
        self._held.add(delivery.id)
        key = delivery.fields.get(self._route.entity.join_key, delivery.id)
        await self._dispatcher.submit(key, lambda: self._handle(delivery))
        if self._metrics is not None:
            self._metrics.in_flight.set(self._dispatcher.in_flight)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._process(delivery)
        except StreamUnavailable as err:  # the engine's fault, not the event's: retried, not counted
            if self._metrics is not None:
                self._metrics.failures.inc()
            logger.debug("event %s left pending: %s", delivery.id, err)
        except Exception as err:  # left pending: claimed again after the idle time
            await self._failed(delivery, err)
        finally:
            self._held.discard(delivery.id)

    async def _process(self, delivery: Delivery) -> None:
        try:
            event = parse_event(delivery.id, delivery.fields, self._route, delivery.time_ms)
        except InvalidEvent as err:
            await self._park(delivery, f"invalid event: {err}")
            return
        light = self._switch.light
        outcome = await self._scorer.score(event, light=light)
        now_ms = time.time() * 1000
        fields = output_fields(
            event, outcome, self._route, worker=self._spec.consumer, computed_at_ms=int(now_ms),
            mode="light" if light else "primary",
        )  # fmt: skip
        await self.committer.commit(Output(event.id, fields))
        self.answered += 1
        if self._metrics is not None:
            self._metrics.answered(outcome.served_by.value)
            self._metrics.latency.observe(max(0.0, (now_ms - event.time_ms) / 1000))

    async def _failed(self, delivery: Delivery, err: Exception) -> None:
        if self._metrics is not None:
            self._metrics.failures.inc()
        try:
            attempts = await self._source.failed(delivery.id)
            if attempts >= self._spec.max_attempts:
                await self._park(delivery, f"{attempts} attempts failed, last: {type(err).__name__}: {err}")
                return
        except Exception:
            logger.warning("event %s: could not count its failure", delivery.id, exc_info=True)
        logger.debug("event %s failed; retried after the claim idle time", delivery.id, exc_info=err)

    async def _park(self, delivery: Delivery, reason: str) -> None:
        await self._sink.dead_letter(delivery.id, delivery.fields, reason)
        await self._source.ack([delivery.id])
        self.dead_letters += 1
        if self._metrics is not None:
            self._metrics.dead_letters.inc()
        logger.info("event %s parked in the dead-letter stream: %s", delivery.id, reason)

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._spec.lag_interval_s)
            try:
                await self._read_lag()
            except Exception:
                logger.warning("could not read the group's lag", exc_info=True)

    async def _read_lag(self) -> None:
        lag = await self._source.lag()
        was = self._switch.light
        light = self._switch.update(lag)
        self.lag_readings += 1
        if light != was:
            logger.info("lag %d: scoring with the %s model", lag, "light" if light else "primary")
        if self._metrics is not None:
            self._metrics.lag.set(lag)
            self._metrics.light_mode.set(1 if light else 0)
