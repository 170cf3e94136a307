"""Overload through the router at 3× the route's sustainable rate for 30 s.

The route's primary is ``driver_ranker_narrow``: one instance, one row a batch, 20 ms a
batch — at most 50 rows a second, whatever the machine. Calls of one entity arrive at
three times ``SUSTAINABLE_PER_S``, 30% critical and 70% standard and batch, every one with
a 100 ms deadline. Without admission control every call would queue for the model until
its deadline; with it the router must:

* keep Triton up — the same tritonserver pid, ready, before and after (calling such a
  Triton directly with deadlines at this load crashed it, docs/triton.md);
* answer every call before its deadline or shed it (RESOURCE_EXHAUSTED with a retry hint),
  shedding fast, lowest class first, never a critical call;
* give the model's capacity to the highest class first;
* keep its memory flat.

"Before its deadline" is judged as ``assert_answered_in_time`` does: strictly on what the
router controls (its own timings and counts, every call it saw), on a share for what a
client sharing a busy 2-core machine with the router and Triton sees.
"""

from __future__ import annotations

import asyncio
import math
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import NARROW_BATCH, NARROW_MODEL
from tests.fault.load import (
    SteadyLoad,
    assert_answered_in_time,
    cycling,
    describe,
    percentile,
    router_account,
    scrape_metrics,
    summarize,
)
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = pytest.mark.requires_triton

ROUTE = "driver_ranking_narrow"
SUSTAINABLE_PER_S = 33.0
"""PRIMARY answers a second the narrow route gives here at most (measured under overload: 30-33):
the model's 50 rows a second, less the Python backend's and the router's coalescing overhead."""
OVERLOAD = 3.0
DURATION_S = 30.0
DEADLINE_S = 0.1
MIX = {"critical": 0.3, "standard": 0.35, "batch": 0.35}
SHED_COST_RATIO = 0.5
"""A shed call costs the router a few comparisons, an answered one a model call: the median
shed call must come back in at most this share of the median critical call answered by the
model (PRIMARY), both seen by the same client in the same run (measured: 0.1-0.2, also under
``stress-ng``; the benchmark's absolute target, 5 ms p99, is for an unshared machine). Not
against every answer: while the model's breaker is open most answers come from the
in-process light model in a millisecond or two, as fast as a shed (a CI run: 484 of 892
critical answers LIGHT/CIRCUIT_OPEN, answered p50 2.1 ms, shed p50 1.1 ms)."""
LIMIT_METRIC = f'inferline_admission_limit{{route="{ROUTE}"}}'
RSS_GROWTH_MB = 64
"""Most the router's resident memory may grow between the first third of the run and its end."""


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def router(routers: Routers, fault_triton: TritonLauncher) -> Iterator[ServerProcess]:
    with routers.running(
        "overload",
        triton=fault_triton,
        # A limit floor to suit the narrow model: it serves about 3 requests at a time.
        routes={ROUTE: {"primary": {"model": NARROW_MODEL}, "admission": {"min_limit": 4}}},
        # Merged calls must fit the narrow model's batches, and two calls per priority in
        # flight keep its one instance busy (one would leave it idle between calls).
        env={
            "INFERLINE_TRITON__COALESCE_MAX_BATCH_ROWS": str(NARROW_BATCH),
            "INFERLINE_TRITON__COALESCE_MAX_CONCURRENT": "2",
        },
    ) as server:
        yield server


async def test_overload_sheds_lowest_classes_and_answers_the_rest_in_time(
    router: ServerProcess, fault_triton: TritonLauncher
) -> None:
    triton_pid = fault_triton.pid
    router_pid = router.server.pid
    assert triton_pid is not None and router_pid is not None
    offered = SUSTAINABLE_PER_S * OVERLOAD
    loads = {
        cls: SteadyLoad(
            router.address,
            rate_per_s=offered * share,
            deadline_s=DEADLINE_S,
            entities=cycling(range(1001, 1301)),
            route=ROUTE,
            traffic_class=cls,
            server_pid=router_pid,
        )
        for cls, share in MIX.items()
    }
    start = await asyncio.to_thread(scrape_metrics, router.metrics_port)
    for load in loads.values():
        await load.__aenter__()
    await asyncio.sleep(DURATION_S / 3)
    rss_early = rss_mb(router_pid)
    await asyncio.sleep(DURATION_S * 2 / 3)
    rss_late = rss_mb(router_pid)
    samples = {cls: await load.stop() for cls, load in loads.items()}
    metrics = await asyncio.to_thread(scrape_metrics, router.metrics_port)

    everything = [s for cls_samples in samples.values() for s in cls_samples]
    shed = {cls: [s for s in ss if s.code is grpc.StatusCode.RESOURCE_EXHAUSTED] for cls, ss in samples.items()}
    shed_share = {cls: len(shed[cls]) / len(samples[cls]) for cls in samples}
    shed_latency = [s.latency_s for ss in shed.values() for s in ss]
    model_latency = [s.latency_s for s in samples["critical"] if s.ok and s.served_by == "PRIMARY"]
    accounts = {
        cls: router_account(start, metrics, route=ROUTE, deadline_s=DEADLINE_S, traffic_classes=[cls]) for cls in MIX
    }
    limit = metrics.get(LIMIT_METRIC)
    print(
        f"\noffered {offered:.0f}/s for {DURATION_S:.0f} s; router RSS {rss_early:.0f} -> {rss_late:.0f} MB; "
        f"client loop lag max {max(load.max_loop_lag_s for load in loads.values()) * 1000:.1f} ms; "
        f"admission limit at the end {limit}"
    )
    for cls, ss in samples.items():
        print(f"{cls}: {summarize(ss)}; {accounts[cls]}")
    p50, p99 = percentile(shed_latency, 50) * 1000, percentile(shed_latency, 99) * 1000
    print(
        f"shed latency ms p50 {p50:.1f} p99 {p99:.1f}; critical answered by the model p50 "
        f"{percentile(model_latency, 50) * 1000 if model_latency else math.nan:.1f} ms"
    )

    assert fault_triton.pid == triton_pid, "Triton died under the overload"
    assert fault_triton.is_running()

    # Every call answered in time or shed: what the router saw strictly (its own timings, and
    # no other refusal than a shed or a call that reached it with less than its fallback
    # reserve left), what the client saw on a share.
    overall = router_account(start, metrics, route=ROUTE, deadline_s=DEADLINE_S)
    assert_answered_in_time(everything, router=overall, statuses=[grpc.StatusCode.RESOURCE_EXHAUSTED])
    for cls, account in accounts.items():
        assert set(account.errors) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, f"{cls}: {account}"

    # Shed lowest class first, never a critical call (by the client's and the router's count).
    assert not shed["critical"], f"critical calls were shed: {describe(shed['critical'])}"
    assert "RESOURCE_EXHAUSTED" not in accounts["critical"].errors, accounts["critical"]
    # How much must be shed is the machine's to decide, not the test's: while the primary is the
    # path, admission sheds a large share of batch (over 20 % on a quiet machine); where a loaded
    # machine makes the narrow model miss its budget, its breaker opens and the in-process light
    # model answers cheaply, and then there is little left to shed (13 % under stress-ng). What
    # holds either way: batch is shed, and before standard.
    assert shed_share["batch"] > 0, f"admission shed no batch traffic: {shed_share}"
    assert shed_share["batch"] >= shed_share["standard"], f"batch must be shed first: {shed_share}"
    assert model_latency, f"no critical call answered by the model: {summarize(samples['critical'])}"
    assert percentile(shed_latency, 50) <= SHED_COST_RATIO * percentile(model_latency, 50)
    # The model's capacity goes to the highest class first (Triton serves critical's priority
    # first): of the calls each class got answered, critical's are the likeliest to come from
    # the primary, then standard's, then batch's. Counted on the router's answers; the shares
    # themselves depend on how fast the machine runs the model, their order does not.
    primary = {cls: account.served.get("PRIMARY", 0) / max(account.answers, 1) for cls, account in accounts.items()}
    assert primary["critical"] >= primary["standard"] >= primary["batch"], f"PRIMARY share of answers {primary}"
    assert rss_late - rss_early < RSS_GROWTH_MB
