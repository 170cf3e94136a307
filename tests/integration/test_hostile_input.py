"""Hostile input through a real router: generated Predict, ModelInfer, metadata and raw bytes.

Why: the router's port is the public surface. Whatever a caller puts on the wire must end in a
clear status (never INTERNAL or UNKNOWN), within the call's deadline, without crashing the
process, leaking where internal services run, echoing unbounded input back, logging a
traceback per call (anyone could flood the log) or leaving state that hurts the next caller.

How: hypothesis generates well-formed protobuf messages with hostile field values, hostile
call metadata (credentials, forged ``x-inferline-*`` gateway headers) and undecodable bytes,
and sends each through one router process (started for this module on the session's Triton)
with a raw-bytes client, so nothing is validated on the client side. After every example a
good Predict with the demo key must be answered. The client accepts up to 1 MiB of metadata,
so an oversized answer is measured here instead of surfacing as the client's "Stream removed".
The acceptance findings of issue 10 are explicit examples (``@example``), run every time
before the generated ones.

Examples are not shrunk and a violation does not stop the run: the server is stateful (a
forged header's effect outlives its call, so the next example would fail for the wrong
reason), and one run should show every broken property. Each violation is recorded with its
example; each test fails at its end listing every kind once (or early, past
``MAX_VIOLATIONS``). Runs are derandomized: CI sees the same examples every time.

The last test checks the router as a whole (RSS growth, no traceback in its log) and prints
the numbers for the record (cases, statuses seen, RSS growth): run with ``-s`` to see the
line, which is also written to ``<pytest tmp>/hostile-summary*/summary.txt``.
"""

from __future__ import annotations

import math
import pathlib
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from inferline.v1 import inference_pb2 as pb
from tests.integration.router_fixtures import DEMO_KEY, LIMITED_KEY, ServerProcess, start_router

pytestmark = pytest.mark.requires_triton

PREDICT = "/inferline.v1.Inference/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
AUTH: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {DEMO_KEY}"),)

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Every status a hostile call may end in: the caller's error, a refusal or its own deadline."""

MAX_DETAILS_CHARS = 1024
"""An error message says what was wrong; echoed input is cut well before this."""
MAX_TRAILER_BYTES = 8192
"""Trailers as gRPC counts them against a client's limit (HPACK: name + value + 32 per entry,
``grpc-message`` percent-encoded, ``-bin`` values base64): gRPC clients refuse answers over 8 KiB
at random (soft limit) and all over 16 KiB (hard limit), turning the status into "Stream removed"."""
DEADLINE_MARGIN_S = 1.0
"""How far past its deadline a call may end before it counts as a hang (a loaded CI machine)."""
MAX_VIOLATIONS = 25
"""Stop a test early past this many: the point is made, and each costs a recovery wait."""
RECOVERY_S = 10.0
"""How long the router gets to answer good calls again after one failed, before the run stops."""
RSS_GROWTH_BOUND_KIB = 48 * 1024
"""Bound on the router's RSS growth over the whole hostile run, measured after a warm-up.

Argued, not fitted: what the run may legitimately leave behind is (1) cache entries — the
feature hot cache and the score cache are keyed by (tenant, route, entity id) and every
generated id comes from ``ENTITY_IDS`` (26 values), so a few KiB; (2) metric series — labels
are the known routes, models and classes or "unknown", so a fixed set; (3) fixed-size
admission, breaker and quota state; (4) allocator high-water marks — calls are sequential and
no message is over 64 KiB (``max_message_bytes`` in the test config) nor metadata over 16 KiB,
so gRPC's and Python's buffers are reused, but pymalloc arenas and glibc's heap keep a few
MiB once touched. Measured: ~4 MiB. The bound leaves room for another machine's allocator and
still catches a leak: the run makes ~600 hostile calls and as many good ones, so keeping as
little as 40 KiB per call would cross it."""

ENTITY_IDS = st.one_of(st.integers(1001, 1020), st.sampled_from([0, 1, -1, 99_999, 2**63 - 1, -(2**63)]))
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=False,
)


# --- calling the router ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str | bytes], ...]
    elapsed_s: float


def call(
    channel: grpc.Channel, path: str, payload: bytes, metadata: Sequence[tuple[str, str | bytes]], timeout: float
) -> Outcome:
    """One unary call with ``payload`` as the raw request body (no client-side serialization)."""
    method = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    try:
        _, rpc = method.with_call(payload, timeout=timeout, metadata=tuple(metadata))
    except grpc.RpcError as err:
        return Outcome(
            err.code(),  # type: ignore[attr-defined]
            err.details() or "",  # type: ignore[attr-defined]
            tuple(err.trailing_metadata() or ()),  # type: ignore[attr-defined]
            time.monotonic() - started,
        )
    return Outcome(grpc.StatusCode.OK, "", tuple(rpc.trailing_metadata() or ()), time.monotonic() - started)


def trailer_wire_bytes(outcome: Outcome) -> int:
    """The answer's trailers as a gRPC client counts them against its metadata limit."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in outcome.details.encode())
    total = len("grpc-status") + 2 + 32 + len("grpc-message") + message + 32
    for key, value in outcome.trailing:
        raw = value if isinstance(value, bytes) else value.encode()
        size = 4 * math.ceil(len(raw) / 3) if key.endswith("-bin") else len(raw)
        total += len(key) + size + 32
    return total


def vm_rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def short(example: object, limit: int = 240) -> str:
    """An example as the report shows it: protobuf text on one line, cut to ``limit``."""
    text = str(example).replace("\n", " ") if isinstance(example, Message) else repr(example)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


GOOD_PREDICT = pb.PredictRequest(
    route="driver_ranking", entities=[pb.EntityKey(name="driver_id", int64_value=1001)]
).SerializeToString()


def good_model_infer(rows: int = 2) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="driver_ranker")
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(struct.pack(f"<{4 * rows}f", *([0.5, 0.8, 480.0, 6.0] * rows)))
    return request


def with_fields(request: service_pb2.ModelInferRequest, **fields: str) -> service_pb2.ModelInferRequest:
    for name, value in fields.items():
        setattr(request, name, value)
    return request


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    detail: str
    example: str


@dataclass(repr=False)
class HostileRouter:
    """The module's router, the client channels and what the run has seen so far.

    Nothing here raises inside hypothesis's loop (it would print the example, tens of KB, and
    its size warning fails the run first): a run that must end early sets ``stopped`` and
    the remaining examples do nothing; ``assert_clean`` reports after the loop.
    """

    router: ServerProcess
    hostile: grpc.Channel
    """Carries the hostile calls."""
    good: grpc.Channel
    """Carries the good call after each example: a hostile call that breaks its own connection
    does not make the good call fail; only what it did to the server does."""
    internal_markers: tuple[str, ...]
    rss_start_kib: int
    log_offset: int
    rss_max_kib: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    cases: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    stopped: str | None = None
    """Why this test's run ended early (None: it did not)."""

    @property
    def pid(self) -> int:
        proc = self.router.server.proc
        assert proc is not None
        return proc.pid

    def alive(self) -> bool:
        proc = self.router.server.proc
        return proc is not None and proc.poll() is None

    def start_test(self) -> None:
        self.violations = []
        self.stopped = None

    def good_call(self) -> Outcome:
        """A good Predict (the tenant's default class, which admission may shed), tried up to
        three times over 0.2 s when shed: a loaded machine's loop lag sheds for a moment; a
        poisoned admission signal sheds for seconds."""
        outcome = call(self.good, PREDICT, GOOD_PREDICT, AUTH, 5.0)
        for _ in range(2):
            if outcome.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            time.sleep(0.1)
            outcome = call(self.good, PREDICT, GOOD_PREDICT, AUTH, 5.0)
        return outcome

    def violate(self, kind: str, detail: str, example: str) -> None:
        self.violations.append(Violation(kind, detail, example))
        if len(self.violations) >= MAX_VIOLATIONS and self.stopped is None:
            self.stopped = f"stopped after {len(self.violations)} violations"

    def exercise(
        self,
        test: str,
        path: str,
        payload: bytes,
        metadata: Sequence[tuple[str, str | bytes]],
        timeout: float,
        example: object,
        expect: Callable[[Outcome], str | None] | None = None,
    ) -> None:
        """Send one hostile call and check every property; ``expect`` adds an example-specific
        one (returns what is wrong, or None)."""
        if self.stopped is not None:
            return
        shown = f"{path} timeout={timeout} metadata={short(list(metadata), 160)} {short(example)}"
        outcome = call(self.hostile, path, payload, metadata, timeout)
        self.cases[test] += 1
        self.statuses[outcome.code.name] += 1
        if not self.alive():
            self.stopped = f"the router died on: {shown}\n{self.router.log_tail()}"
            return
        if outcome.code not in ALLOWED:
            self.violate(f"status {outcome.code.name}", short(outcome.details, 200), shown)
        if outcome.elapsed_s > timeout + DEADLINE_MARGIN_S:
            self.violate("hang", f"{outcome.elapsed_s:.2f} s for a {timeout} s deadline", shown)
        if len(outcome.details) > MAX_DETAILS_CHARS:
            self.violate("echo: long message", f"{len(outcome.details)} chars: {short(outcome.details, 80)}", shown)
        wire = trailer_wire_bytes(outcome)
        if wire > MAX_TRAILER_BYTES:
            self.violate("echo: large trailers", f"{wire} bytes ({outcome.code.name})", shown)
        answer = " ".join(
            [outcome.details]
            + [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for _, v in outcome.trailing]
        )
        leaked = [marker for marker in self.internal_markers if marker in answer]
        if leaked:
            self.violate("leak: internal address", f"{leaked} in {short(outcome.details, 120)}", shown)
        if "Traceback" in answer or 'File "' in answer:
            self.violate("leak: traceback in answer", short(outcome.details, 120), shown)
        if expect is not None:
            wrong = expect(outcome)
            if wrong is not None:
                self.violate("unexpected answer", wrong, shown)
        self.after(shown)

    def after(self, shown: str) -> None:
        """The good call after an example, and the RSS high-water mark."""
        good = self.good_call()
        if good.code != grpc.StatusCode.OK:
            self.violate("good call failed after", f"{good.code.name}: {short(good.details, 160)}", shown)
            self.wait_until_serving()
        self.rss_max_kib = max(self.rss_max_kib, vm_rss_kib(self.pid))

    def wait_until_serving(self) -> None:
        """Wait out what the example left behind, so the next one starts clean."""
        deadline = time.monotonic() + RECOVERY_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self.good_call().code == grpc.StatusCode.OK:
                return
        self.stopped = f"the router did not answer a good call for {RECOVERY_S} s"

    def report(self) -> str:
        """Each kind of violation once: how often, what, and its first examples."""
        by_kind: dict[str, list[Violation]] = {}
        for violation in self.violations:
            by_kind.setdefault(violation.kind, []).append(violation)
        lines = []
        for kind, found in by_kind.items():
            lines.append(f"- {kind}: {len(found)}x")
            lines.extend(f"    {v.detail}\n      on {v.example}" for v in found[:2])
        return "\n".join(lines)

    def assert_clean(self, test: str) -> None:
        if self.stopped is not None or self.violations:
            head = f"{test}: {len(self.violations)} violations" + (f" ({self.stopped})" if self.stopped else "")
            pytest.fail(f"{head}:\n{self.report()}", pytrace=False)

    def __repr__(self) -> str:
        return f"HostileRouter({self.router.address}, {sum(self.cases.values())} cases)"


CLIENT_OPTIONS = [
    ("grpc.max_metadata_size", 1 << 20),
    ("grpc.absolute_max_metadata_size", 1 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]


@pytest.fixture(scope="module")
def hostile_router(
    triton_server: Any, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileRouter]:
    """One router for the whole module, warmed up before the RSS baseline is taken."""
    router = start_router(triton_server, router_config, tmp_path_factory.mktemp("hostile-router"))
    hostile = grpc.insecure_channel(router.address, options=CLIENT_OPTIONS)
    good = grpc.insecure_channel(router.address, options=CLIENT_OPTIONS)
    try:
        # First calls load code and fill fixed-size state (Triton channel, metrics series):
        # not growth the run causes.
        warm_up = [
            (PREDICT, GOOD_PREDICT, AUTH),
            (MODEL_INFER, good_model_infer().SerializeToString(), AUTH),
            (PREDICT, pb.PredictRequest(route="nope").SerializeToString(), AUTH),
            (PREDICT, GOOD_PREDICT, ()),
            (MODEL_INFER, b"\xff\xff", AUTH),
            (PREDICT, b"\xff\xff", ()),
        ]
        for _ in range(20):
            for path, payload, metadata in warm_up:
                call(hostile, path, payload, metadata, 5.0)
        host, port = triton_server.grpc_url.rsplit(":", 1)
        markers = ("ipv4:", "ipv6:", f"{host}:{port}", f"localhost:{port}")
        proc = router.server.proc
        assert proc is not None
        rss = vm_rss_kib(proc.pid)
        state = HostileRouter(router, hostile, good, markers, rss, router.log_path.stat().st_size, rss_max_kib=rss)
        yield state
    finally:
        hostile.close()
        good.close()
        code = router.stop()
    assert code == 0, f"router exited with {code}:\n{router.log_tail()}"


@pytest.fixture
def hostile(hostile_router: HostileRouter) -> HostileRouter:
    """The module's router, with this test's violations only."""
    hostile_router.start_test()
    return hostile_router


# --- strategies -------------------------------------------------------------------------------


def _repeat(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


def huge_text(alphabet: st.SearchStrategy[str], low: int = 1000, high: int = 20_000) -> st.SearchStrategy[str]:
    """A long string from a short drawn one, repeated: drawing 20 K characters one by one is slow."""
    return st.builds(_repeat, st.text(alphabet, min_size=1, max_size=8), st.integers(low, high))


ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
"""What a gRPC client may send in a text metadata value."""
SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "\t\n\r",
    "\u202e",
    "\ufeff",
    "💥",
    "driver_ranking ",
    " driver_ranking",
    "DRIVER_RANKING",
    "driver_ranking\x00",
    "driver_ranker",
    "kserve:driver_ranker",
    "model:driver_ranker",
    "unknown",
    "../../etc/passwd",
    "%s%s%n%x",
    "${jndi:ldap://x/a}",
    "' OR 1=1 --",
    "\\x00\\u0000",
    "{}[]",
]
HOSTILE_TEXT = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=40),
    st.text(st.characters(max_codepoint=0x1F), max_size=20),
    huge_text(st.characters(codec="utf-8")),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -0.0, 5e-324, 3.4e38, 3.5e38, 6.0]),
)


@st.composite
def entity_keys(draw: st.DrawFn) -> pb.EntityKey:
    kind = draw(st.sampled_from(["good", "good", "string", "no value", "name", "both wrong"]))
    if kind == "good":
        return pb.EntityKey(name="driver_id", int64_value=draw(ENTITY_IDS))
    if kind == "string":
        return pb.EntityKey(name="driver_id", string_value=draw(HOSTILE_TEXT))
    if kind == "no value":
        return pb.EntityKey(name=draw(st.sampled_from(["driver_id", ""])))
    if kind == "name":
        return pb.EntityKey(name=draw(HOSTILE_TEXT), int64_value=draw(ENTITY_IDS))
    return pb.EntityKey(name=draw(HOSTILE_TEXT), string_value=draw(HOSTILE_TEXT))


GOOD_ENTITY = st.builds(pb.EntityKey, name=st.just("driver_id"), int64_value=ENTITY_IDS)
ENTITY_LISTS = st.one_of(
    st.lists(GOOD_ENTITY, max_size=8),
    st.lists(entity_keys(), max_size=8),
    # Over the route's max_entities (100), and over the 64 KiB message limit.
    st.builds(lambda e, n: [e] * n, GOOD_ENTITY, st.integers(90, 6000)),
)
FEATURES = st.one_of(
    st.dictionaries(st.one_of(st.just("trip_distance_km"), HOSTILE_TEXT), FLOATS, max_size=4),
    st.builds(lambda n: {f"f{i}": 1.0 for i in range(n)}, st.integers(50, 4000)),
)
TRAFFIC_CLASSES = st.one_of(st.sampled_from(["", "critical", "standard", "batch"]), HOSTILE_TEXT)
TIMEOUTS = st.sampled_from([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 0.2, 0.01, 0.001])

PREDICT_REQUESTS = st.builds(
    pb.PredictRequest,
    route=st.one_of(st.just("driver_ranking"), st.just("driver_ranking"), HOSTILE_TEXT),
    entities=ENTITY_LISTS,
    request_features=FEATURES,
    traffic_class=TRAFFIC_CLASSES,
    request_id=st.one_of(st.just(""), st.text(max_size=40), huge_text(st.characters(codec="utf-8"), 1000, 30_000)),
    top_k=st.one_of(st.integers(0, 200), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1])),
)


def parameter(value: bool | int | float | str) -> service_pb2.InferParameter:
    """An InferParameter holding ``value`` in the field of its type (an int past int64: uint64)."""
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value >= 2**63:
            return service_pb2.InferParameter(uint64_param=value)
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    return service_pb2.InferParameter(string_param=value)


PARAMETER_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1]),
    FLOATS,
    HOSTILE_TEXT,
)
TENSOR_PARAMETER_KEYS = st.one_of(
    st.sampled_from(
        [
            "shared_memory_region",
            "shared_memory_byte_size",
            "shared_memory_offset",
            "binary_data_size",
            "classification",
        ]
    ),
    HOSTILE_TEXT,
)
REQUEST_PARAMETER_KEYS = st.one_of(
    st.sampled_from(
        [
            "traffic_class",
            "priority",
            "timeout",
            "sequence_id",
            "sequence_start",
            "sequence_end",
            "binary_data_output",
            "shared_memory_region",
            "triton_enable_empty_final_response",
        ]
    ),
    HOSTILE_TEXT,
)
TENSOR_PARAMETERS = st.dictionaries(TENSOR_PARAMETER_KEYS, PARAMETER_VALUES.map(parameter), max_size=3)
REQUEST_PARAMETERS = st.dictionaries(REQUEST_PARAMETER_KEYS, PARAMETER_VALUES.map(parameter), max_size=3)
DATATYPES = st.one_of(
    st.sampled_from(
        ["FP32", "FP64", "FP16", "BF16", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES", "", "fp32"]
    ),
    HOSTILE_TEXT,
)
DIMENSIONS = st.one_of(
    st.integers(-2, 8),
    st.sampled_from([0, 100, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)
CONTENTS = st.one_of(
    st.none(),
    st.builds(service_pb2.InferTensorContents, fp32_contents=st.lists(FLOATS, max_size=12)),
    st.builds(service_pb2.InferTensorContents, int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12)),
    st.builds(service_pb2.InferTensorContents, bytes_contents=st.lists(st.binary(max_size=16), max_size=4)),
    st.builds(
        service_pb2.InferTensorContents,
        fp64_contents=st.lists(FLOATS, max_size=4),
        bool_contents=st.lists(st.booleans(), max_size=4),
    ),
)
INPUT_TENSORS = st.builds(
    service_pb2.ModelInferRequest.InferInputTensor,
    name=st.one_of(st.just("features"), HOSTILE_TEXT),
    datatype=DATATYPES,
    shape=st.lists(DIMENSIONS, max_size=4),
    parameters=TENSOR_PARAMETERS,
    contents=CONTENTS,
)
OUTPUT_TENSORS = st.builds(
    service_pb2.ModelInferRequest.InferRequestedOutputTensor,
    name=st.one_of(st.just("score"), HOSTILE_TEXT),
    parameters=TENSOR_PARAMETERS,
)
MODEL_NAMES = st.one_of(
    st.just("driver_ranker"), st.sampled_from(["driver_ranker_light", "driver_ranker_gpu"]), HOSTILE_TEXT
)
MODEL_VERSIONS = st.one_of(
    st.just(""), st.sampled_from(["1", "2", "0", "-1", "1.0", "99999999999999999999999"]), HOSTILE_TEXT
)

MODEL_INFER_FROM_SCRATCH = st.builds(
    service_pb2.ModelInferRequest,
    model_name=MODEL_NAMES,
    model_version=MODEL_VERSIONS,
    id=st.one_of(st.just(""), HOSTILE_TEXT),
    parameters=REQUEST_PARAMETERS,
    inputs=st.lists(INPUT_TENSORS, max_size=3),
    outputs=st.lists(OUTPUT_TENSORS, max_size=2),
    raw_input_contents=st.lists(st.binary(max_size=64), max_size=3),
)


@st.composite
def nearly_valid_model_infer(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    """A request Triton would run, with one thing wrong: it gets past the trivial checks."""
    rows = draw(st.integers(1, 4))
    request = service_pb2.ModelInferRequest(model_name="driver_ranker")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[rows, 4])
    values = draw(st.lists(st.floats(width=32), min_size=4 * rows, max_size=4 * rows))
    request.raw_input_contents.append(struct.pack(f"<{4 * rows}f", *values))
    mutation = draw(
        st.sampled_from(
            [
                "none",
                "raw length",
                "contents too",
                "contents instead",
                "datatype",
                "shape",
                "tensor parameters",
                "request parameters",
                "outputs",
                "version",
                "id",
                "duplicate input",
                "extra raw",
            ]
        )
    )
    if mutation == "raw length":
        size = draw(st.one_of(st.integers(0, 64), st.integers(60_000, 70_000)))
        request.raw_input_contents[0] = b"\x00" * size
    elif mutation in ("contents too", "contents instead"):
        tensor.contents.CopyFrom(draw(CONTENTS.filter(lambda c: c is not None)))
        if mutation == "contents instead":
            del request.raw_input_contents[:]
    elif mutation == "datatype":
        tensor.datatype = draw(DATATYPES)
    elif mutation == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(DIMENSIONS, max_size=4)))
    elif mutation == "tensor parameters":
        for key, value in draw(TENSOR_PARAMETERS).items():
            tensor.parameters[key].CopyFrom(value)
    elif mutation == "request parameters":
        for key, value in draw(REQUEST_PARAMETERS).items():
            request.parameters[key].CopyFrom(value)
    elif mutation == "outputs":
        request.outputs.extend(draw(st.lists(OUTPUT_TENSORS, min_size=1, max_size=3)))
    elif mutation == "version":
        request.model_version = draw(MODEL_VERSIONS)
    elif mutation == "id":
        request.id = draw(HOSTILE_TEXT)
    elif mutation == "duplicate input":
        request.inputs.append(tensor)
        request.raw_input_contents.append(request.raw_input_contents[0])
    elif mutation == "extra raw":
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3)))
    return request


MODEL_INFER_REQUESTS = st.one_of(MODEL_INFER_FROM_SCRATCH, nearly_valid_model_infer())

# Metadata: text values must be printable ASCII, or the client refuses to send them.
LENIENT_AUTH = st.builds(
    lambda lead, scheme, gap, trail: f"{lead}{scheme}{gap}{DEMO_KEY}{trail}",
    st.sampled_from(["", " ", "  "]),
    st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]),
    st.sampled_from([" ", "  ", "   "]),
    st.sampled_from(["", " ", "  "]),
)
"""Ways HTTP and gRPC clients commonly send the demo key (RFC 9110: whitespace around a field
value is not part of it; 1*SP between scheme and token; the scheme is case-insensitive)."""
AUTH_VALUES = st.one_of(
    st.none(),
    st.just(f"Bearer {DEMO_KEY}"),
    LENIENT_AUTH,
    st.just(f"Bearer {LIMITED_KEY}"),
    st.sampled_from(
        [
            "",
            " ",
            "Bearer",
            "Bearer ",
            "Basic aW5mZXJsaW5lOmtleQ==",
            DEMO_KEY,
            f"Bearer {DEMO_KEY} extra",
            f"Bearer {DEMO_KEY}x",
            f"Token {DEMO_KEY}",
            "Bearer a.b.c",
            "Bearer eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJkZW1vIiwiZXhwIjo5OTk5OTk5OTk5fQ.",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
        ]
    ),
    st.text(ASCII, max_size=100),
    st.builds(lambda body: f"Bearer {body}", huge_text(ASCII, 1000, 20_000)),
)
GRPC_TIMEOUT_VALUES = st.one_of(
    st.sampled_from(
        ["99999999S", "99999999H", "99999999n", "1n", "0S", "-1S", "1.5S", "S", "", " 100m", "100m ", "1e9S"]
    ),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 99_999_999), st.sampled_from("HMSmun")),
)
HEADER_KEYS = st.one_of(
    st.sampled_from(
        [
            "x-inferline-ingress-timeout",
            "x-inferline-traffic-class",
            "x-inferline-gateway-secret",
            "x-inferline-overloaded",
            "x-inferline-tenant",
            "x-forwarded-for",
            "x-request-id",
            "authorization",
        ]
    ),
    st.from_regex(r"x-[a-z0-9][a-z0-9_.-]{0,30}", fullmatch=True).filter(lambda k: not k.endswith("-bin")),
)
HEADER_VALUES = st.one_of(
    GRPC_TIMEOUT_VALUES,
    st.sampled_from(["critical", "standard", "batch", "platinum", "", " critical"]),
    st.text(ASCII, max_size=60),
    huge_text(ASCII),
)
BINARY_HEADERS = st.tuples(
    st.sampled_from(["authorization-bin", "x-inferline-gateway-secret-bin", "x-inferline-traffic-class-bin"]),
    st.binary(max_size=64),
)
EXTRA_HEADERS = st.lists(st.one_of(st.tuples(HEADER_KEYS, HEADER_VALUES), BINARY_HEADERS), max_size=6)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


MALFORMED = [
    b"\xff\xff\xff",
    b"\x0a\x05ab",  # a string field longer than the body
    b"\x0a\x02\xff\xfe",  # field 1 (route, model_name) is not UTF-8
    b"\x0b",  # an unterminated group
    b"\x00",  # field number 0
    b"\x08" + b"\xff" * 11,  # a varint over 10 bytes
    b"\x12\x80\x80\x80\x80\x10",  # a length of 4 GiB
    b"\x5b" * 5000 + b"\x5c" * 5000,  # groups nested past protobuf's recursion limit
    b"\x0a" + _varint(3) + "é".encode()[:1] + b"ab",  # a cut multi-byte character
]
RAW_PATHS = [
    PREDICT,
    MODEL_INFER,
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelConfig",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
    "/grpc.health.v1.Health/Check",
    "/inferline.internal.v1.Features/GetFeatures",
    "/inferline.internal.v1.Degradation/RecordScores",
    "/inferline.v1.Inference/Nope",
    "/no.such.Service/Method",
]
REQUEST_TYPES: dict[str, type[Message]] = {PREDICT: pb.PredictRequest, MODEL_INFER: service_pb2.ModelInferRequest}


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes that are mostly not a valid message: random, known-malformed, or a valid one damaged."""
    kind = draw(st.sampled_from(["random", "malformed", "damaged", "damaged", "huge"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "malformed":
        return draw(st.sampled_from(MALFORMED))
    if kind == "huge":
        return draw(
            st.builds(
                lambda b, n: (b * (n // len(b) + 1))[:n], st.binary(min_size=1, max_size=8), st.integers(60_000, 70_000)
            )
        )
    valid = draw(
        st.sampled_from([GOOD_PREDICT, good_model_infer().SerializeToString(), good_model_infer(4).SerializeToString()])
    )
    damage = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    at = draw(st.integers(0, len(valid) - 1))
    if damage == "truncate":
        return valid[:at]
    if damage == "flip":
        return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]
    if damage == "insert":
        return valid[:at] + draw(st.binary(min_size=1, max_size=16)) + valid[at:]
    return valid + draw(st.binary(min_size=1, max_size=16))


def decodes(path: str, body: bytes) -> bool:
    """Whether ``body`` is a valid request message for ``path`` (as the server's protobuf sees it)."""
    message_type = REQUEST_TYPES.get(path)
    if message_type is None:
        return True
    try:
        message_type.FromString(body)
    except DecodeError:
        return False
    return True


# --- the properties ---------------------------------------------------------------------------
# Each test runs its examples through an inner @given function, then fails listing what it saw.


def test_hostile_predict_requests_get_clear_answers(hostile: HostileRouter) -> None:
    @SETTINGS
    @given(request=PREDICT_REQUESTS, timeout=TIMEOUTS)
    @example(
        request=pb.PredictRequest(route="r" * 10_000, entities=[pb.EntityKey(name="driver_id", int64_value=1)]),
        timeout=5.0,
    )
    @example(request=pb.PredictRequest(route="driver_ranking", traffic_class="p" * 10_000), timeout=5.0)
    def run(request: pb.PredictRequest, timeout: float) -> None:
        hostile.exercise("predict", PREDICT, request.SerializeToString(), AUTH, timeout, request)

    run()
    hostile.assert_clean("Predict")


def test_hostile_model_infer_requests_get_clear_answers(hostile: HostileRouter) -> None:
    @SETTINGS
    @given(request=MODEL_INFER_REQUESTS, timeout=TIMEOUTS)
    @example(request=service_pb2.ModelInferRequest(model_name="m" * 10_000), timeout=5.0)
    # Fields Triton echoes in its error, past its answer's 16 KiB metadata limit.
    @example(request=with_fields(good_model_infer(), id="i" * 20_000), timeout=5.0)
    @example(request=with_fields(good_model_infer(), model_version="9" * 20_000), timeout=5.0)
    def run(request: service_pb2.ModelInferRequest, timeout: float) -> None:
        hostile.exercise("model_infer", MODEL_INFER, request.SerializeToString(), AUTH, timeout, request)

    run()
    hostile.assert_clean("ModelInfer")


INGRESS = "x-inferline-ingress-timeout"
LENIENT_AUTH_PATTERN = re.compile(rf"^ *(?i:bearer) +{re.escape(DEMO_KEY)} *$")
METADATA_SOFT_LIMIT = 8192
"""Past this much request metadata gRPC's server transport may refuse the call itself."""
CALL_CHOICES = [
    (PREDICT, GOOD_PREDICT),
    (
        PREDICT,
        pb.PredictRequest(
            route="driver_ranking",
            traffic_class="critical",
            entities=[pb.EntityKey(name="driver_id", int64_value=1002)],
        ).SerializeToString(),
    ),
    (MODEL_INFER, good_model_infer().SerializeToString()),
]
CALLS = st.sampled_from(CALL_CHOICES)


@st.composite
def hostile_metadata(draw: st.DrawFn) -> list[tuple[str, str | bytes]]:
    auth = draw(AUTH_VALUES)
    metadata: list[tuple[str, str | bytes]] = [("authorization", auth)] if auth is not None else []
    metadata += draw(EXTRA_HEADERS)
    return list(draw(st.permutations(metadata))) if draw(st.booleans()) else metadata


def accepts_the_demo_key(metadata: Sequence[tuple[str, str | bytes]]) -> Callable[[Outcome], str | None] | None:
    """The demo key as clients commonly send it must authenticate (when it is the first
    ``authorization`` value and the metadata is small enough for the transport to take)."""
    size = sum(len(k) + len(v) + 32 for k, v in metadata)
    first = next((v for k, v in metadata if k == "authorization"), None)
    if size > METADATA_SOFT_LIMIT or not isinstance(first, str) or not LENIENT_AUTH_PATTERN.match(first):
        return None

    def check(outcome: Outcome) -> str | None:
        if outcome.code == grpc.StatusCode.UNAUTHENTICATED:
            return f"authorization {first!r} refused: {outcome.details!r}"
        return None

    return check


def test_hostile_metadata_gets_clear_answers_and_changes_nothing_for_others(hostile: HostileRouter) -> None:
    """Credentials and forged gateway headers: the good call after each example (the demo
    tenant's default class, which admission sheds on queue wait) fails if a forged
    ``x-inferline-ingress-timeout`` steered admission for everyone."""

    @SETTINGS
    @given(target=CALLS, metadata=hostile_metadata())
    # The acceptance findings: a forged ingress timeout with a bad key and with the demo key,
    # the perf_analyzer-style leading space, and a huge bad key.
    @example(target=CALL_CHOICES[0], metadata=[("authorization", "Bearer nope"), (INGRESS, "99999999S")])
    @example(target=CALL_CHOICES[2], metadata=[*AUTH, (INGRESS, "99999999S"), ("x-inferline-traffic-class", "batch")])
    @example(target=CALL_CHOICES[0], metadata=[("authorization", f" Bearer {DEMO_KEY}")])
    @example(target=CALL_CHOICES[0], metadata=[("authorization", "Bearer " + "k" * 20_000)])
    def run(target: tuple[str, bytes], metadata: list[tuple[str, str | bytes]]) -> None:
        path, payload = target
        expect = accepts_the_demo_key(metadata)
        hostile.exercise("metadata", path, payload, metadata, 5.0, "(a good request)", expect)

    run()
    hostile.assert_clean("metadata")


def test_undecodable_bytes_get_clear_answers(hostile: HostileRouter) -> None:
    """Bytes that do not decode as the method's request are the caller's error: INVALID_ARGUMENT
    (or UNAUTHENTICATED when the call has no key), never UNKNOWN with a logged traceback."""

    @SETTINGS
    @given(path=st.sampled_from(RAW_PATHS), body=raw_bodies(), with_key=st.booleans())
    @example(path=PREDICT, body=b"\xff\xff\xff", with_key=False)
    @example(path=PREDICT, body=b"\xff\xff\xff", with_key=True)
    @example(path=MODEL_INFER, body=b"\xff\xff\xff", with_key=False)
    def run(path: str, body: bytes, with_key: bool) -> None:
        expect = None
        if len(body) < 60_000 and not decodes(path, body):
            wanted = {grpc.StatusCode.INVALID_ARGUMENT} | (set() if with_key else {grpc.StatusCode.UNAUTHENTICATED})

            def expect(outcome: Outcome) -> str | None:
                if outcome.code in wanted:
                    return None
                return f"undecodable body answered {outcome.code.name}: {short(outcome.details, 120)}"

        hostile.exercise("raw_bytes", path, body, AUTH if with_key else (), 5.0, body, expect)

    run()
    hostile.assert_clean("raw bytes")


def test_the_router_stayed_healthy_through_the_hostile_run(
    hostile_router: HostileRouter, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Last in the module: the router as a whole after every example above. RSS bounded (the
    bound is argued at ``RSS_GROWTH_BOUND_KIB``) and not one traceback in its log."""
    h = hostile_router
    assert h.alive(), h.router.log_tail()
    rss_end = vm_rss_kib(h.pid)
    h.rss_max_kib = max(h.rss_max_kib, rss_end)
    with h.router.log_path.open("rb") as log_file:
        log_file.seek(h.log_offset)
        log = log_file.read().decode("utf-8", errors="replace")
    tracebacks = log.count("Traceback")
    summary = (
        f"hostile-input summary: cases={sum(h.cases.values())} {dict(sorted(h.cases.items()))} "
        f"statuses={dict(h.statuses.most_common())} "
        f"rss_start={h.rss_start_kib / 1024:.1f}MiB max_growth={(h.rss_max_kib - h.rss_start_kib) / 1024:.1f}MiB "
        f"end_growth={(rss_end - h.rss_start_kib) / 1024:.1f}MiB (bound {RSS_GROWTH_BOUND_KIB / 1024:.0f}MiB) "
        f"router_log: {log.count(chr(10))} lines {len(log)} bytes, tracebacks={tracebacks}"
    )
    print(f"\n{summary}")
    (tmp_path_factory.mktemp("hostile-summary") / "summary.txt").write_text(summary + "\n")
    assert h.rss_max_kib - h.rss_start_kib <= RSS_GROWTH_BOUND_KIB, summary
    first = log.find("Traceback")
    assert tracebacks == 0, f"{summary}\nfirst traceback: {log[max(0, first - 300) : first + 1500]}"
