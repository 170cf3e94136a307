"""``TensorCoalescer``: the KServe front door's ``ModelInfer`` calls, merged under load.

The policy is ``MergingLanes``' (``inferline.triton.lanes``): a call that finds its lane
free goes at once, alone and exactly as sent; calls that queue behind a call in flight go
together as one Triton request, their rows stacked, and each caller gets its own rows
back. Under load that halves or better the calls the router makes and Triton takes (each
costs ~0.4 ms of router CPU whatever its size), which is the front door's own cost.

Only requests that merge without changing what any caller gets are merged (``merge_shape``):
every input in ``raw_input_contents`` with a fixed-size datatype, the same input names,
datatypes and per-row shapes, the same requested outputs without parameters, no request
parameters but the traffic class, and a model whose Triton config batches
(``max_batch_size`` > 0, which also bounds the merged rows). Anything else — typed
``contents``, BYTES tensors, sequence or custom parameters, a model that does not batch —
goes alone, as sent. A merged answer is never guessed at: when its outputs cannot be split
by rows (an output without the batch dimension, a variable-size datatype), or Triton
refuses the merged request, each caller's own request is sent again alone, and a model
whose outputs cannot be split is not merged again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import cast

from tritonclient.grpc import service_pb2

from inferline.core.deadline import Deadline
from inferline.core.errors import InferlineError, InvalidInput
from inferline.triton.executor import ModelCallFailed, TritonExecutor
from inferline.triton.lanes import MergingLanes

logger = logging.getLogger(__name__)


FIXED_SIZE_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip
"""Bytes per element of the KServe v2 datatypes whose raw contents are a plain array (BYTES is
length-prefixed, so its rows cannot be cut by offset)."""
MERGEABLE_PARAMETERS = frozenset({"traffic_class"})
"""Request parameters a merged call may drop: the router's own (Triton never reads it)."""
CONFIG_RETRY_S = 30.0
"""How long a model whose config could not be read goes unmerged before it is asked again."""

Signature = tuple[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[str, ...]]
"""(input name, datatype, shape after the batch dimension) of each input; the requested output names."""
_Key = tuple[str, str, int, Signature]


def merge_shape(request: service_pb2.ModelInferRequest) -> tuple[Signature, int] | None:
    """(signature, rows) of a request that may merge with others of the same signature; None if it must go alone."""
    if not set(request.parameters) <= MERGEABLE_PARAMETERS:
        return None
    if not request.inputs or len(request.raw_input_contents) != len(request.inputs):
        return None
    rows = -1
    inputs = []
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        size = FIXED_SIZE_BYTES.get(tensor.datatype)
        shape = tuple(tensor.shape)
        if size is None or tensor.parameters or tensor.HasField("contents") or not shape or min(shape) < 1:
            return None
        if rows not in (-1, shape[0]) or len(raw) != math.prod(shape) * size:
            return None  # rows disagree, or the bytes do not match the shape: Triton judges it alone
        rows = shape[0]
        inputs.append((tensor.name, tensor.datatype, shape[1:]))
    if any(o.parameters for o in request.outputs):
        return None
    return (tuple(inputs), tuple(o.name for o in request.outputs)), rows


def merge_requests(requests: Sequence[service_pb2.ModelInferRequest]) -> service_pb2.ModelInferRequest:
    """One request of every caller's rows, in order (all of one ``merge_shape`` signature)."""
    first = requests[0]
    merged = service_pb2.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    total = sum(r.inputs[0].shape[0] for r in requests)
    for i, tensor in enumerate(first.inputs):
        merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[total, *tensor.shape[1:]])
        merged.raw_input_contents.append(b"".join(r.raw_input_contents[i] for r in requests))
    merged.outputs.extend(first.outputs)
    return merged


def split_response(
    response: service_pb2.ModelInferResponse, requests: Sequence[service_pb2.ModelInferRequest]
) -> list[service_pb2.ModelInferResponse] | None:
    """Each caller's answer cut from a merged one (its rows, its own id); None when the outputs do not split by rows."""
    rows = [r.inputs[0].shape[0] for r in requests]
    total = sum(rows)
    if len(response.raw_output_contents) != len(response.outputs):
        return None
    row_bytes = []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        size = FIXED_SIZE_BYTES.get(out.datatype)
        if size is None or not out.shape or out.shape[0] != total:
            return None
        per_row = math.prod(out.shape[1:]) * size
        if len(raw) != total * per_row:
            return None
        row_bytes.append(per_row)
    answers = []
    start = 0
    for request, n in zip(requests, rows, strict=True):
        answer = service_pb2.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=request.id
        )
        for key, value in response.parameters.items():
            answer.parameters[key].CopyFrom(value)
        for out, raw, per_row in zip(response.outputs, response.raw_output_contents, row_bytes, strict=True):
            tensor = answer.outputs.add(name=out.name, datatype=out.datatype, shape=[n, *out.shape[1:]])
            for key, value in out.parameters.items():
                tensor.parameters[key].CopyFrom(value)
            answer.raw_output_contents.append(raw[start * per_row : (start + n) * per_row])
        answers.append(answer)
        start += n
    return answers


class TensorCoalescer(MergingLanes[service_pb2.ModelInferRequest, service_pb2.ModelInferResponse]):
    """``TritonExecutor.forward`` for the KServe front door, merging queued calls (``MergingLanes``)."""

    def __init__(
        self,
        executor: TritonExecutor,
        max_concurrent: int = 1,
        max_batch_rows: int = 128,
        on_merged: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_merged(model, n)``: told of each merged call of ``n`` requests (metrics)."""
        super().__init__(max_concurrent, max_batch_rows)
        self._executor = executor
        self._on_merged = on_merged
        self._clock = clock
        self._batch_sizes: dict[str, int] = {}
        """Model → Triton's ``max_batch_size`` (0: it does not batch, or its outputs did not split)."""
        self._retry_at: dict[str, float] = {}
        self._lookups: dict[str, asyncio.Task[None]] = {}

    async def forward(
        self, request: service_pb2.ModelInferRequest, *, deadline: Deadline, priority: int
    ) -> service_pb2.ModelInferResponse:
        """Same contract as ``TritonExecutor.forward``; under load it may run merged with other callers' rows."""
        shape = merge_shape(request)
        max_batch = self._max_batch_size(request.model_name) if shape is not None else 0
        if shape is None or max_batch < 1:
            return await self._executor.forward(request, deadline=deadline, priority=priority)
        signature, rows = shape
        key: _Key = (request.model_name, request.model_version, priority, signature)
        return await self._submit(key, request, rows, deadline, max_batch)

    async def _send_alone(
        self, key: Hashable, payload: service_pb2.ModelInferRequest, deadline: Deadline
    ) -> service_pb2.ModelInferResponse:
        return await self._executor.forward(payload, deadline=deadline, priority=cast(_Key, key)[2])

    async def _send_merged(
        self, key: Hashable, payloads: Sequence[service_pb2.ModelInferRequest], deadline: Deadline
    ) -> Sequence[service_pb2.ModelInferResponse | InferlineError]:
        model = cast(_Key, key)[0]
        try:
            response = await self._send_alone(key, merge_requests(payloads), deadline)
        except InvalidInput as err:
            # Every part passed merge_shape, so the merge is what Triton refused (its config
            # changed under us?): read the config again later; each caller goes alone now.
            logger.warning(
                "model %s refused a merged call of %d requests (%s); sending each alone", model, len(payloads), err
            )
            self._forget(model)
            return await self._each_alone(key, payloads, deadline)
        answers = split_response(response, payloads)
        if answers is None:
            logger.warning(
                "model %s answers a merged call in outputs that do not split by rows; not merging it again", model
            )
            self._batch_sizes[model] = 0
            return await self._each_alone(key, payloads, deadline)
        if self._on_merged is not None:
            self._on_merged(model, len(payloads))
        return answers

    async def _each_alone(
        self, key: Hashable, payloads: Sequence[service_pb2.ModelInferRequest], deadline: Deadline
    ) -> list[service_pb2.ModelInferResponse | InferlineError]:
        results = await asyncio.gather(*(self._send_alone(key, p, deadline) for p in payloads), return_exceptions=True)
        out: list[service_pb2.ModelInferResponse | InferlineError] = []
        for result in results:
            if isinstance(result, InferlineError | service_pb2.ModelInferResponse):
                out.append(result)
            else:
                out.append(ModelCallFailed(f"model {cast(_Key, key)[0]} failed: {result}"))
        return out

    async def learn(self, models: Iterable[str]) -> None:
        """Read the models' batch sizes now (at start-up), so that the first burst already merges."""
        await asyncio.gather(*(self._look_up(m) for m in models if m not in self._batch_sizes))

    def _max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` when known; 0 meanwhile (its calls go alone while it is read)."""
        known = self._batch_sizes.get(model)
        if known is not None:
            return known
        if model not in self._lookups and self._clock() >= self._retry_at.get(model, 0.0):
            task = asyncio.get_running_loop().create_task(self._look_up(model))
            self._lookups[model] = task
            task.add_done_callback(lambda _: self._lookups.pop(model, None))
        return 0

    async def _look_up(self, model: str) -> None:
        try:
            response = await self._executor.model_config(model)
        except InferlineError as err:
            logger.debug("config of model %s unreadable (%s); its calls go alone", model, err)
            self._retry_at[model] = self._clock() + CONFIG_RETRY_S
            return
        self._batch_sizes[model] = max(0, int(response.config.max_batch_size))

    def _forget(self, model: str) -> None:
        self._batch_sizes.pop(model, None)
        self._retry_at[model] = self._clock() + CONFIG_RETRY_S

    async def close(self) -> None:
        """Wait for merged calls in flight and config lookups (never cancelled mid-call)."""
        await self._drain()
        if self._lookups:
            await asyncio.gather(*self._lookups.values(), return_exceptions=True)
