"""The two seams of a stream worker: where events come from and where outputs go.

Small on purpose, so that it is not shaped after one engine: a source delivers,
acknowledges, hands back what a dead consumer left, counts failures and reports lag; a
sink writes outputs once per source event id and parks poison events. Both take many
events per call (``ack`` many ids, ``write`` many outputs): a round trip per event bounds
a worker's throughput, so the worker commits the outputs of events that finish together
in one write and one acknowledgement (``inferline.stream.commit``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as delivered (possibly again, after a crash)."""

    id: str
    fields: dict[str, str]
    time_ms: int | None = None
    """When the engine received it (epoch ms), where the id does not say (JetStream)."""


@dataclass(frozen=True, slots=True)
class Output:
    """The output of one source event, to be appended once."""

    source_id: str
    fields: Mapping[str, str]


class Source(Protocol):
    async def start(self) -> None:
        """Create the consumer group if needed (from the stream's start)."""

    async def read(self, count: int) -> list[Delivery]:
        """Up to ``count`` events never delivered to the group; waits a while for some."""

    async def claim(self, count: int) -> tuple[list[Delivery], bool]:
        """Up to ``count`` events delivered but not acknowledged for longer than the claim idle
        time (a dead consumer's, or a failed attempt), now this consumer's; and whether the
        walk through the unacknowledged events reached their end."""

    async def ack(self, ids: Sequence[str]) -> None:
        """The events are done: never delivered again."""

    async def failed(self, event_id: str) -> int:
        """Count a failed attempt at ``event_id``; the attempts so far."""

    async def lag(self) -> int:
        """Events in the stream the group has not yet been delivered."""

    async def close(self) -> None: ...


class Sink(Protocol):
    async def write(self, outputs: Sequence[Output]) -> list[bool]:
        """Append each output, in order, unless one for its source id was already appended; per
        output, True when appended. Returns only once every output is durably written (an
        error: some may be, none is acknowledged, and their redelivery is deduplicated)."""

    async def dead_letter(self, source_id: str, fields: Mapping[str, str], reason: str) -> bool:
        """Park a poison event with the reason (once per ``source_id``)."""

    async def close(self) -> None: ...
