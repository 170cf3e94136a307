"""The one YAML configuration file, parsed and validated into ``InferlineConfig``.

Every model forbids unknown keys and is frozen; ``load_config`` reports the dotted path
of any bad key. Deploy-time overrides come from the environment with the prefix
``INFERLINE_`` and ``__`` between levels, e.g. ``INFERLINE_SERVER__PORT=6000`` or
``INFERLINE_TRITON__URL=triton:8001``.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

_CLASS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Model):
    """TLS on a port this deployment serves (PEM files; relative paths are from the config file).

    The files are read when the server starts: a missing or unreadable file, or a key that
    does not match its certificate, stops start-up with an error naming the key.
    """

    cert_file: pathlib.Path
    """The server's certificate chain (its certificate first, then any intermediates)."""
    key_file: pathlib.Path
    """The private key of ``cert_file`` (unencrypted PEM)."""
    client_ca_file: pathlib.Path | None = None
    """Set: mutual TLS, every client must present a certificate signed by this CA (the
    handshake fails otherwise). None: any client may connect; the server is still verified."""


class TlsClientConfig(_Model):
    """TLS on the connections this deployment opens to a server (PEM files; relative paths
    are from the config file)."""

    ca_file: pathlib.Path
    """The CA the server's certificate must be signed by (no system roots are trusted)."""
    cert_file: pathlib.Path | None = None
    """The client certificate presented for mutual TLS; None: none is presented."""
    key_file: pathlib.Path | None = Field(None, validate_default=True)
    """The private key of ``cert_file``; set exactly when ``cert_file`` is."""
    server_name: str | None = None
    """The name the server's certificate must carry (a DNS name or IP address in its
    subjectAltName); None: the host of the address connected to."""

    @field_validator("key_file")
    @classmethod
    def _key_with_cert(cls, key_file: pathlib.Path | None, info: ValidationInfo) -> pathlib.Path | None:
        cert_file = info.data.get("cert_file")
        if cert_file is not None and key_file is None:
            raise ValueError("cert_file is set: its key_file is needed too")
        if "cert_file" in info.data and cert_file is None and key_file is not None:
            raise ValueError("key_file is set without cert_file (the certificate it belongs to)")
        return key_file


class ServerConfig(_Model):
    host: str = "0.0.0.0"
    """Interface the router's gRPC server binds."""
    port: int = Field(50051, ge=0, le=65535)
    """Router gRPC port (0 picks a free one)."""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Prometheus metrics port (0 disables the metrics endpoint)."""
    max_message_bytes: int = Field(1 << 20, gt=0)
    """Largest request message accepted; bigger ones are refused with RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int = Field(1024, ge=1)
    """Calls handled at once; beyond it gRPC refuses new ones at the door with RESOURCE_EXHAUSTED,
    so overload cannot queue unbounded work (and memory) inside the process."""
    grace_s: float = Field(5.0, ge=0)
    """How long in-flight calls may finish on shutdown."""
    drain_s: float = Field(0.0, ge=0)
    """Longest time between reporting NOT_SERVING and stopping, so load balancers notice and
    stop sending (0: stop at once). Behind Envoy or a Kubernetes Service, set it above their
    health-check detection time (the gateway's: about 2 s)."""
    drain_quiet_s: float = Field(1.0, gt=0)
    """The drain ends early once no call (health checks aside) arrived for this long: the
    load balancers have stopped sending, and stopping loses nothing."""
    tls: TlsServerConfig | None = None
    """TLS on the gRPC port of every inferline process (the router's public port, and an
    internal service's own port in the suite); None: plain text."""
    loop_priority_boost: int = Field(5, ge=0, le=19)
    """Once serving, the event loop's thread runs this many steps of CPU niceness above the
    process's other threads (gRPC's I/O threads) and the processes it starts
    (``inferline.core.processes``): on cores shared with Envoy, Triton and others the loop
    otherwise waited for a CPU about as long as it ran under overload. Needs CAP_SYS_NICE
    (root, or the capability in a container); without it the loop keeps the process's
    priority, with one warning line. 0: no boost."""


class ClassBatchingConfig(_Model):
    """The batching window of one traffic class's copy of a model (Triton's ``dynamic_batching``)."""

    max_queue_delay_us: int = Field(ge=0)
    """How long a request may wait for others to join its batch (the hard window)."""
    preferred_batch_sizes: list[int] = []
    """Batch sizes Triton sends at once instead of waiting out the window; empty: none."""


class ClassCopiesConfig(_Model):
    """Per-traffic-class copies of models, generated from one model definition.

    Triton has one ``max_queue_delay_microseconds`` per model, shared by all priority
    levels, so a class that needs its own batching window gets its own copy of the model
    (same files, its own ``dynamic_batching``), named ``<model>__<class>``. The bundled
    server generates the copies at start-up; for a Triton run elsewhere,
    ``inferline triton class-copies`` writes them into its repository.
    """

    models: list[str] = []
    """Models that get per-class copies."""
    classes: dict[str, ClassBatchingConfig] = {}
    """Classes with a window of their own; a class not listed uses the model itself."""


class TritonConfig(_Model):
    url: str | None = None
    """host:port of a running Triton gRPC endpoint; None starts the bundled server."""
    model_repository: pathlib.Path = pathlib.Path("triton_models")
    """Model repository of the bundled server (relative paths are from the config file)."""
    server_env: pathlib.Path = pathlib.Path(".venv-triton")
    """Virtual environment holding nvidia-pytriton (numpy < 2) for the bundled server."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """Bundled server gRPC port; 0 picks a free one."""
    http_port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535)
    startup_timeout_s: float = Field(120.0, gt=0)
    """How long to wait for the bundled server and its models to become ready."""
    load_gpu_variants: bool | Literal["auto"] = "auto"
    """Load models whose name ends in ``_gpu`` when a GPU is present ("auto"), always, or never."""
    coalesce_max_concurrent: int = Field(1, ge=1)
    """Calls in flight per (model, priority) before the router merges queued calls into one."""
    coalesce_max_batch_rows: int = Field(128, ge=1)
    """Most rows in one merged call: at most the models' ``max_batch_size``."""
    class_copies: ClassCopiesConfig = ClassCopiesConfig()
    tls: TlsClientConfig | None = None
    """TLS on the router's connections to Triton (and the bundled server's readiness probe);
    None: plain text."""
    server_tls: TlsServerConfig | None = None
    """The bundled server serves gRPC over TLS (``--grpc-use-ssl``; mutual TLS,
    ``--grpc-use-ssl-mutual``, when ``client_ca_file`` is set). Needs ``tls`` to connect
    with. Triton's HTTP and metrics ports stay plain text, on loopback."""

    @field_validator("server_tls")
    @classmethod
    def _server_tls_needs_client_tls(
        cls, server_tls: TlsServerConfig | None, info: ValidationInfo
    ) -> TlsServerConfig | None:
        if server_tls is None or "tls" not in info.data:
            return server_tls
        client: TlsClientConfig | None = info.data["tls"]
        if client is None:
            raise ValueError("set without triton.tls, which the router and the readiness probe connect with")
        if server_tls.client_ca_file is not None and client.cert_file is None:
            raise ValueError(
                "client_ca_file is set (mutual TLS), so triton.tls needs cert_file and key_file: "
                "the client certificate the router and the readiness probe present"
            )
        return server_tls


class FeatureSpec(_Model):
    name: str
    """Feature name as the model sees it (column name)."""
    source: str | None = None
    """Feast reference ``view:feature``; None marks a request-time feature."""
    default: float
    """Value used when the entity or the feature is missing, or the fetch is degraded."""


class EntitySpec(_Model):
    join_key: str
    """Feast join key, e.g. ``driver_id``."""
    type: Literal["int64", "string"] = "int64"
    """Type the key's value must have in requests."""


VERSION_SEPARATOR = ":"
"""Between a model and its pinned version in a variant reference: ``ranker:2``."""


def split_ref(ref: str) -> tuple[str, str]:
    """``"ranker:2"`` → ``("ranker", "2")``; ``"ranker"`` → ``("ranker", "")`` (see ``VariantConfig.ref``)."""
    model, sep, version = ref.rpartition(VERSION_SEPARATOR)
    return (model, version) if sep and model and version.isdigit() else (ref, "")


class VariantConfig(_Model):
    model: str
    """Triton model name."""
    version: str = ""
    """Triton model version the variant's calls name (e.g. "2"); empty: none, so Triton
    serves them from the highest-numbered version its ``version_policy`` keeps loaded. A
    pinned version Triton has not loaded (yet) leaves the variant out of route selection
    until it is loaded; the router warms it up first (docs/models.md, "New versions")."""
    features: list[str]
    """Feature names, in the model's input column order."""
    input_name: str = "features"
    output_name: str = "score"
    device: str = "cpu"
    """Device class the variant runs on (a key of ``device_classes``): its cost per hour."""
    parallelism: int = Field(2, ge=1)
    """Requests the variant serves at once (Triton instances × batch); route selection's
    latency prediction assumes in-flight work beyond it queues."""

    @field_validator("version")
    @classmethod
    def _version_number(cls, version: str) -> str:
        if version and not (version.isdigit() and version.isascii() and int(version) > 0):
            raise ValueError(
                f'{version!r} is not a Triton model version: a positive number such as "2" '
                "(or leave it out to follow the model's version_policy)"
            )
        return version

    @property
    def ref(self) -> str:
        """How tenants' ``pin`` and ``canary`` name this variant, and the key of its readiness,
        circuit breaker and latency statistics: ``model``, or ``model:version`` when pinned."""
        return f"{self.model}{VERSION_SEPARATOR}{self.version}" if self.version else self.model


class PostprocessConfig(_Model):
    threshold: float = 0.5
    """Scores at or above the threshold get ``decision_above``."""
    decision_above: str = "accept"
    decision_below: str = "reject"
    top_k: int = Field(10, ge=1)
    """Predictions returned when the request does not set top_k."""
    score_min: float = 0.0
    score_max: float = 1.0


class BudgetsConfig(_Model):
    """Per-layer budgets in ms; the deadline planner (issue 3) divides the caller's deadline."""

    features_ms: float = Field(20.0, gt=0)
    model_ms: float = Field(60.0, gt=0)
    post_ms: float = Field(5.0, gt=0)
    fallback_reserve_ms: float = Field(5.0, ge=0)
    stream_ms: float = Field(5_000.0, gt=0)
    """Stream inference (``inferline stream run``): an event older than its time + this is answered
    by the degradation ladder, not queued for the primary; ``--budget-ms`` overrides it."""
    stretch_features: bool = False
    """True lets the features read run past ``features_ms`` into the time the model will not
    need (a few times its recent latency; ``RoutePlan.features_deadline``). Off by default: it
    turns the rare slow read of an idle router into a PRIMARY answer, but when the store is the
    bottleneck (the embedded SQLite store, reads serialised on one thread) answers wait on it
    instead of degrading at ``features_ms``, and every latency-driven limit (the gateway's,
    admission's) sheds on that latency: through the gateway at 625 req/s it answered 383 a
    second in time, against 542 at 781 req/s with it off (benchmarks/overload.py)."""


class BaselineSegment(_Model):
    below: float
    """Upper bound (exclusive) of the segment feature's value."""
    score: float = Field(ge=0, le=1)


class BaselineConfig(_Model):
    """The route's safe baseline: a constant, or a prior per segment of one feature's value."""

    score: float = Field(0.5, ge=0, le=1)
    """Score when no segment applies."""
    segment_feature: str | None = None
    """Feature whose value picks the segment (None: the constant ``score``)."""
    segments: list[BaselineSegment] = []
    """Segments in increasing ``below`` order; a value at or above the last uses ``score``."""

    @model_validator(mode="after")
    def _segments_sorted(self) -> BaselineConfig:
        bounds = [s.below for s in self.segments]
        if bounds != sorted(bounds):
            raise ValueError("segments must be in increasing 'below' order")
        if self.segments and self.segment_feature is None:
            raise ValueError("segments need a segment_feature")
        return self


class DegradationConfig(_Model):
    cache_ttl_s: float = Field(3600.0, gt=0)
    """How long a good answer is kept in the score cache."""
    max_staleness_s: float = Field(600.0, gt=0)
    """Oldest cached score this route will still serve."""
    light_in_process: bool = True
    """Run the light model's ONNX file in-process (embedded) instead of on Triton."""
    baseline: BaselineConfig = BaselineConfig()


class BreakerConfig(_Model):
    """Circuit breaker per model variant, over a sliding window of outcomes."""

    window_s: float = Field(10.0, gt=0)
    min_calls: int = Field(20, ge=1)
    """Calls in the window before the failure rate is judged."""
    failure_rate: float = Field(0.5, gt=0, le=1)
    """Share of failed or timed-out calls that opens the breaker."""
    open_s: float = Field(1.0, gt=0)
    """How long the breaker stays open before half-open probes."""
    half_open_probes: int = Field(3, ge=1)
    """Successful probes needed to close again."""


class AdmissionConfig(_Model):
    """Adaptive concurrency limit of a route and what happens to requests over it."""

    enabled: bool = True
    """False admits everything (the in-flight bound and degradation still apply)."""
    algorithm: Literal["gradient", "aimd"] = "gradient"
    """``gradient``: Netflix's Gradient2 (limit follows the ratio of long- to short-term latency);
    ``aimd``: additive increase, multiplicative decrease on a latency over ``aimd_latency_ms``."""
    initial_limit: int = Field(20, ge=1)
    """Where the limit starts: low, so a route proves its capacity before it is trusted with more."""
    min_limit: int = Field(16, ge=1)
    max_limit: int = Field(512, ge=1)
    tolerance: float = Field(2.5, ge=1)
    """Gradient: how much the short-term latency may exceed the long-term one before the limit shrinks.
    Higher than Netflix's 1.5: a serving path with a deadline may run slower than unloaded as long as it
    fits; at 1.5 the limit shed batch traffic at 70% of the router's capacity (inferline bench sweep)."""
    aimd_latency_ms: float = Field(50.0, gt=0)
    """AIMD: a request slower than this counts as a drop and shrinks the limit."""
    aimd_backoff: float = Field(0.9, gt=0, lt=1)
    degrade_over_limit: bool = True
    """A request of a class that may not be shed, over the limit, gets a degraded answer (OVERLOAD)
    instead of RESOURCE_EXHAUSTED."""
    protected_miss_rate: float | None = Field(0.02, gt=0, le=1)
    """While more than this share of the route's recent answers to classes that may not be shed
    missed their deadline (degraded for it, or DEADLINE_EXCEEDED; an average over about the
    last 50 such answers), every sheddable class is shed: by the gateway on its signal, and by
    the router for direct calls. A miss counts only when its request queued (5 ms or more
    before its handler, or the router's queue wait that high when it came) and its deadline
    was long enough for the main path on an idle router: a deadline too short for any router
    is not the lower classes' doing. None: off, only the queue-wait targets and the limit's
    shares shed."""

    @model_validator(mode="after")
    def _limits_ordered(self) -> AdmissionConfig:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need min_limit <= initial_limit <= max_limit")
        return self


class RouteConfig(_Model):
    entity: EntitySpec
    max_entities: int = Field(100, ge=1)
    """Requests with more entities are refused with INVALID_ARGUMENT."""
    features: list[FeatureSpec]
    primary: VariantConfig
    light: VariantConfig | None = None
    """The light model of the degradation path (needs only the features it lists)."""
    alternates: list[VariantConfig] = []
    """Full-quality variants besides ``primary`` (e.g. primary on GPU, alternate on CPU), in
    order of preference: route selection spills to them when the primary's predicted
    latency does not fit the budget, and batch traffic takes the cheapest that fits."""
    postprocess: PostprocessConfig = PostprocessConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    degradation: DegradationConfig = DegradationConfig()
    max_in_flight: int = Field(64, ge=1)
    """Calls in flight to the primary model at most; beyond it requests degrade (OVERLOAD)."""
    admission: AdmissionConfig = AdmissionConfig()

    @property
    def full_variants(self) -> list[VariantConfig]:
        """The variants that give a PRIMARY answer: the primary, then the alternates."""
        return [self.primary, *self.alternates]

    @property
    def all_variants(self) -> list[VariantConfig]:
        """Every model the route may call: primary, alternates and light."""
        return [*self.full_variants, *([self.light] if self.light is not None else [])]

    @model_validator(mode="after")
    def _variants_use_declared_features(self) -> RouteConfig:
        declared = {f.name for f in self.features}
        labelled = [("primary", self.primary), *((f"alternates[{i}]", v) for i, v in enumerate(self.alternates))]
        for label, variant in [*labelled, ("light", self.light)]:
            if variant is None:
                continue
            unknown = [f for f in variant.features if f not in declared]
            if unknown:
                raise ValueError(f"{label}.features names undeclared features {unknown}")
        segment = self.degradation.baseline.segment_feature
        if segment is not None and segment not in declared:
            raise ValueError(f"degradation.baseline.segment_feature {segment!r} is not a declared feature")
        return self


class TrafficClassConfig(_Model):
    priority: int = Field(ge=1, le=3)
    """Triton priority level (1 is the highest)."""
    default_deadline_ms: float = Field(gt=0)
    """Deadline used when the caller sets none."""
    sheddable: bool = True
    """May be rejected (RESOURCE_EXHAUSTED) under overload; a class that may not is degraded instead."""
    limit_share: float = Field(1.0, gt=0, le=1)
    """Share of a route's concurrency limit this class may fill: lower classes get smaller shares,
    so they are shed first as in-flight work grows."""
    queue_wait_target_ms: float = Field(50.0, gt=0)
    """Queue wait (the router's event-loop lag) above which this class is shed."""
    prefer_cheapest: bool = False
    """Route selection picks the cheapest variant that fits the budget (batch traffic),
    instead of the first in preference order."""


class CanaryConfig(_Model):
    model: str
    """A variant of the route (its primary or one of its alternates), by its ``ref``: the
    model's name, or ``model:version`` for a variant that pins a version (a new version of
    the same model as a canary)."""
    share: float = Field(gt=0, le=1)
    """Share of requests sent to it (chosen per request id, so a retried request stays put)."""


class QuotaConfig(_Model):
    """A tenant's token bucket: ``rate_per_s`` sustained, bursts of up to ``burst`` requests."""

    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)


class KServeModelConfig(_Model):
    """A tensor-in/tensor-out model served through the router's KServe v2 front door only
    (``models.<name>``, the Triton model's name): no route, no entity, no features; the
    caller's tensors go to Triton as sent, after the same gate as every call (key, tenant,
    traffic class, quota, admission, deadline). Tenants name it in their ``models`` list.

    A model that a route calls as well may have an entry too: the entry then sets its
    front door (classes, deadline, quota, admission) for every tenant that calls it there.
    """

    traffic_classes: list[str] | None = None
    """Traffic classes the model may be called in (and the caller's tenant must allow the
    class too); None: any class of the tenant's."""
    default_traffic_class: str | None = None
    """The class of a call that names none; None: the tenant's ``default_traffic_class``."""
    deadline_ms: float | None = Field(None, gt=0)
    """The deadline of a call that sets none; None: its traffic class's ``default_deadline_ms``."""
    quota: QuotaConfig | None = None
    """Each tenant's own token bucket for this model, besides the tenant's ``quota``
    (RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED, beyond it); None: the tenant's quota only."""
    admission: AdmissionConfig = AdmissionConfig()
    """The model's adaptive concurrency limit (all tenants' front-door calls of it together)."""
    max_in_flight: int | None = Field(None, ge=1)
    """Calls in flight to the model at most; None: the ``max_in_flight`` of a route that
    calls it, else 64. A route that calls it must then have the same value (one bound per model)."""

    @model_validator(mode="after")
    def _default_class_allowed(self) -> KServeModelConfig:
        default, allowed = self.default_traffic_class, self.traffic_classes
        if default is not None and allowed is not None and default not in allowed:
            raise ValueError(f"default_traffic_class {default!r} is not one of its traffic_classes {allowed}")
        return self


class TenantConfig(_Model):
    api_key_sha256: list[str] = []
    """SHA-256 hex digests of the tenant's API keys (keys themselves are never stored)."""
    jwt_subjects: list[str] = []
    """JWT ``sub`` claims that resolve to this tenant (besides a ``tenant`` claim naming it)."""
    quota: QuotaConfig | None = None
    """Requests per second this tenant may send; None: unlimited."""
    pin: dict[str, str] = {}
    """Route → variant (its ``ref``: ``model`` or ``model:version``): this tenant's requests
    of the route always run on that variant while it is available."""
    canary: dict[str, CanaryConfig] = {}
    """Route → a variant that gets a share of this tenant's requests of the route."""
    routes: list[str] = []
    """Routes this tenant may call (``Predict``, and their models through the KServe front door)."""
    models: list[str] = []
    """Entries of ``models`` (KServe-only models) this tenant may call through the KServe front door."""
    traffic_classes: list[str] = ["critical", "standard", "batch"]
    default_traffic_class: str = "standard"

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for d in digests:
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError("each entry must be a lowercase 64-character SHA-256 hex digest")
        return digests


class JwtKeyConfig(_Model):
    """One key JWTs may be signed with: an HS256 secret (from the environment) or an RS256 public key."""

    kid: str | None = None
    """Key id; a token whose header names a ``kid`` is checked only against the key with that id."""
    algorithm: Literal["HS256", "RS256"]
    secret_env: str | None = None
    """HS256: name of the environment variable holding the shared secret (never the secret itself)."""
    public_key_file: pathlib.Path | None = None
    """RS256: PEM file of the public key (relative paths are from the config file)."""

    @model_validator(mode="after")
    def _material_matches_algorithm(self) -> JwtKeyConfig:
        if self.algorithm == "HS256" and (self.secret_env is None or self.public_key_file is not None):
            raise ValueError("HS256 keys need secret_env (and no public_key_file)")
        if self.algorithm == "RS256" and (self.public_key_file is None or self.secret_env is not None):
            raise ValueError("RS256 keys need public_key_file (and no secret_env)")
        return self


class JwtConfig(_Model):
    """Bearer JWTs accepted besides API keys."""

    issuer: str | None = None
    """Required ``iss`` claim; None accepts any issuer."""
    audience: str | None = None
    """Required ``aud`` claim; None: tokens must not carry one."""
    tenant_claim: str = "tenant"
    """Claim naming the tenant; when absent, ``sub`` is looked up in the tenants' ``jwt_subjects``."""
    leeway_s: float = Field(5.0, ge=0)
    """Clock skew tolerated on ``exp`` / ``nbf``."""
    max_lifetime_s: float | None = Field(None, gt=0)
    """Longest lifetime a token may have (``exp - iat``); tokens must then carry ``iat``. A
    stolen token with ``exp`` decades away is refused. None: any lifetime."""
    keys: list[JwtKeyConfig] = Field(min_length=1)


class RateLimitConfig(_Model):
    """Where tenants' token buckets live: this process (one replica) or Redis (shared by replicas)."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "inferline:quota"
    timeout_ms: float = Field(5.0, gt=0)
    """A Redis check slower than this is decided by the replica's local bucket instead (fail open
    to a local limit: a quota store outage never fails requests nor lifts every limit)."""


class FeatureStoreConfig(_Model):
    feast_repo: pathlib.Path = pathlib.Path("deploy/feast/feature_repo")
    """Feast repository (feature_store.yaml); relative paths are from the config file."""
    hot_cache_ttl_s: float = Field(30.0, ge=0)
    """How long fetched rows of an entity are reused; 0 disables the hot-entity cache."""
    hot_cache_max_entities: int = Field(100_000, ge=0)


class ScoreCacheConfig(_Model):
    """Where last good answers live: in memory (embedded) or Redis (suite, shared by replicas)."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_entries: int = Field(1_000_000, ge=1)
    """In-memory backend: entries kept at most (least recently written go first)."""
    timeout_ms: float = Field(5.0, gt=0)
    """A cache read slower than this counts as a miss; a cache never fails a request."""
    key_prefix: str = "inferline"


class ClassShedConfig(_Model):
    """Envoy's shedding of one traffic class on its success rate (``gateway.shed_by: success_rate``)."""

    sr_threshold: float = Field(0.85, gt=0, le=1)
    """Below this success rate of the class's recent requests, Envoy starts rejecting some of them.
    (0.95 shed 35 % of batch already at the router's knee in benchmarks/overload.py; 0.85 shed 9 %.)"""
    window_s: float = Field(2.0, gt=0)
    """The sliding window the success rate is measured over."""
    aggression: float = Field(1.5, ge=1)
    """How steeply the rejection probability rises as the success rate falls."""
    max_rejection_probability: float = Field(0.95, gt=0, le=1)
    rps_threshold: int = Field(5, ge=0)
    """Envoy sheds the class only while it sends at least this many requests a second: a few
    failures of a trickle of traffic are no overload."""


class ShedSignalConfig(_Model):
    """How Envoy follows the routers' overload signal (``gateway.shed_by: signal``).

    Every answer to a gateway request names the classes its route's admission refuses right
    now (``x-inferline-overloaded``). Envoy keeps a shed probability per class (per worker
    thread): up by ``step_up`` on each answer naming the class, down by ``step_down`` on each
    that does not, at most ``max_probability``. It settles where about
    ``step_down / (step_up + step_down)`` of answers name the class (4 % by default): the
    routers stay at the edge of shedding it and shed few themselves — a router's shed comes
    after the call waited in its transport queue (tens of ms under overload), Envoy's in ~1 ms.
    After an overload the probability falls to 0 within ``max_probability / step_down``
    answers (~1 s at a few hundred answers a second).
    """

    step_up: float = Field(0.05, gt=0, le=1)
    step_down: float = Field(0.002, gt=0, le=1)
    max_probability: float = Field(0.99, gt=0, le=1)


class InFlightConfig(_Model):
    """How many requests of the ``gateway.shed`` classes Envoy lets be outstanding at the routers.

    The backlog a Python router cannot shed fast is the one in its gRPC transport, before the
    handler runs: a router's own shed waits there (tens of ms under overload). Envoy keeps
    that backlog short for the shed classes, refusing the rest of a burst at once
    (RESOURCE_EXHAUSTED), while the shed signal catches up. Calls whose class header names
    another class (critical) are never held; calls without the header are held like the
    shed classes'.

    ``adaptive``: Envoy's gradient controller (``adaptive_concurrency``), in the style of
    Netflix's concurrency-limits. It measures the routers' unloaded latency (minRTT, with the
    limit pinned to ``min_concurrency`` for ``min_rtt_requests`` answers every
    ``min_rtt_interval_s``), then every ``update_interval_s`` scales the limit by
    (minRTT × (1 + ``buffer``)) / (the ``latency_percentile`` of recent answers), plus a
    little headroom: as the routers' queue lengthens their latency rises and the limit falls.
    It needs no tuning per machine; the limit is for all replicas together. A minRTT sampled
    while the routers were busy with the classes Envoy never holds (critical) is high, and
    the limit with it; ``min_rtt_ms`` fixes minRTT instead, turning the limit into a latency
    target (the percentile held under ``min_rtt_ms`` × (1 + ``buffer``)).
    ``max_per_router``: a fixed cap on top (an Envoy circuit breaker, this × the replicas in
    ``gateway.routers``); None for none; ``kserve_max_per_router`` the same for the KServe
    front door's calls. Envoy samples every answer that passes the adaptive
    filter, its own later local replies included (envoyproxy/envoy#8274): the cap's refusals
    and "no healthy router" replies read as fast answers and let the adaptive limit rise (the
    cap itself still holds).
    """

    adaptive: bool = True
    latency_percentile: float = Field(50.0, gt=0, le=100)
    """The percentile of recent answer latencies compared with minRTT (50: the median; a
    higher one reacts to the tail, and sheds more of the lower classes at 1× load)."""
    buffer: float = Field(0.1, ge=0, le=1)
    """The share above minRTT that still counts as unloaded."""
    update_interval_s: float = Field(0.1, gt=0)
    min_rtt_interval_s: float = Field(30.0, gt=0)
    min_rtt_requests: int = Field(50, ge=1)
    min_rtt_ms: float | None = Field(None, gt=0)
    """A fixed minRTT in ms instead of sampling it (``min_rtt_interval_s`` and
    ``min_rtt_requests`` then do nothing); None: sampled."""
    min_concurrency: int = Field(3, ge=1)
    max_limit: int = Field(1000, ge=1)
    max_per_router: int | None = Field(None, gt=0)
    kserve_max_per_router: int | None = Field(None, gt=0)
    """The fixed cap of the KServe front door's calls (``inference.GRPCInferenceService``),
    which reach the routers through an Envoy cluster of their own; ``max_per_router`` caps
    the other services' calls. A tensor pass-through costs a router far less than a
    ``Predict``, so one cap does not fit both. None: no fixed cap for them."""
    kserve_protected_max_per_router: int | None = Field(None, gt=0)
    """A fixed cap of the KServe front door's calls of the classes the gateway never sheds
    (critical), which neither limit above touches. A tensor call has no degraded answer: one
    that would wait in a router's gRPC transport past its deadline is better refused at once
    (RESOURCE_EXHAUSTED) than answered late, and the router's CPU goes to the calls that can
    still make theirs. Size it as the calls a router answers within a deadline: its rate at
    the knee × the deadline, less the time of an answer. None: unbounded."""


class GatewayAccessLogConfig(_Model):
    """Envoy's access log of the gateway: one JSON object a line (``docs/operations.md``)."""

    path: str = Field(min_length=1)
    """The file Envoy appends to (``/dev/stdout`` in a container)."""
    all_calls: bool = False
    """False: only the calls Envoy answered itself: its sheds (the class, why, and how long
    Envoy took), the in-flight caps' refusals, route timeouts, calls no router could take and
    callers' resets. True: every call (a line per call: mind the rate)."""


class GatewayConfig(_Model):
    """The Envoy ingress in front of the router replicas (``inferline gateway render``)."""

    embedded: bool = True
    """``inferline up`` starts Envoy on the public port (``server.host:server.port``) in front
    of the router, which listens on a loopback port; ``up --no-gateway`` overrides it."""

    port: int = Field(8080, ge=0, le=65535)
    admin_port: int = Field(9901, ge=0, le=65535)
    routers: list[str] = ["127.0.0.1:50051"]
    """host:port of each router replica; Envoy balances requests (not connections) over them."""
    protected_routers: list[str] = []
    """host:port of router replicas that take only the calls of the classes the gateway never
    sheds (those not in ``shed``: critical), a lane of their own; the ``routers`` take the rest,
    and the protected calls too while no lane replica is healthy. Empty: every router takes
    every class. In one router's gRPC transport every call waits first come, first served,
    so under overload critical calls wait behind the queue of the lower classes; in a lane
    they wait only behind each other. Ignored while ``shed`` names no class (every class is
    then protected, and the lane would take every call)."""
    protected_lane: bool = False
    """``inferline up`` (with the embedded gateway) starts one more router process, the lane of
    ``protected_routers``, at ``protected_lane_boost`` steps of CPU niceness above the others:
    on shared cores a critical call then neither queues behind the lower classes nor waits
    for a core behind them (measured: docs/performance.md)."""
    protected_lane_boost: int = Field(5, ge=0, le=19)
    """The lane's CPU niceness above the other router processes (``nice``; needs
    CAP_SYS_NICE, else the lane runs at their priority, with one warning line). 0: the same."""

    @property
    def starts_protected_lane(self) -> bool:
        """Whether ``inferline up`` (with the embedded gateway) starts the lane: ``protected_lane``
        is set and ``shed`` names a class (with none shed every class is protected, and the lane
        would take every call)."""
        return self.protected_lane and bool(self.shed)

    tls: TlsServerConfig | None = None
    """TLS on Envoy's listener (ALPN h2 and http/1.1; mutual TLS when ``client_ca_file`` is
    set); None: plain text. The paths are Envoy's, read by Envoy when it starts."""
    upstream_tls: TlsClientConfig | None = None
    """TLS from Envoy to the routers, health checks included; the routers' ``server.tls``
    must match (set ``cert_file`` when it requires client certificates). ``server_name``
    None: the certificate must name one of the ``routers`` hosts."""
    shed: dict[str, ClassShedConfig] = {}
    """Traffic classes Envoy may shed on its own (C++, before any Python runs), by the
    ``x-inferline-traffic-class`` request header; a class not listed is always forwarded.
    The per-class settings are those of ``shed_by: success_rate``."""
    shed_by: Literal["signal", "success_rate"] = "signal"
    """``signal``: on the routers' own overload signal (``x-inferline-overloaded`` on their
    answers; ``signal``), before the routers fail. ``success_rate``: when the class's success
    rate falls (Envoy's admission_control), for routers that do not send the signal."""
    signal: ShedSignalConfig = ShedSignalConfig()
    in_flight: InFlightConfig = InFlightConfig()
    max_request_bytes: int = Field(1 << 20, gt=0)
    priority_boost: int = Field(5, ge=0, le=19)
    """``inferline up``'s embedded Envoy runs this many steps of CPU niceness above the router
    (``nice -n -N``): on a machine the router, Triton and Envoy share, a refusal then does not
    wait behind the work it protects (shed latency), and the in-flight limit sees the
    routers' latency rather than Envoy's own queue. Raising a priority needs CAP_SYS_NICE
    (root, or the capability in a container); without it Envoy runs at the router's
    priority, with one warning line. 0: the same priority."""
    own_cpu_group: bool = False
    """``inferline up``'s embedded Envoy runs in a session of its own, so that on Linux's
    autogrouping scheduler (``/proc/sys/kernel/sched_autogroup_enabled``) it has a CPU group of
    its own beside the router's and Triton's, as a sidecar container has a cgroup of its own.
    In the router's group a woken Envoy waits for that group's turn, which the routers it
    protects have nearly always used: with callers on other cores, refusals took 8–26 ms p99 at
    2–3× the knee against 2.4–3.1 ms in a group of its own (docs/performance.md). Off by default:
    with callers on the same cores at high call rates, Envoy in its own group passed more of
    the lower classes to the routers and critical calls missed more (KServe at 2× of 1,192 calls
    a second on 2 shared cores: 84–89 % in time against 97–99 %). On for a host whose callers
    are elsewhere. Autogroups apply only to processes in the root CPU cgroup: inside a container
    or a systemd slice the cgroup decides and a session changes nothing. With it on, Envoy is outside
    the router's process group, as the bundled Triton is: a signal to the router's group (Ctrl-C)
    does not reach it; ``inferline up`` stops it on exit, and the kernel does if the router is
    killed outright (``inferline.core.processes.spawn_tethered``)."""
    rest: bool = True
    """REST callers: ``POST /inferline.v1.Inference/<Method>`` with a JSON body is transcoded to
    the gRPC call by Envoy (same routes, shedding and authentication as gRPC callers)."""
    access_log: GatewayAccessLogConfig | None = None
    """Envoy's access log (of its own answers, or of every call); None: none."""
    max_connections: int = Field(20_000, ge=1)
    """Callers' connections Envoy holds open at once (its overload manager's
    ``global_downstream_max_connections``); it refuses more at accept, so a flood of
    connections cannot take the file descriptors or memory the open ones need. Keep it under
    Envoy's open-file limit (``ulimit -n``): its own upstream connections and files need some."""
    secret_env: str = Field("INFERLINE_GATEWAY_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the per-deployment gateway secret (at least
    16 characters), set alike for Envoy and the routers. Envoy adds it to every call it
    forwards (``x-inferline-gateway-secret``, a caller's copy dropped first); a router acts
    on the gateway's headers (the ingress wait it sheds on) only when it matches. Unset on a
    router: no call is taken for a gateway call, and the gateway headers are ignored."""


class ServiceAddresses(_Model):
    """Where the router reaches the other services; None means in-process (embedded)."""

    features: str | None = None
    postprocess: str | None = None
    degradation: str | None = None
    tls: TlsClientConfig | None = None
    """TLS on the router's connections to the remote services (their ``server.tls``); None:
    plain text."""
    secret_env: str = Field("INFERLINE_SERVICE_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the secret (at least 32 characters) that signs
    the service tokens between a router and the internal services (``core.service_auth``). An
    internal service (``inferline serve features|postprocess|degradation``) refuses to start
    without it, and answers only calls carrying a valid token of an allowed role."""
    token_lifetime_s: float = Field(300.0, gt=0, le=3600)
    """Lifetime of a service token; a router signs a new one when half of it is gone."""


class TracingConfig(_Model):
    """OpenTelemetry spans per request and per layer; off by default (no cost when off)."""

    enabled: bool = False
    exporter: Literal["otlp", "console"] = "otlp"
    """``otlp``: OTLP over gRPC to ``endpoint`` (a collector); ``console``: printed (debugging)."""
    endpoint: str = "http://127.0.0.1:4317"
    service_name: str = "inferline-router"
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of requests traced (parent-based, by trace id)."""


class DeviceClassConfig(_Model):
    cost_per_hour: float = Field(ge=0)
    """What an hour of this device costs (any currency; used for cost per 1K requests)."""


class ValidationConfig(_Model):
    """The check of every route against Triton's models and the Feast registry at start-up
    (and ``inferline models check``): names, datatypes, widths, max batch size, feature views."""

    on_mismatch: Literal["refuse", "not_serving"] = "refuse"
    """``refuse``: a mismatch stops start-up (exit 2), one line per mismatch naming the route,
    variant and field; ``not_serving``: start anyway, the mismatched routes degraded and their
    health (``inferline.route.<name>``) NOT_SERVING."""


class BatchJobsConfig(_Model):
    """The ``BatchJobs`` gRPC service of the router (docs/batch.md): batch jobs submitted by
    callers, run by the serving process in child processes. Off (not served) while ``input_root`` is unset."""

    input_root: pathlib.Path | None = None
    """Directory of the jobs' input files: a tenant's job reads only under ``input_root/<tenant>/``."""
    output_root: pathlib.Path | None = None
    """Directory of the jobs' outputs: a tenant's job writes only under ``output_root/<tenant>/``."""
    state_path: pathlib.Path | None = None
    """SQLite file of the jobs' state (what a restarted service resumes); None:
    ``output_root/_batch_jobs.sqlite``. Processes sharing it (``--workers``) share the jobs."""
    state_url: str | None = None
    """Postgres instead of the SQLite file: a libpq URL (``postgresql://user@host:5432/db``),
    for router replicas on several hosts sharing the jobs (SQLite serves one host). Give the
    jobs a database, or a schema (``?options=-csearch_path%3Dname``), of their own."""
    max_running: int = Field(2, ge=1, le=64)
    """Jobs running at once in one serving process; more wait QUEUED."""
    max_jobs_per_tenant: int = Field(20, ge=1)
    """Jobs one tenant may have queued or running at once (RESOURCE_EXHAUSTED beyond)."""
    lease_s: float = Field(10.0, ge=1)
    """A running job's owner renews its claim this often ×⅓; a job whose owner died (SIGKILL)
    is taken over by another process, or the restarted one, after this long."""
    retention_days: float = Field(30.0, gt=0)
    """An ended job's row (state, progress, error) is deleted this long after it ended; its
    output and errors file stay. Get then answers NOT_FOUND, and its ``request_id`` may create
    a new job."""
    process_nice: int = Field(19, ge=0, le=19)
    """Each job runs in a child process of its own, this many steps of CPU niceness below the
    router: a job's Python (Feast reads, parsing, part files) then neither holds the router's
    GIL nor takes CPU an online request is waiting for. 0: the router's own priority. 19 (the
    lowest priority) rather than 10: beside a flat-out job the online p99 was 20 against 37 ms
    (medians of 6 phases, 2-core VM) for 2 % of the job's rate (docs/batch.md)."""
    run_jobs: bool = True
    """Whether this process runs jobs. False: it serves the service (Submit, Get, List and
    Cancel go through the shared state store) and leaves running them to the processes that
    share its state. The protected lane's router (``gateway.protected_lane``) runs none: it
    is there for critical calls, and a job it started would inherit its raised priority."""
    feature_processes: int = Field(2, ge=0, le=64)
    """Worker processes of each job for its online feature reads (at the job's niceness); 0 or
    1: a thread of the job's process. Fewer than ``batch run``'s default (the CPUs, at most 4):
    the jobs share the router's host, ``max_running`` at once, each worker with a Feast store."""

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("a Postgres URL: postgresql://USER@HOST:PORT/DATABASE")
        return url

    @model_validator(mode="after")
    def _roots_together(self) -> BatchJobsConfig:
        if (self.input_root is None) != (self.output_root is None):
            raise ValueError("set input_root and output_root together (or neither: the service is off)")
        if self.state_url is not None and self.state_path is not None:
            raise ValueError("state_path (SQLite) and state_url (Postgres) name two stores: set one")
        return self

    @property
    def enabled(self) -> bool:
        return self.input_root is not None


class ModelScalingConfig(_Model):
    """Bounds of one model's Triton instance count (``autoscale.models.<model>``)."""

    min_instances: int = Field(1, ge=1)
    """The warm pool: instances always loaded and warmed up, so a step in load meets ready capacity."""
    max_instances: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> ModelScalingConfig:
        if self.max_instances < self.min_instances:
            raise ValueError(f"max_instances ({self.max_instances}) < min_instances ({self.min_instances})")
        return self


class AutoscalerConfig(_Model):
    """The ``autoscale`` section: Triton instance counts that follow queue time
    (``inferline.triton.autoscaler``, docs/deploy.md). ``inferline up`` runs the controller
    when the section is present and ``enabled``; absent, instance counts stay as the model
    repository sets them (the controller reloads models, so it is never on unasked)."""

    enabled: bool = True
    """``false`` keeps the section but runs no controller (``INFERLINE_AUTOSCALE__ENABLED=false``)."""
    models: dict[str, ModelScalingConfig] = Field(min_length=1)
    """Triton model name → its bounds; the same rules below apply to every model."""
    interval_s: float = Field(1.0, gt=0)
    """Seconds between samples of Triton's statistics."""
    scale_up_queue_ms: float = Field(5.0, gt=0)
    """Add instances when the mean queue time per request over an interval is above this."""
    scale_up_after_s: float = Field(0.0, ge=0)
    """How long the queue must stay above ``scale_up_queue_ms`` before instances are added (0: at
    the first long interval). A mean over the few requests of a quiet interval jumps with one
    slow answer; this keeps such blips from adding capacity, at this much delay on a real step."""
    scale_down_queue_ms: float = Field(1.0, ge=0)
    """An interval below this (or without requests) is quiet."""
    scale_down_after_s: float = Field(60.0, ge=0)
    """How long the queue must stay quiet before an instance is removed."""
    up_cooldown_s: float = Field(5.0, ge=0)
    """No new change this soon after one: the added instances must show in the figures first."""
    down_cooldown_s: float = Field(60.0, ge=0)
    """No removal this soon after the last change."""
    step_up: int = Field(1, ge=1)
    """Instances added per decision."""

    @model_validator(mode="after")
    def _thresholds(self) -> AutoscalerConfig:
        if self.scale_down_queue_ms >= self.scale_up_queue_ms:
            raise ValueError(
                f"scale_down_queue_ms ({self.scale_down_queue_ms}) must be below scale_up_queue_ms "
                f"({self.scale_up_queue_ms}), else the count oscillates"
            )
        return self


class InferlineConfig(_Model):
    server: ServerConfig = ServerConfig()
    triton: TritonConfig = TritonConfig()
    feature_store: FeatureStoreConfig = FeatureStoreConfig()
    services: ServiceAddresses = ServiceAddresses()
    score_cache: ScoreCacheConfig = ScoreCacheConfig()
    breaker: BreakerConfig = BreakerConfig()
    jwt: JwtConfig | None = None
    """JWT bearer tokens; None accepts API keys only."""
    rate_limit: RateLimitConfig = RateLimitConfig()
    tracing: TracingConfig = TracingConfig()
    gateway: GatewayConfig = GatewayConfig()
    validation: ValidationConfig = ValidationConfig()
    batch_jobs: BatchJobsConfig = BatchJobsConfig()
    device_classes: dict[str, DeviceClassConfig] = {
        "cpu": DeviceClassConfig(cost_per_hour=0.20),
        "gpu": DeviceClassConfig(cost_per_hour=3.00),
    }
    traffic_classes: dict[str, TrafficClassConfig]
    tenants: dict[str, TenantConfig]
    routes: dict[str, RouteConfig]
    models: dict[str, KServeModelConfig] = {}
    """KServe-only models (tensor in, tensor out) by Triton model name: served by the KServe
    front door to the tenants that list them, loaded by the bundled Triton like the routes' models."""
    autoscale: AutoscalerConfig | None = None
    """Triton instance autoscaling run by ``inferline up``; None (the default): off."""

    @property
    def served_models(self) -> list[str]:
        """Every model the routes name (primary, alternates, light) and the KServe-only ``models``
        entries, each once, in that order: what the bundled server loads and the front door serves."""
        return list(dict.fromkeys([*(v.model for r in self.routes.values() for v in r.all_variants), *self.models]))

    @field_validator("traffic_classes")
    @classmethod
    def _class_names(cls, classes: dict[str, TrafficClassConfig]) -> dict[str, TrafficClassConfig]:
        """Class names travel in headers, comma-separated lists and Prometheus labels: keep them plain."""
        for name in classes:
            if not _CLASS_NAME.fullmatch(name):
                raise ValueError(f"traffic class name {name!r}: use letters, digits, '_' and '-' only")
        return classes

    @model_validator(mode="after")
    def _references_exist(self) -> InferlineConfig:
        for name, tenant in self.tenants.items():
            for route in tenant.routes:
                if route not in self.routes:
                    raise ValueError(f"tenants.{name}.routes: unknown route {route!r}")
            for cls in [*tenant.traffic_classes, tenant.default_traffic_class]:
                if cls not in self.traffic_classes:
                    raise ValueError(f"tenants.{name}: unknown traffic class {cls!r}")
            if not tenant.api_key_sha256 and self.jwt is None:
                raise ValueError(f"tenants.{name}: no way to authenticate (no api_key_sha256, and no jwt section)")
            if tenant.default_traffic_class not in tenant.traffic_classes:
                raise ValueError(
                    f"tenants.{name}.default_traffic_class: {tenant.default_traffic_class!r} is not one of "
                    "the tenant's traffic_classes"
                )
            for route, model in [*tenant.pin.items(), *((r, c.model) for r, c in tenant.canary.items())]:
                if route not in tenant.routes:
                    raise ValueError(f"tenants.{name}: pin/canary for route {route!r} the tenant may not call")
                refs = [v.ref for v in self.routes[route].full_variants]
                if model not in refs:
                    raise ValueError(
                        f"tenants.{name}: {model!r} is not a variant of route {route!r} (its variants: "
                        f"{', '.join(dict.fromkeys(refs))}; a pinned version is named model{VERSION_SEPARATOR}version)"
                    )
        for route_name, route_config in self.routes.items():
            for variant in route_config.all_variants:
                if variant.device not in self.device_classes:
                    raise ValueError(
                        f"routes.{route_name}: variant {variant.model!r} runs on unknown device {variant.device!r}"
                    )
        for cls in self.gateway.shed:
            if cls not in self.traffic_classes:
                raise ValueError(f"gateway.shed: unknown traffic class {cls!r}")
            if not self.traffic_classes[cls].sheddable:
                raise ValueError(f"gateway.shed: traffic class {cls!r} may not be shed (sheddable: false)")
        for cls in self.triton.class_copies.classes:
            if cls not in self.traffic_classes:
                raise ValueError(f"triton.class_copies.classes: unknown traffic class {cls!r}")
        if self.batch_jobs.enabled:
            for name in self.tenants:  # each tenant's jobs live in a directory named after it
                if not _CLASS_NAME.fullmatch(name):
                    raise ValueError(f"tenants.{name}: with batch_jobs on, use letters, digits, '_' and '-' only")
        return self

    @model_validator(mode="after")
    def _kserve_models(self) -> InferlineConfig:
        """Every name in ``models`` entries and ``tenants.*.models`` resolves, and a tenant can call what it lists."""
        for name, entry in self.models.items():
            for cls in [*(entry.traffic_classes or ()), *filter(None, [entry.default_traffic_class])]:
                if cls not in self.traffic_classes:
                    raise ValueError(f"models.{name}: unknown traffic class {cls!r}")
            for route_name, route in self.routes.items():
                calls = any(v.model == name for v in route.full_variants)
                if calls and entry.max_in_flight is not None and entry.max_in_flight != route.max_in_flight:
                    raise ValueError(
                        f"models.{name}.max_in_flight: {entry.max_in_flight}, but routes.{route_name} calls "
                        f"{name!r} with max_in_flight {route.max_in_flight} (one in-flight bound per model): "
                        "set them alike, or leave this one out"
                    )
        for tenant_name, tenant in self.tenants.items():
            for model in tenant.models:
                if model not in self.models:
                    known = ", ".join(self.models) or "none"
                    raise ValueError(
                        f"tenants.{tenant_name}.models: unknown model {model!r} (entries of models: {known}; "
                        "a route's models need no entry, the tenant's routes give access to them)"
                    )
                self._tenant_can_call(tenant_name, tenant, model, self.models[model])
        return self

    @model_validator(mode="after")
    def _autoscaled_models_served(self) -> InferlineConfig:
        """The controller scales models the bundled Triton loads: a typo must not pass silently."""
        if self.autoscale is not None:
            served = self.served_models
            for model in self.autoscale.models:
                if model not in served:
                    raise ValueError(
                        f"autoscale.models: unknown model {model!r} (the models the routes and models entries "
                        f"name: {', '.join(served) or 'none'})"
                    )
        return self

    @staticmethod
    def _tenant_can_call(tenant_name: str, tenant: TenantConfig, model: str, entry: KServeModelConfig) -> None:
        where = f"tenants.{tenant_name}.models"
        default = entry.default_traffic_class or tenant.default_traffic_class
        if entry.traffic_classes is not None and default not in entry.traffic_classes:
            raise ValueError(
                f"{where}: model {model!r} takes traffic classes {entry.traffic_classes}, not the tenant's "
                f"default {default!r}: set models.{model}.default_traffic_class"
            )
        if default not in tenant.traffic_classes:
            raise ValueError(
                f"{where}: models.{model}.default_traffic_class {default!r} is not one of the tenant's traffic_classes"
            )


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


def _set_dotted(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = yaml.safe_load(value)


# Hand-written instead of pydantic-settings' env source: the overlay is applied to the raw
# YAML tree *before* validation, so a bad override is reported with the same dotted path
# as a bad key in the file, and values are parsed as YAML (lists and maps work).
def apply_env_overrides(raw: dict[str, Any], environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """Overlay ``INFERLINE_A__B=value`` variables onto the raw YAML tree (values parsed as YAML)."""
    for name, value in environ.items():
        if name.startswith("INFERLINE_") and "__" in name:
            path = [p.lower() for p in name[len("INFERLINE_") :].split("__")]
            _set_dotted(raw, path, value)
    return raw


_Tls = TypeVar("_Tls", TlsServerConfig, TlsClientConfig)


def _resolve_paths(config: InferlineConfig, base: pathlib.Path) -> InferlineConfig:
    def resolve(p: pathlib.Path) -> pathlib.Path:
        return p if p.is_absolute() else (base / p).resolve()

    def resolve_tls(tls: _Tls | None) -> _Tls | None:
        if tls is None:
            return None
        paths = {name: resolve(value) for name, value in tls if isinstance(value, pathlib.Path)}
        return tls.model_copy(update=paths)

    triton = config.triton.model_copy(
        update={
            "model_repository": resolve(config.triton.model_repository),
            "server_env": resolve(config.triton.server_env),
            "tls": resolve_tls(config.triton.tls),
            "server_tls": resolve_tls(config.triton.server_tls),
        }
    )
    server = config.server.model_copy(update={"tls": resolve_tls(config.server.tls)})
    services = config.services.model_copy(update={"tls": resolve_tls(config.services.tls)})
    gateway = config.gateway.model_copy(
        update={"tls": resolve_tls(config.gateway.tls), "upstream_tls": resolve_tls(config.gateway.upstream_tls)}
    )
    store = config.feature_store.model_copy(update={"feast_repo": resolve(config.feature_store.feast_repo)})
    jwt = config.jwt
    if jwt is not None:
        keys = [
            k.model_copy(update={"public_key_file": resolve(k.public_key_file)}) if k.public_key_file else k
            for k in jwt.keys
        ]
        jwt = jwt.model_copy(update={"keys": keys})
    jobs = config.batch_jobs
    jobs = jobs.model_copy(update={name: resolve(value) for name, value in jobs if isinstance(value, pathlib.Path)})
    update = {"triton": triton, "feature_store": store, "jwt": jwt, "batch_jobs": jobs}
    return config.model_copy(update={**update, "server": server, "services": services, "gateway": gateway})


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], base_dir: pathlib.Path, source: str = "<config>") -> InferlineConfig:
    try:
        config = InferlineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration {source}:\n{format_validation_error(err)}") from err
    return _resolve_paths(config, base_dir)


def load_config(path: str | pathlib.Path, environ: dict[str, str] | None = None) -> InferlineConfig:
    """Read, override from the environment, and validate the config file at ``path``.

    Raises:
        ConfigError: naming the file and the dotted path of every bad key.
    """
    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read configuration {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration {path}: the top level must be a mapping")
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    return parse_config(raw, path.resolve().parent, str(path))
