"""Load targets: raw gRPC stubs on a grpc.aio channel with pre-built request messages.

Each factory returns a ``Target`` whose ``call(i)`` sends one pre-built request (no
per-request message construction) and raises ``grpc.aio.AioRpcError`` on failure.

Triton targets never let the client cancel a call that Triton may still be running: the
bundled Triton 2.51 can crash (SIGSEGV) when in-flight gRPC calls are cancelled under
load (docs/triton.md). They send Triton's own queue ``timeout`` parameter
(microseconds) equal to the deadline, so late work is rejected by Triton itself, and set
the gRPC deadline ``client_grace_s`` past it; the load generator counts answers later
than the deadline as misses.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inferline.bench.loadgen import CallFn
from inferline.v1 import inference_pb2, inference_pb2_grpc

DEMO_API_KEY = "inferline-demo-key"
"""Development key of the ``demo`` tenant in deploy/local/inferline.yaml."""
DEMO_ENTITY_IDS = (1001, 101_000)
"""Closed range of the driver ids in the demo feature store (``inferline.demo.driver_data``,
filled by ``make setup``); a test keeps the two in step."""
ENTITY_DISTRIBUTIONS = ("zipf", "uniform")
DEFAULT_ZIPF_S = 1.1
"""Zipf exponent of the default entity sampler: a few hot entities, a long tail."""

_CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
)


@dataclass(frozen=True)
class Target:
    """A named load target and the channel it owns."""

    name: str
    call: CallFn
    channel: grpc.aio.Channel

    async def close(self) -> None:
        await self.channel.close(None)


def build_model_infer_request(
    model: str,
    rows: int = 1,
    *,
    input_name: str = "features",
    columns: int = 4,
    output_name: str | None = "score",
    queue_timeout_us: int | None = None,
    priority: int | None = None,
    seed: int = 0,
) -> Any:
    """A KServe v2 ``ModelInferRequest`` with one FP32 ``[rows, columns]`` input in raw_input_contents."""
    rng = random.Random(seed)
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = "FP32"
    tensor.shape.extend([rows, columns])
    values = [rng.random() for _ in range(rows * columns)]
    request.raw_input_contents.append(struct.pack(f"<{rows * columns}f", *values))
    if output_name is not None:
        request.outputs.add().name = output_name
    if queue_timeout_us is not None:
        request.parameters["timeout"].int64_param = queue_timeout_us
    if priority is not None:
        request.parameters["priority"].uint64_param = priority
    return request


def triton_target(
    url: str,
    model: str = "driver_ranker",
    rows: int = 1,
    *,
    deadline_s: float = 0.1,
    client_grace_s: float = 5.0,
    priority: int | None = None,
    name: str = "direct",
) -> Target:
    """Call ``ModelInfer`` of a KServe v2 endpoint (Triton, or a hop that forwards to it).

    The request carries Triton's queue ``timeout`` = ``deadline_s`` (in µs); the gRPC
    deadline is ``deadline_s + client_grace_s`` so the client does not cancel in-flight work.
    The grace is long (5 s) because past the knee answers queue in the client's and any
    hop's own event loop, not only in Triton's queue: seen here, >1.1 s at 2× the knee.
    """
    channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    request = build_model_infer_request(model, rows, queue_timeout_us=int(deadline_s * 1e6), priority=priority)
    timeout = deadline_s + client_grace_s

    async def call(i: int) -> None:
        await infer(request, timeout=timeout)

    return Target(name, call, channel)


def kserve_target(
    url: str,
    model: str = "driver_ranker",
    rows: int = 1,
    *,
    deadline_s: float = 0.1,
    api_key: str = DEMO_API_KEY,
    traffic_class: str = "critical",
    name: str = "kserve",
) -> Target:
    """Call ``ModelInfer`` of the router's KServe v2 front door, as an unmodified Triton client would.

    The tenant's key and the traffic class go as metadata (the class also as the request
    parameter the front door reads); the gRPC deadline is ``deadline_s``, which the router
    sends on as Triton's queue timeout (it never cancels a call in flight at Triton).
    """
    channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    request = build_model_infer_request(model, rows)
    request.parameters["traffic_class"].string_param = traffic_class
    metadata = (("authorization", f"Bearer {api_key}"),)

    async def call(i: int) -> None:
        await infer(request, metadata=metadata, timeout=deadline_s)

    return Target(name, call, channel)


def uniform_entity_ids(low: int = 1001, high: int = 2000, seed: int = 0) -> Callable[[], int]:
    """Sampler of entity ids uniform on ``[low, high]``."""
    rng = random.Random(seed)
    return lambda: rng.randint(low, high)


class ZipfEntityIds:
    """Entity ids on ``[low, high]`` drawn Zipf-distributed: the k-th most popular id has weight ``k**-s``.

    The truncated Zipf law over the pool's n ids, drawn exactly by inverting its CDF with
    numpy's ``Generator`` (any ``s > 0``; ``Generator.zipf`` is unbounded and needs ``s > 1``).
    Popularity ranks map to ids through a permutation seeded by ``permutation_seed``, so the
    hot ids are spread over the pool rather than its lowest ids, and every sampler with the
    same pool, exponent and permutation seed agrees on which ids are hot, whatever its draw
    ``seed`` (each load generator process draws with its own).

    Call it for one id, or ``draw(n)`` for an array; both are deterministic for the seeds.
    """

    def __init__(
        self, low: int, high: int, s: float = DEFAULT_ZIPF_S, *, seed: int = 0, permutation_seed: int = 0
    ) -> None:
        if high < low:
            raise ValueError(f"empty entity range [{low}, {high}]")
        if not s > 0:
            raise ValueError(f"the Zipf exponent must be > 0, got {s}")
        n = high - low + 1
        cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -s)
        self._cdf = cdf / cdf[-1]
        self.ids_by_rank: npt.NDArray[np.int64] = low + np.random.default_rng(permutation_seed).permutation(n)
        """The pool's ids, most popular first."""
        self._rng = np.random.default_rng(seed)
        self._block: list[int] = []

    def draw(self, n: int) -> npt.NDArray[np.int64]:
        """``n`` ids."""
        ranks = np.searchsorted(self._cdf, self._rng.random(n), side="right")
        return self.ids_by_rank[np.minimum(ranks, len(self.ids_by_rank) - 1)]  # a u rounding to 1.0 is the last

    def __call__(self) -> int:
        if not self._block:
            self._block = self.draw(4096).tolist()[::-1]
        return self._block.pop()


def entity_sampler(
    distribution: str,
    ids: tuple[int, int] = DEMO_ENTITY_IDS,
    *,
    zipf_s: float = DEFAULT_ZIPF_S,
    seed: int = 0,
) -> Callable[[], int]:
    """A sampler of entity ids in the closed range ``ids``: ``zipf`` (exponent ``zipf_s``) or ``uniform``."""
    low, high = ids
    if distribution == "zipf":
        return ZipfEntityIds(low, high, zipf_s, seed=seed)
    if distribution == "uniform":
        return uniform_entity_ids(low, high, seed)
    raise ValueError(f"unknown entity distribution {distribution!r}; choose one of {', '.join(ENTITY_DISTRIBUTIONS)}")


@dataclass(frozen=True)
class PredictCaller:
    """What a ``Predict`` target needs per call: the request pool, the stub method, the metadata."""

    pool: list[inference_pb2.PredictRequest]
    channel: grpc.aio.Channel
    predict: Any
    metadata: tuple[tuple[str, str], ...]


def prepare_predict(
    url: str,
    route: str,
    entity_ids_sampler: Callable[[], int] | None,
    api_key: str,
    traffic_class: str,
    *,
    join_key: str,
    entities_per_request: int,
    pool_size: int,
) -> PredictCaller:
    """A cycling pool of pre-built requests and a channel to the router (built once, not per call).

    Entity ids come from ``entity_ids_sampler`` (default: Zipf over the demo store's drivers).
    """
    sample = entity_ids_sampler or entity_sampler("zipf")
    key = inference_pb2.EntityKey
    pool = [
        inference_pb2.PredictRequest(
            route=route,
            entities=[key(name=join_key, int64_value=sample()) for _ in range(entities_per_request)],
            traffic_class=traffic_class,
        )
        for _ in range(pool_size)
    ]
    channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
    predict = inference_pb2_grpc.InferenceStub(channel).Predict
    return PredictCaller(pool, channel, predict, (("authorization", f"Bearer {api_key}"),))


def predict_target(
    url: str,
    route: str = "driver_ranking",
    entity_ids_sampler: Callable[[], int] | None = None,
    api_key: str = DEMO_API_KEY,
    traffic_class: str = "critical",
    *,
    deadline_s: float = 0.1,
    join_key: str = "driver_id",
    entities_per_request: int = 1,
    pool_size: int = 50_000,
    name: str = "router",
) -> Target:
    """Call inferline's ``Predict`` with a cycling pool of pre-built requests.

    The gRPC deadline is ``deadline_s``: the router owns the deadline (it answers from its
    degradation path and never cancels work in flight at Triton). Calls take the pool's
    requests in turn across runs (not by request number, which restarts with every run), so
    successive sweep steps keep drawing new entities: a pool that cycled early would end up
    all hot-cache hits, measuring the cache instead of the feature store's share of the path.
    """
    caller = prepare_predict(
        url, route, entity_ids_sampler, api_key, traffic_class,
        join_key=join_key, entities_per_request=entities_per_request, pool_size=pool_size,
    )  # fmt: skip
    pool, predict, metadata = caller.pool, caller.predict, caller.metadata
    size = len(pool)
    turn = itertools.count()

    async def call(i: int) -> None:
        await predict(pool[next(turn) % size], metadata=metadata, timeout=deadline_s)

    return Target(name, call, caller.channel)


async def triton_live(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the KServe v2 endpoint at ``url`` answers ``ServerLive`` with live=true."""
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.live)


async def triton_ready(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the KServe v2 endpoint at ``url`` answers ``ServerReady`` with ready=true."""
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.ready)
