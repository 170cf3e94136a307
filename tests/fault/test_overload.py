"""Overload through the router at 3× the route's sustainable rate for 30 s.

The route's primary is ``driver_ranker_narrow``: one instance, two rows a batch, 10 ms a
batch — at most 200 rows a second, whatever the machine. Calls of one entity arrive at
three times ``SUSTAINABLE_PER_S``, 30% critical and 70% standard and batch, every one with
a 100 ms deadline. Without admission control every call would queue for the model until
its deadline; with it the router must:

* keep Triton up — the same tritonserver pid, ready, before and after (calling such a
  Triton directly with deadlines at this load crashed it, RECIPES.md "Known defect");
* answer every call before its deadline or shed it (RESOURCE_EXHAUSTED with a retry hint),
  shedding fast, lowest class first, never a critical call;
* keep its memory flat.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import NARROW_BATCH, NARROW_MODEL
from tests.fault.load import (
    CLIENT_SLACK_S,
    SteadyLoad,
    cycling,
    describe,
    percentile,
    scrape_metrics,
    summarize,
)
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = pytest.mark.requires_triton

ROUTE = "driver_ranking_narrow"
SUSTAINABLE_PER_S = 150.0
"""PRIMARY answers a second the narrow route gives here at most (measured under overload: 140-150):
the model's 200 rows a second, less the Python backend's and one-call-at-a-time coalescing's overhead."""
OVERLOAD = 3.0
DURATION_S = 30.0
DEADLINE_S = 0.1
MIX = {"critical": 0.3, "standard": 0.35, "batch": 0.35}
SHED_WITHIN_S = 0.05
"""A shed call must come back this fast (the benchmark's target is 5 ms; a test on shared
cores, with the client on them too, asserts a loose bound)."""
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
        )
        for cls, share in MIX.items()
    }
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
    limit = metrics.get(LIMIT_METRIC)
    print(
        f"\noffered {offered:.0f}/s for {DURATION_S:.0f} s; router RSS {rss_early:.0f} -> {rss_late:.0f} MB; "
        f"client loop lag max {max(load.max_loop_lag_s for load in loads.values()) * 1000:.1f} ms; "
        f"admission limit at the end {limit}"
    )
    for cls, ss in samples.items():
        print(f"{cls}: {summarize(ss)}")
    p50, p99 = percentile(shed_latency, 50) * 1000, percentile(shed_latency, 99) * 1000
    print(f"shed latency ms p50 {p50:.1f} p99 {p99:.1f}")

    assert fault_triton.pid == triton_pid, "Triton died under the overload"
    assert fault_triton.is_running()

    answered_or_shed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    other = [s for s in everything if s.code not in answered_or_shed]
    assert not other, f"{len(other)} calls neither answered nor shed: {describe(other)}"
    late = [s for s in everything if s.ok and s.latency_s >= s.deadline_s + CLIENT_SLACK_S]
    assert not late, f"{len(late)} answers after their deadline: {describe(late)}"

    assert not shed["critical"], f"critical calls were shed: {describe(shed['critical'])}"
    assert shed_share["batch"] > 0.2, f"admission shed too little batch traffic: {shed_share}"
    assert shed_share["batch"] >= shed_share["standard"], f"batch must be shed first: {shed_share}"
    assert percentile(shed_latency, 99) < SHED_WITHIN_S
    critical = samples["critical"]
    by = collections.Counter(s.served_by for s in critical)
    assert by["PRIMARY"] + by["LIGHT"] >= 0.9 * len(critical), f"critical calls served by {dict(by)}"
    assert rss_late - rss_early < RSS_GROWTH_MB
