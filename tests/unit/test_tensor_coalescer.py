"""``TensorCoalescer`` alone: which KServe requests merge, how they are merged and split, and its fallbacks.

The executor under it is a fake that answers like a batching model (score = 2 × x, one
output row per input row), so each caller's rows can be checked against its own inputs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from inferline.core.deadline import Deadline
from inferline.core.errors import InvalidInput
from inferline.triton.tensor_coalescer import TensorCoalescer, merge_requests, merge_shape, split_response

MODEL = "m"


def request(rows: np.ndarray, rid: str = "", **parameters: str) -> Any:
    r = service_pb2.ModelInferRequest(model_name=MODEL, id=rid)
    r.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    r.raw_input_contents.append(rows.astype(np.float32).tobytes())
    r.outputs.add(name="score")
    for key, value in parameters.items():
        r.parameters[key].string_param = value
    return r


def scores(response: Any) -> np.ndarray:
    out = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(out.shape))


def answer(req: Any, *, batch_dim: bool = True) -> Any:
    """What a batching model answers: score = 2 × x (or, as a model whose output has no batch dimension, one row)."""
    x = np.frombuffer(req.raw_input_contents[0], np.float32).reshape(list(req.inputs[0].shape))
    response = service_pb2.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    shape = list(x.shape) if batch_dim else [1, int(x.size)]
    response.outputs.add(name="score", datatype="FP32", shape=shape)
    response.raw_output_contents.append((2 * x).astype(np.float32).tobytes())
    return response


class FakeExecutor:
    """Answers ``forward`` like a batching model, holding each call until released (so calls queue)."""

    def __init__(self, max_batch_size: int = 8, batch_dim: bool = True) -> None:
        self.max_batch_size = max_batch_size
        self.batch_dim = batch_dim
        self.calls: list[Any] = []
        self.gate = asyncio.Event()
        self.called = asyncio.Event()
        self.refuse_merged = False

    async def forward(self, req: Any, *, deadline: Deadline, priority: int) -> Any:
        self.calls.append(req)
        self.called.set()
        await self.gate.wait()
        rows = req.inputs[0].shape[0]
        if self.refuse_merged and rows > 1 and not req.id:
            raise InvalidInput("inputs", "batch too large")
        return answer(req, batch_dim=self.batch_dim or rows == 1)

    async def model_config(self, name: str, version: str = "") -> Any:
        return service_pb2.ModelConfigResponse(config={"name": name, "max_batch_size": self.max_batch_size})


def rows_of(i: int) -> np.ndarray:
    return np.array([[float(i)]], np.float32)


async def run_burst(coalescer: TensorCoalescer, executor: FakeExecutor, n: int) -> list[Any]:
    """One call in flight, ``n - 1`` queued behind it, then everything released."""
    deadline = Deadline.after(5.0)
    first = asyncio.ensure_future(coalescer.forward(request(rows_of(0), "r0"), deadline=deadline, priority=1))
    await executor.called.wait()
    rest = [
        asyncio.ensure_future(coalescer.forward(request(rows_of(i), f"r{i}"), deadline=deadline, priority=1))
        for i in range(1, n)
    ]
    await asyncio.sleep(0)
    executor.gate.set()
    return list(await asyncio.gather(first, *rest))


async def known(coalescer: TensorCoalescer, executor: FakeExecutor) -> None:
    """Let the coalescer read the model's config (calls go alone until it knows the batch size)."""
    executor.gate.set()
    await coalescer.forward(request(rows_of(0)), deadline=Deadline.after(5.0), priority=1)
    await asyncio.gather(*list(coalescer._lookups.values()))
    executor.gate.clear()
    executor.called.clear()
    executor.calls.clear()


def test_a_plain_batched_request_may_merge_and_others_go_alone() -> None:
    assert merge_shape(request(np.ones((3, 2)))) == (((("x", "FP32", (2,)),), ("score",)), 3)
    assert merge_shape(request(np.ones((1, 2)), traffic_class="critical")) is not None
    assert merge_shape(request(np.ones((1, 2)), sequence_id="7")) is None  # a parameter Triton reads
    typed = service_pb2.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 1], contents={"fp32_contents": [1.0]})
    assert merge_shape(typed) is None
    text = request(np.ones((1, 2)))
    text.inputs[0].datatype = "BYTES"
    assert merge_shape(text) is None
    short = request(np.ones((2, 2)))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]  # bytes disagree with the shape
    assert merge_shape(short) is None
    scalar = request(np.ones((2,)))
    scalar.inputs[0].shape[:] = []
    assert merge_shape(scalar) is None


def test_merged_rows_split_back_to_each_caller_with_its_own_id() -> None:
    parts = [request(np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 10 * n, f"id{n}") for n in (1, 3, 2)]
    merged = merge_requests(parts)
    assert list(merged.inputs[0].shape) == [6, 2] and not merged.id
    answers = split_response(answer(merged), parts)
    assert answers is not None
    for part, got in zip(parts, answers, strict=True):
        assert got.id == part.id
        want = 2 * np.frombuffer(part.raw_input_contents[0], np.float32).reshape(list(part.inputs[0].shape))
        np.testing.assert_array_equal(scores(got), want)
    assert split_response(answer(merged, batch_dim=False), parts) is None


async def test_calls_queued_behind_one_in_flight_go_as_one_merged_call() -> None:
    executor = FakeExecutor()
    merged: list[tuple[str, int]] = []
    coalescer = TensorCoalescer(executor, on_merged=lambda model, n: merged.append((model, n)))  # type: ignore[arg-type]
    await known(coalescer, executor)
    answers = await run_burst(coalescer, executor, 5)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 4]  # the first alone, the rest merged
    assert merged == [(MODEL, 4)]
    for i, got in enumerate(answers):
        assert got.id == f"r{i}"
        np.testing.assert_array_equal(scores(got), 2 * rows_of(i))


async def test_merged_rows_stay_within_the_models_max_batch_size() -> None:
    executor = FakeExecutor(max_batch_size=2)
    coalescer = TensorCoalescer(executor)  # type: ignore[arg-type]
    await known(coalescer, executor)
    await run_burst(coalescer, executor, 6)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 2, 2, 1]


async def test_a_model_that_does_not_batch_is_never_merged() -> None:
    executor = FakeExecutor(max_batch_size=0)
    coalescer = TensorCoalescer(executor)  # type: ignore[arg-type]
    await known(coalescer, executor)
    await run_burst(coalescer, executor, 4)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 1, 1, 1]


async def test_outputs_that_do_not_split_are_answered_alone_and_the_model_is_not_merged_again() -> None:
    executor = FakeExecutor(batch_dim=False)
    coalescer = TensorCoalescer(executor)  # type: ignore[arg-type]
    await known(coalescer, executor)
    answers = await run_burst(coalescer, executor, 3)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 2, 1, 1]  # merged once, then each alone
    for i, got in enumerate(answers):
        np.testing.assert_array_equal(scores(got).reshape(-1), 2 * rows_of(i).reshape(-1))
    executor.calls.clear()
    await run_burst(coalescer, executor, 3)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 1, 1]


async def test_a_refused_merged_call_is_sent_again_request_by_request() -> None:
    executor = FakeExecutor()
    executor.refuse_merged = True
    coalescer = TensorCoalescer(executor)  # type: ignore[arg-type]
    await known(coalescer, executor)
    answers = await run_burst(coalescer, executor, 3)
    assert [a.id for a in answers] == ["r0", "r1", "r2"]
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 2, 1, 1]


@pytest.mark.parametrize("parameter", [{"sequence_id": "9"}, {"priority": "1"}])
async def test_requests_with_parameters_triton_reads_go_alone(parameter: dict[str, str]) -> None:
    executor = FakeExecutor()
    coalescer = TensorCoalescer(executor)  # type: ignore[arg-type]
    await known(coalescer, executor)
    deadline = Deadline.after(5.0)
    calls = [coalescer.forward(request(rows_of(i), **parameter), deadline=deadline, priority=1) for i in range(3)]
    executor.gate.set()
    await asyncio.gather(*calls)
    assert [c.inputs[0].shape[0] for c in executor.calls] == [1, 1, 1]
