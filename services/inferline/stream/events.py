"""The event format: entity key and request-time features as fields, the entry id as event id.

An event ``{"driver_id": "1001", "trip_distance_km": "3.2"}`` appended as entry
``1733140000000-0`` is scored for driver 1001 with that request-time feature; its time is
the entry id's milliseconds (on JetStream, the server's receive time) unless an
``event_time_ms`` field says otherwise (a producer replaying history). Other fields are
ignored, so producers may carry their own metadata. An event whose key or feature cannot
be parsed is poison: it goes to the dead-letter stream with the reason, at once (another
attempt would fail the same way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from inferline.core.config import RouteConfig
from inferline.core.entities import EntityId
from inferline.core.served_by import Reason, ServedBy

EVENT_TIME_FIELD = "event_time_ms"


class InvalidEvent(ValueError):
    """An event that can never be scored (missing or malformed key or feature)."""


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    """The source entry id: the event's identity, named by its output."""
    entity: EntityId
    request_features: dict[str, float]
    """Request-time features the event gave (the route's defaults fill the rest)."""
    time_ms: int
    """Event time, epoch milliseconds."""


def parse_event(event_id: str, fields: Mapping[str, str], route: RouteConfig, time_ms: int | None = None) -> Event:
    """The event of one stream entry; ``time_ms``: the engine's receive time, when the id holds none.

    Raises:
        InvalidEvent: naming the field at fault.
    """
    key = route.entity.join_key
    raw = fields.get(key)
    if raw is None or raw == "":
        raise InvalidEvent(f"field {key!r}: missing entity key")
    entity: EntityId
    if route.entity.type == "int64":
        try:
            entity = int(raw)
        except ValueError:
            raise InvalidEvent(f"field {key!r}: {raw[:40]!r} is not an int64 key") from None
        if not -(2**63) <= entity < 2**63:
            raise InvalidEvent(f"field {key!r}: out of int64 range")
    else:
        entity = raw
    features: dict[str, float] = {}
    for spec in route.features:
        if spec.source is None and fields.get(spec.name, "") != "":
            features[spec.name] = _number(spec.name, fields[spec.name])
    return Event(event_id, entity, features, _event_time_ms(event_id, fields, time_ms))


def _number(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidEvent(f"field {name!r}: {raw[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidEvent(f"field {name!r}: not finite")
    return value


def _event_time_ms(event_id: str, fields: Mapping[str, str], received_ms: int | None) -> int:
    given = fields.get(EVENT_TIME_FIELD)
    if given:
        try:
            return int(given)
        except ValueError:
            raise InvalidEvent(f"field {EVENT_TIME_FIELD!r}: {given[:40]!r} is not epoch milliseconds") from None
    if received_ms is not None:
        return received_ms
    try:
        return int(event_id.split("-", 1)[0])
    except ValueError:
        raise InvalidEvent(f"event id {event_id!r} carries no time; give {EVENT_TIME_FIELD}") from None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What answered one event."""

    score: float
    served_by: ServedBy
    reason: Reason | None
    model: str
    model_version: str


def output_fields(
    event: Event, outcome: Outcome, route: RouteConfig, *, worker: str, computed_at_ms: int, mode: str
) -> dict[str, str]:
    """The output entry: the source event id, the answer, who served it and when."""
    post = route.postprocess
    return {
        "event_id": event.id,
        route.entity.join_key: str(event.entity),
        "score": repr(outcome.score),
        "decision": post.decision_above if outcome.score >= post.threshold else post.decision_below,
        "served_by": outcome.served_by.value,
        "reason": outcome.reason.value if outcome.reason is not None else "",
        "model": outcome.model,
        "model_version": outcome.model_version,
        "mode": mode,
        "worker": worker,
        "computed_at_ms": str(computed_at_ms),
        "event_time_ms": str(event.time_ms),
    }
