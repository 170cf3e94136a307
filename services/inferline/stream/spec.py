"""``StreamSpec``: a stream worker's options, validated once, with errors that name the option."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferline.core.config import RouteConfig
from inferline.stream.errors import StreamInputError

DEFAULT_PORTS = {"redis": 6379, "nats": 4222}
"""The stream engines, by URL scheme, and their default ports."""


class StreamEndpoint(BaseModel):
    """One stream on one server: ``redis://HOST:PORT/STREAM`` or ``nats://HOST:PORT/STREAM`` (JetStream)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str
    host: str
    port: int
    stream: str

    @property
    def server_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> StreamEndpoint:
        """Raises ValueError naming what is missing (scheme, host, port, stream name)."""
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"{url!r}: the scheme names the stream engine: redis:// or nats://")
        stream = parts.path.lstrip("/")
        if not parts.hostname or not stream or "/" in stream:
            raise ValueError(f"{url!r}: expected {parts.scheme}://HOST:PORT/STREAM")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as err:
            raise ValueError(f"{url!r}: bad port") from err
        return cls(scheme=parts.scheme, host=parts.hostname, port=port, stream=stream)


def default_consumer() -> str:
    """Host and pid: unique per live process, so a restarted worker never inherits a dead one's
    name (its pending entries are claimed, not silently resumed under the same name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StreamSpec(BaseModel):
    """What ``inferline stream run`` was asked to do; every field is a CLI option."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str
    source: StreamEndpoint
    group: str = Field(min_length=1)
    sink: StreamEndpoint
    dead_letter: str | None = None
    """Stream for poison events, on the sink's server; None: ``<source stream>:dead``."""
    consumer: str = Field(default_factory=default_consumer, min_length=1)
    traffic_class: str = "standard"
    """Triton priority (and class copy) of the worker's model calls."""
    tenant: str | None = None
    """Whose score cache scored events refresh (and degraded answers read); None: no cache."""
    read_count: int = Field(64, ge=1)
    """Events asked for per XREADGROUP (fewer when in-flight room is smaller)."""
    max_in_flight: int = Field(256, ge=1)
    """Events read and not yet acknowledged, at most: the worker stops reading when full."""
    block_ms: int = Field(500, ge=1)
    """How long one XREADGROUP waits for new events."""
    claim_idle_ms: int = Field(30_000, ge=1)
    """Pending entries idle this long (a dead consumer's, or a failed attempt) are claimed."""
    max_attempts: int = Field(3, ge=1)
    """Failed attempts after which an event goes to the dead-letter stream (and is acknowledged)."""
    budget_ms: float | None = Field(None, gt=0)
    """An event older than event time + budget is answered by the degradation ladder; None: the
    route's ``budgets.stream_ms`` (``budget_for``)."""
    lag_high: int = Field(10_000, ge=1)
    """Consumer-group lag above which the worker scores with the route's light model."""
    lag_low: int = Field(1_000, ge=0)
    """Lag below which it returns to the primary model."""
    lag_interval_s: float = Field(1.0, gt=0)
    """How often the group's lag is read."""
    request_timeout_s: float = Field(2.0, gt=0)
    """Budget of one Triton call (queue time); retried once before the ladder answers."""
    dedupe_ttl_s: float = Field(7 * 86_400.0, gt=0)
    """How long the sink remembers a written event id (longer than any redelivery)."""

    @model_validator(mode="after")
    def _lag_thresholds(self) -> StreamSpec:
        if self.lag_low >= self.lag_high:
            raise ValueError(f"--lag-low ({self.lag_low}) must be below --lag-high ({self.lag_high}): hysteresis")
        return self

    def budget_for(self, route: RouteConfig) -> float:
        """The stream budget in ms: ``--budget-ms`` when given, else the route's ``budgets.stream_ms``."""
        return self.budget_ms if self.budget_ms is not None else route.budgets.stream_ms

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter or f"{self.source.stream}:dead"

    @classmethod
    def build(cls, **options: Any) -> StreamSpec:
        """Validate ``options`` (``source``/``sink`` as URLs).

        Raises:
            StreamInputError: naming the option at fault (``--lag-low``, ``--source``...).
        """
        for name in ("source", "sink"):
            if isinstance(options.get(name), str):
                try:
                    options[name] = StreamEndpoint.parse(options[name])
                except ValueError as err:
                    raise StreamInputError(f"--{name}: {err}") from err
        try:
            return cls(**options)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]).replace("_", "-")
            where = f"--{loc}: " if loc else ""
            raise StreamInputError(f"{where}{first['msg'].removeprefix('Value error, ')}") from err
