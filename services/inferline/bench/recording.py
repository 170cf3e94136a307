"""Load targets for mixed traffic that record, per request, what answered it.

Three kinds of target, each called with the traffic class of the request (drawn from the
mix) and a tenant picked round robin from the API keys:

- ``predict``: inferline ``Predict``; the gRPC deadline is the request's deadline (the
  router owns it); the class also goes in ``x-inferline-traffic-class`` metadata, which
  an Envoy gateway in front sheds by; the answer's ``served_by`` is recorded.
- ``kserve``: the router's KServe v2 front door (``ModelInfer``), with the bearer token
  and the class in ``x-inferline-traffic-class`` metadata; gRPC deadline = the deadline.
- ``triton``: Triton directly (``ModelInfer``), with Triton's ``priority`` (from the class)
  and queue ``timeout`` (the deadline, µs) parameters, and a gRPC deadline
  ``client_grace_s`` past the deadline: a call in flight at Triton 2.51 is never cancelled
  (docs/triton.md); a late answer counts as a miss in the load generator.

Requests are pre-built before the run, so the hot path builds no messages: ``Predict`` ones
one per request by default (each draws its own entity ids, Zipf-distributed over the demo
store's drivers unless told otherwise, so the hot cache and the feature store both see the
run's real id distribution), KServe ones per class and used cyclically. Failures are
recorded (code and details, numbers masked) and re-raised, so the load generator sees the
same outcomes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc

from inferline.bench.loadgen import CallFn
from inferline.bench.mix import DEFAULT_PRIORITIES
from inferline.bench.targets import (
    DEFAULT_ZIPF_S,
    DEMO_API_KEY,
    DEMO_ENTITY_IDS,
    ENTITY_DISTRIBUTIONS,
    build_model_infer_request,
    entity_sampler,
)
from inferline.core.headers import TRAFFIC_CLASS
from inferline.v1 import inference_pb2, inference_pb2_grpc

TARGET_KINDS = ("predict", "kserve", "triton")
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
)


@dataclass(frozen=True)
class TargetSpec:
    """Where and how to send one target's requests (picklable: it travels to generator processes)."""

    kind: str
    """``predict``, ``kserve`` or ``triton`` (see the module docstring)."""
    url: str
    name: str = ""
    """Label in results (default: the kind)."""
    route: str = "driver_ranking"
    model: str = "driver_ranker"
    api_keys: tuple[str, ...] = (DEMO_API_KEY,)
    """Tenants' keys, used round robin (``predict`` and ``kserve``)."""
    join_key: str = "driver_id"
    entity_ids: tuple[int, int] = DEMO_ENTITY_IDS
    """Entity ids of ``predict`` requests are drawn from this closed range (default: every demo driver)."""
    entities: str = "zipf"
    """How entity ids are drawn: ``zipf`` (exponent ``zipf_s``, hot ids spread over the range) or ``uniform``."""
    zipf_s: float = DEFAULT_ZIPF_S
    metrics: str = ""
    """``predict``: the router's metrics endpoint (``HOST:PORT`` or URL), scraped around each run for
    the hot-cache hit rate and store reads; empty: not measured."""
    priorities: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PRIORITIES))
    """Triton priority level of each class (``triton``; an unknown class gets 0, the model's default)."""
    client_grace_s: float = 5.0
    """``triton``: the gRPC deadline is this much past the request's deadline."""
    pool_size: int = 0
    """``predict``: pre-built requests per class, used cyclically; 0 (default): one per request, none
    reused. KServe targets: per class, at most 64 (0: 64)."""
    connections: int = 1
    """Connections each generator spreads its calls over, round robin. A server reads a
    connection's streams in one go and answers them after its pass (Envoy does), so a whole
    load over one or two connections times that pass in every answer, a shed's included;
    many connections stand for many callers."""

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        if not self.api_keys:
            raise ValueError("give at least one API key")
        if self.entities not in ENTITY_DISTRIBUTIONS:
            raise ValueError(
                f"unknown entity distribution {self.entities!r}; choose one of {', '.join(ENTITY_DISTRIBUTIONS)}"
            )
        if not self.zipf_s > 0:
            raise ValueError(f"the Zipf exponent must be > 0, got {self.zipf_s}")
        if self.connections < 1:
            raise ValueError(f"a generator needs at least one connection, got {self.connections}")
        if not self.name:
            object.__setattr__(self, "name", self.kind)

    @property
    def has_served_by(self) -> bool:
        """Whether answers say what served them (only ``Predict`` answers do)."""
        return self.kind == "predict"

    def call_timeout_s(self, deadline_s: float) -> float:
        """The gRPC deadline of a call whose request has ``deadline_s``."""
        return deadline_s + self.client_grace_s if self.kind == "triton" else deadline_s


def parse_target(spec: str) -> tuple[str, str]:
    """``predict=127.0.0.1:50051`` → (kind, url); raises ValueError on a malformed spec."""
    kind, sep, url = spec.partition("=")
    kind, url = kind.strip(), url.strip()
    if not sep or not url:
        raise ValueError(f"targets look like KIND=HOST:PORT, got {spec!r}")
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r} in {spec!r}; choose one of {', '.join(TARGET_KINDS)}")
    return kind, url


def make_targets(specs: Sequence[str], **common: Any) -> tuple[TargetSpec, ...]:
    """A ``TargetSpec`` per ``KIND=HOST:PORT`` spec, with ``common`` fields; a repeated kind is named ``kind-N``."""
    out: list[TargetSpec] = []
    for spec in specs:
        kind, url = parse_target(spec)
        name = kind if all(t.name != kind for t in out) else f"{kind}-{len(out) + 1}"
        out.append(TargetSpec(kind, url, name, **common))
    return tuple(out)


@dataclass
class CallLog:
    """What a recording call saw, by request number."""

    served_by: list[int]
    """``ServedBy`` value of each OK ``Predict`` answer (0 for every other request or kind)."""
    error_details: dict[int, str] = field(default_factory=dict)
    """``CODE: details`` (numbers in the details replaced by #) of each failed call."""

    def details_of(self, indices: Iterable[int]) -> dict[str, int]:
        """Failed calls among request numbers ``indices``, counted by ``CODE: details``."""
        details = self.error_details
        return dict(Counter(details[i] for i in indices if i in details).most_common())


def _detail_key(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {re.sub(r'[0-9.]+', '#', exc.details() or '')[:100]}"
    return f"{type(exc).__name__}: {re.sub(r'[0-9.]+', '#', str(exc))[:100]}"


def _predict_requests(spec: TargetSpec, class_names: Sequence[str], classes: Sequence[int], seed: int) -> list[Any]:
    """The ``Predict`` request of every request number (shared messages when ``pool_size`` asks for reuse)."""
    sample = entity_sampler(spec.entities, spec.entity_ids, zipf_s=spec.zipf_s, seed=seed)
    key = inference_pb2.EntityKey

    def request(cls: str) -> Any:
        return inference_pb2.PredictRequest(
            route=spec.route, entities=[key(name=spec.join_key, int64_value=sample())], traffic_class=cls
        )

    if spec.pool_size <= 0:
        return [request(class_names[c]) for c in classes]
    pools = [[request(cls) for _ in range(spec.pool_size)] for cls in class_names]
    return [pools[c][i % spec.pool_size] for i, c in enumerate(classes)]


def _infer_pools(spec: TargetSpec, classes: Sequence[str], deadline_s: float, seed: int) -> list[list[Any]]:
    direct = spec.kind == "triton"
    size = min(spec.pool_size or 64, 64)  # the input values hardly matter to the model's cost
    return [
        [
            build_model_infer_request(
                spec.model,
                queue_timeout_us=int(deadline_s * 1e6) if direct else None,
                priority=spec.priorities.get(cls, 0) if direct else None,
                seed=seed * 1009 + k,
            )
            for k in range(size)
        ]
        for cls in classes
    ]


def recording_call(
    spec: TargetSpec,
    channels: Sequence[grpc.aio.Channel],
    class_names: Sequence[str],
    classes: Sequence[int],
    *,
    deadline_s: float,
    seed: int,
) -> tuple[CallFn, CallLog]:
    """A call of ``spec``'s kind for request ``i`` of class ``class_names[classes[i]]``, over
    ``channels[i % len(channels)]``.

    Returns the call and the log it fills. ``classes`` must cover every request number.
    """
    log = CallLog(served_by=[0] * len(classes))
    served, details = log.served_by, log.error_details
    timeout = spec.call_timeout_s(deadline_s)
    tenants = [("authorization", f"Bearer {key}") for key in spec.api_keys]
    n_tenants = len(tenants)
    if spec.kind == "predict":
        requests = _predict_requests(spec, class_names, classes, seed)
        methods = [inference_pb2_grpc.InferenceStub(channel).Predict for channel in channels]
        # The class travels in the body for the router and as metadata for Envoy, which
        # sheds lower classes by this header before the router sees them (gateway.shed).
        metadata: list[list[tuple[tuple[str, str], ...]]] = [
            [(t, (TRAFFIC_CLASS, cls)) for t in tenants] for cls in class_names
        ]
    else:
        pools = _infer_pools(spec, class_names, deadline_s, seed)
        requests = [pools[c][i % len(pools[c])] for i, c in enumerate(classes)]
        methods = [service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer for channel in channels]
        if spec.kind == "kserve":
            metadata = [[(t, (TRAFFIC_CLASS, cls)) for t in tenants] for cls in class_names]
        else:
            metadata = [[()] for _ in class_names]
            n_tenants = 1
    record_served = spec.has_served_by
    n_methods = len(methods)

    async def call(i: int) -> None:
        c = classes[i]
        try:
            response = await methods[i % n_methods](requests[i], metadata=metadata[c][i % n_tenants], timeout=timeout)
        except Exception as exc:
            details[i] = _detail_key(exc)
            raise
        if record_served:
            served[i] = response.served_by

    return call, log
