"""Deadlines and invalid model output, through a real router on the fault tests' Triton.

Routes of the test config (all derived from ``driver_ranking``):

* ``driver_ranking_slow``: primary ``driver_ranker_slow`` (sleeps 200 ms a batch) with a
  500 ms model budget, so the main path's speed, not its budget, decides: a 1 s deadline
  is answered by PRIMARY, a 100 ms one must come back from the fallback in time (the
  router gives up on the main path the fault tests' ``WAY_BACK_RESERVE_MS`` + 5 ms before
  the deadline).
* ``driver_ranking_reserve``: a 200 ms fallback reserve, so a deadline below it, yet long
  enough for the round trip even on a busy machine (``REFUSED_DEADLINE_S``), shows the
  router's own refusal at arrival.
* ``driver_ranking_faulty``: primary ``driver_ranker_faulty`` fed the request-time
  ``trip_distance_km`` as its first column: -1 makes it answer NaN, -500 answers 7.0.

Layer budgets that are not under test are generous (``EASY_BUDGETS``): on a busy 2-core
machine a 20 ms features read or a 60 ms model call is sometimes missed, and the router
then rightly degrades, for a reason that is not the one a test looks at.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import EASY_BUDGETS, FAULTY_MODEL, SLOW_DELAY_MS, SLOW_MODEL
from tests.fault.load import (
    DEGRADED,
    PredictClient,
    assert_answered_in_time,
    router_account,
    scrape_metrics,
)
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = pytest.mark.requires_triton

SLOW_ROUTE = "driver_ranking_slow"
RESERVE_ROUTE = "driver_ranking_reserve"
FAULTY_ROUTE = "driver_ranking_faulty"
RESERVE_MS = 200.0
REFUSED_DEADLINE_S = RESERVE_MS / 2 / 1000
"""Under the reserve, so the router refuses the call at arrival; the refusal still has 100 ms to come back in."""
ROUTES: dict[str, dict[str, Any]] = {
    SLOW_ROUTE: {
        "primary": {"model": SLOW_MODEL},
        "budgets": {"features_ms": EASY_BUDGETS["features_ms"], "model_ms": 500},
    },
    RESERVE_ROUTE: {"budgets": {"fallback_reserve_ms": RESERVE_MS}},
    FAULTY_ROUTE: {
        "primary": {
            "model": FAULTY_MODEL,
            "features": ["trip_distance_km", "conv_rate", "acc_rate", "avg_daily_trips"],
        },
        "budgets": EASY_BUDGETS,
    },
}
SHORT_DEADLINE_S = 0.1
EASY_DEADLINE_S = 1.0
"""For calls judged on what reaches the caller, not on time: a deadline to match ``EASY_BUDGETS``."""
SLOW_CALLS = 8
"""Few enough that the breaker (20 calls at least) stays closed: every answer says DEADLINE."""


@pytest.fixture(scope="module")
def router(routers: Routers, fault_triton: TritonLauncher) -> Iterator[ServerProcess]:
    with routers.running("deadlines", triton=fault_triton, routes=ROUTES) as server:
        yield server


@pytest.fixture
async def client(router: ServerProcess) -> AsyncIterator[PredictClient]:
    async with PredictClient(router.address, server_pid=router.server.pid) as predict_client:
        yield predict_client


async def test_slow_main_path_is_answered_by_the_fallback_before_the_deadline(
    client: PredictClient, router: ServerProcess
) -> None:
    slow = await client.predict([1001], deadline_s=1.0, route=SLOW_ROUTE)
    assert (slow.code, slow.served_by) == (grpc.StatusCode.OK, "PRIMARY"), slow
    assert slow.latency_s >= SLOW_DELAY_MS / 1000  # the main path really is slower than the short deadline

    before = await asyncio.to_thread(scrape_metrics, router.metrics_port)
    samples = [
        await client.predict([1002 + i, 1003 + i], deadline_s=SHORT_DEADLINE_S, route=SLOW_ROUTE)
        for i in range(SLOW_CALLS)
    ]
    after = await asyncio.to_thread(scrape_metrics, router.metrics_port)
    samples = client.watch.annotate(samples)
    account = router_account(before, after, route=SLOW_ROUTE, deadline_s=SHORT_DEADLINE_S)
    print(
        f"\nslow route, {SHORT_DEADLINE_S * 1000:.0f} ms deadline: "
        + ", ".join(f"{s.served_by}/{s.reason} {s.latency_s * 1000:.1f} ms (router {s.router_ms:.1f})" for s in samples)
        + f"; {account}"
    )
    assert_answered_in_time(samples, router=account)
    # Every call was answered by the fallback for want of time, by the router's own account
    # (which also holds an answer the client might have given up on) and as the client saw it.
    assert account.answers == SLOW_CALLS and set(account.served) <= {f"{s}/DEADLINE" for s in DEGRADED}, account
    assert {s.served_by for s in samples if s.ok} <= DEGRADED
    assert {s.reason for s in samples if s.ok} == {"DEADLINE"}


async def test_deadline_below_the_fallback_reserve_is_refused_at_once(client: PredictClient) -> None:
    refused = await client.predict([1001], deadline_s=REFUSED_DEADLINE_S, route=RESERVE_ROUTE)
    print(
        f"\n{REFUSED_DEADLINE_S * 1000:.0f} ms deadline, {RESERVE_MS:.0f} ms reserve: {refused.code.name} "
        f"after {refused.latency_s * 1000:.1f} ms ({refused.details})"
    )
    # The router's own refusal at arrival, not the client's timeout: only the router says
    # "left on arrival", and it says so before the deadline runs out, or the client would
    # have failed the call with its own "Deadline Exceeded" first.
    assert refused.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "left on arrival" in refused.details

    # Below driver_ranking's reserve: refused by the router, or expired on the way there.
    tiny = await client.predict([1001], deadline_s=0.003)
    assert tiny.code is grpc.StatusCode.DEADLINE_EXCEEDED

    # Above the reserve the call is served, not refused (by PRIMARY, or degraded if the
    # main path is slow on a busy machine: how it is served is not what this checks).
    served = await client.predict([1001], deadline_s=EASY_DEADLINE_S, route=RESERVE_ROUTE)
    assert served.code is grpc.StatusCode.OK and served.scores, served


@pytest.mark.parametrize(("distance_km", "what"), [(-1.0, "NaN"), (-500.0, "7.0, out of range")])
async def test_invalid_model_output_never_reaches_the_caller(
    client: PredictClient, distance_km: float, what: str
) -> None:
    ids = [1001, 1002, 1003]
    deadline_s = EASY_DEADLINE_S
    before = await client.predict(
        ids, deadline_s=deadline_s, route=FAULTY_ROUTE, request_features={"trip_distance_km": 5}
    )
    assert (before.code, before.served_by) == (grpc.StatusCode.OK, "PRIMARY"), before

    bad = await client.predict(
        ids, deadline_s=deadline_s, route=FAULTY_ROUTE, request_features={"trip_distance_km": distance_km}
    )
    print(f"\nfaulty model answering {what}: {bad.served_by}/{bad.reason}, scores {bad.scores}")
    assert_answered_in_time(client.watch.annotate([bad]))  # includes: every score finite and in [0, 1]
    assert bad.served_by in DEGRADED
    assert bad.reason == "INVALID_OUTPUT"
    assert sorted(bad.scores) == ids and not any(math.isnan(v) for v in bad.scores.values())

    after = await client.predict(
        ids, deadline_s=deadline_s, route=FAULTY_ROUTE, request_features={"trip_distance_km": 2}
    )
    assert (after.code, after.served_by) == (grpc.StatusCode.OK, "PRIMARY"), after
