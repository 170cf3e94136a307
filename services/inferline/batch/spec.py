"""``BatchJobSpec``: the options of one ``inferline batch run``, validated before any work.

A pydantic model like the YAML config (frozen, unknown keys forbidden), so a bad option
is reported with its name, and the spec can be written to the job's state and compared
on ``--resume``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from inferline.batch.errors import BatchInputError
from inferline.core.config import format_validation_error

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class Shard(BaseModel):
    """Shard ``index`` of ``count``: the chunks whose number ``% count == index``.

    By chunk, not by row: chunks are fixed ranges of input rows, so every shard agrees on
    them without reading the others' data, and each chunk's part file has one owner.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(0, ge=0)
    count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _index_below_count(self) -> Shard:
        if self.index >= self.count:
            raise ValueError(f"shard index {self.index} must be below the shard count {self.count}")
        return self

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` → Shard(I, N) (a Kubernetes Indexed Job passes ``$JOB_COMPLETION_INDEX/N``).

        Raises:
            BatchInputError: not of the form I/N with 0 <= I < N.
        """
        match = _SHARD.match(text)
        if match is None:
            raise BatchInputError(f"--shard {text!r}: expected I/N, e.g. 0/4")
        try:
            return cls(index=int(match[1]), count=int(match[2]))
        except ValidationError as err:
            raise BatchInputError(f"--shard {text!r}:\n{format_validation_error(err)}") from err

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    @property
    def label(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


DEFAULT_YIELD_QUEUE_MS = 2.0
"""Online queue wait the job yields above, by default: a few times Triton's batching window."""


class BatchJobSpec(BaseModel):
    """Everything that defines one batch job (one shard of it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str
    """The route whose features, variants and post-processing score the rows."""
    input_path: pathlib.Path
    """Parquet (``.parquet``, ``.pq``) or CSV (``.csv``) file of entity rows."""
    output_dir: pathlib.Path
    """Where part files, the errors file and the job's state go."""
    shard: Shard = Shard()
    resume: bool = False
    """Continue a job whose state is in ``output_dir``; without it such a directory is refused."""
    traffic_class: str = "batch"
    """Traffic class of the Triton calls: its priority and its model copy (the wide batching window)."""
    timestamp_column: str | None = None
    """Column of event times for point-in-time features; None: ``event_timestamp`` if the input has it."""
    features_from: Literal["auto", "online", "offline"] = "auto"
    """``offline``: Feast's offline store as of each row's timestamp; ``online``: the latest values;
    ``auto``: offline when the input has a timestamp column."""
    chunk_rows: int = Field(8192, ge=1, le=1_000_000)
    """Rows per chunk (one part file each): the unit of memory, commit and resume."""
    request_rows: int = Field(0, ge=0)
    """Rows per Triton request; 0: the model's ``max_batch_size``."""
    concurrency: int = Field(4, ge=1, le=256)
    """Triton requests of this job in flight at once."""
    request_timeout_s: float = Field(30.0, gt=0)
    """Triton's queue timeout and the wait for one request; a late request is retried."""
    attempts: int = Field(6, ge=1)
    """Tries of one Triton request (exponential backoff between) before the job stops, resumable."""
    deadline_s: float | None = Field(None, gt=0)
    """Seconds this run has to score its rows: the variant is the cheapest whose measured rate
    keeps it (``variant_choice``); None: the cheapest ready one. Counted from each run's start
    (a resumed run gets it again for what is left); not part of the job's identity."""
    max_rows_per_s: float | None = Field(None, gt=0)
    """Upper bound of the job's scoring rate (a shared Triton's fair share); None: as fast as allowed."""
    yield_queue_ms: float | None = Field(None, ge=0)
    """Online queue wait (Triton's mean queue time of the online classes' requests) above which
    the job gives capacity back; 0: never yield. None: ``DEFAULT_YIELD_QUEUE_MS`` when the job's
    class has its own model copy, else no yielding (the job's own requests would share the
    online model's queue and its statistics: the signal could not tell them apart)."""
    yield_interval_s: float = Field(0.5, gt=0)
    """How often the online queue wait is sampled and the job's concurrency adjusted."""
    router_metrics: list[Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]] = []
    """Prometheus endpoints (``http://host:9464/metrics``) of the routers whose queue wait the
    job yields to besides Triton's queue time (``batch run``; a BatchJobs service job is told
    its own router's). Operator-given only: never built from a caller's request."""
    feature_processes: int | None = Field(None, ge=0, le=64)
    """Worker processes for the online feature reads (Feast's read is per-entity Python that
    holds the GIL: in worker processes it uses several cores); 0 or 1: one thread of the job's
    process. None: the default of where the job runs (``batch run``: the job's CPUs, at most
    4; a BatchJobs service job: ``batch_jobs.feature_processes``). Not part of the job's
    identity: a resumed run may use another number."""
    view_scan: Literal["auto", "always", "never"] = "auto"
    """When the route's feature views are read whole rather than a thousand entities a read
    (online features only; ``inferline.batch.view_scan``): ``auto`` when the rows to score are
    at least twice the store's entities, ``always``, or ``never``. Not part of the job's identity."""
    publish_cache: bool = False
    """Write every score to the route's score cache (Redis) with its computation time."""
    tenant: str | None = None
    """Tenant whose cache namespace gets the scores (``publish_cache``); it must be allowed the route."""

    @model_validator(mode="after")
    def _publish_needs_tenant(self) -> BatchJobSpec:
        if self.publish_cache and self.tenant is None:
            raise ValueError("publish_cache needs a tenant (--tenant): cache entries are per tenant")
        return self

    @classmethod
    def build(cls, **options: object) -> BatchJobSpec:
        """Validate ``options``; a bad one raises ``BatchInputError`` naming it."""
        try:
            return cls.model_validate(options)
        except ValidationError as err:
            raise BatchInputError(f"invalid batch options:\n{format_validation_error(err)}") from err
