"""TritonExecutor against the real bundled Triton: errors are classified, calls never cancelled."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferline.core.deadline import Deadline
from inferline.core.served_by import Reason
from inferline.triton.executor import (
    ModelBudgetExceeded,
    ModelCallFailed,
    ModelNotLoaded,
    ModelOverloaded,
    ModelUnavailable,
    TritonExecutor,
)
from inferline.triton.launcher import TritonLauncher
from tests.waiting import eventually

pytestmark = pytest.mark.requires_triton
CALLS = pytest.mark.parametrize("stream_calls", [False, True], ids=["unary", "streamed"])
"""Both ways ``infer`` sends: one unary call each, or requests over one stream (batch jobs)."""

ROWS = np.array([[0.5, 0.8, 500, 3], [0.1, 0.2, 100, 20]], np.float32)


@CALLS
async def test_scores_come_back_per_row(triton_server: TritonLauncher, stream_calls: bool) -> None:
    executor = TritonExecutor(triton_server.grpc_url, stream_calls=stream_calls)
    try:
        result = await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(2), priority=1)
        assert result.scores.shape == (2,) and np.all((result.scores >= 0) & (result.scores <= 1))
        assert (result.model_name, result.model_version) == ("driver_ranker", "1")
        assert executor.in_flight("driver_ranker") == 0
    finally:
        await executor.close()


@CALLS
async def test_unknown_model_is_unavailable(triton_server: TritonLauncher, stream_calls: bool) -> None:
    executor = TritonExecutor(triton_server.grpc_url, stream_calls=stream_calls)
    try:
        with pytest.raises(ModelUnavailable) as info:
            await executor.infer("no_such_model", ROWS, deadline=Deadline.after(2), priority=1)
        assert info.value.degradation_reason is Reason.MODEL_UNAVAILABLE
    finally:
        await executor.close()


@CALLS
async def test_in_flight_bound_refuses_at_once_and_counts_abandoned_calls(
    triton_server: TritonLauncher, stream_calls: bool
) -> None:
    executor = TritonExecutor(triton_server.grpc_url, max_in_flight={"driver_ranker": 2}, stream_calls=stream_calls)
    try:
        big = np.tile(ROWS, (32, 1))
        # Budgets too short to wait for: both calls are abandoned but stay in flight on Triton.
        for _ in range(2):
            with pytest.raises(ModelBudgetExceeded):
                await executor.infer("driver_ranker", big, deadline=Deadline.after(0.0001), priority=3)
        if executor.in_flight("driver_ranker") == 2:
            with pytest.raises(ModelOverloaded) as info:
                await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(2), priority=1)
            assert info.value.degradation_reason is Reason.OVERLOAD
        # The abandoned calls finish on Triton (not cancelled) and free their slots.
        await eventually(lambda: executor.in_flight("driver_ranker") == 0, "the abandoned calls to finish")
        assert executor.abandoned_calls == 0
        result = await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(2), priority=1)
        assert result.scores.shape == (2,)
    finally:
        await executor.close()


async def test_expired_budget_is_refused_before_calling() -> None:
    executor = TritonExecutor("127.0.0.1:1")
    try:
        with pytest.raises(ModelBudgetExceeded):
            await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(-1), priority=1)
        assert executor.in_flight("driver_ranker") == 0
    finally:
        await executor.close()


@CALLS
async def test_unreachable_triton_is_unavailable(stream_calls: bool) -> None:
    executor = TritonExecutor("127.0.0.1:1", stream_calls=stream_calls)
    try:
        with pytest.raises(ModelUnavailable):
            await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(2), priority=1)
    finally:
        await executor.close()


@CALLS
async def test_a_class_copy_shares_its_base_models_in_flight_bound(
    triton_server: TritonLauncher, stream_calls: bool
) -> None:
    """Calls to a traffic class's copy and to its base model run on the same instances: one bound."""
    copy = "driver_ranker__batch"
    executor = TritonExecutor(
        triton_server.grpc_url,
        max_in_flight={"driver_ranker": 1},
        shares_bound_with={copy: "driver_ranker"},
        stream_calls=stream_calls,
    )
    try:
        big = np.tile(ROWS, (32, 1))
        with pytest.raises(ModelBudgetExceeded):  # abandoned, but in flight on Triton for a while
            await executor.infer("driver_ranker", big, deadline=Deadline.after(0.0001), priority=3)
        if executor.in_flight("driver_ranker") == 1:
            assert executor.in_flight(copy) == 1
            with pytest.raises(ModelOverloaded):
                await executor.infer(copy, ROWS, deadline=Deadline.after(2), priority=3)
    finally:
        await executor.close()


async def test_streamed_answers_match_their_requests_and_unary_answers(triton_server: TritonLauncher) -> None:
    """Many requests at once on one stream: each gets its own rows' scores, as a unary call would."""
    rng = np.random.default_rng(5)
    inputs = [rng.random((int(rng.integers(1, 128)), 4), dtype=np.float32) * [1, 1, 1000, 30] for _ in range(40)]
    unary, streamed = TritonExecutor(triton_server.grpc_url), TritonExecutor(triton_server.grpc_url, stream_calls=True)
    try:
        want = [await unary.infer("driver_ranker", x, deadline=Deadline.after(5), priority=3) for x in inputs]
        got = await asyncio.gather(
            *(streamed.infer("driver_ranker", x, deadline=Deadline.after(5), priority=3) for x in inputs)
        )
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6)
            assert (g.model_name, g.model_version) == ("driver_ranker", "1")
    finally:
        await unary.close()
        await streamed.close()


async def test_a_refused_streamed_request_fails_alone(triton_server: TritonLauncher) -> None:
    """Triton refuses a too-large batch with an error on the stream; the next request is answered."""
    executor = TritonExecutor(triton_server.grpc_url, stream_calls=True)
    try:
        with pytest.raises(ModelCallFailed, match="batch-size must be <= 128") as info:
            await executor.infer("driver_ranker", np.tile(ROWS, (100, 1)), deadline=Deadline.after(5), priority=3)
        assert type(info.value) is ModelCallFailed
        with pytest.raises(ModelNotLoaded):
            await executor.infer("no_such_model", ROWS, deadline=Deadline.after(5), priority=3)
        result = await executor.infer("driver_ranker", ROWS, deadline=Deadline.after(5), priority=3)
        assert result.scores.shape == (2,) and executor.in_flight("driver_ranker") == 0
    finally:
        await executor.close()


async def test_closing_a_stream_settles_an_abandoned_request(triton_server: TritonLauncher) -> None:
    """A request whose caller stopped waiting is still counted until Triton answers it, and close
    returns once it has (that close never cancels it: tests/unit/test_infer_stream.py)."""
    executor = TritonExecutor(triton_server.grpc_url, stream_calls=True)
    big = np.tile(ROWS, (64, 1))
    with pytest.raises(ModelBudgetExceeded):
        await executor.infer("driver_ranker", big, deadline=Deadline.after(0.0001), priority=3)
    await executor.close()
    assert executor.abandoned_calls == 0 and executor.in_flight("driver_ranker") == 0
