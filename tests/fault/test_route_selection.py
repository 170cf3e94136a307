"""Route selection through a real router: spill to an alternate, cheapest for batch, tenant pins.

Every route here has full-quality variants on the fault tests' Triton; which one answered
is the response's ``model_name``. Only the spill route's model budget is under test; the
others get budgets no busy machine misses (``EASY_BUDGETS``) and calls with time to match,
so that which variant answers is decided by cost and pins alone.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from inferline.triton.launcher import TritonLauncher
from tests.fault.conftest import EASY_BUDGETS, FAULTY_MODEL, SLOW_MODEL
from tests.fault.load import PredictClient, Sample, assert_answered_in_time, summarize
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = pytest.mark.requires_triton

CPU_MODEL = "driver_ranker"
FEATURES = ["conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km"]
SPILL_ROUTE = "selection_spill"
COST_ROUTE = "selection_cost"
PIN_ROUTE = "selection_pin"
ROUTES = {
    # The preferred variant is slow (200 ms a batch, "GPU"), past the 60 ms model budget.
    SPILL_ROUTE: {
        "primary": {"model": SLOW_MODEL, "features": FEATURES, "device": "gpu", "parallelism": 1},
        "alternates": [{"model": CPU_MODEL, "features": FEATURES, "device": "cpu"}],
        "budgets": {"features_ms": EASY_BUDGETS["features_ms"]},
    },
    # Two healthy variants: an expensive "GPU" one preferred, a cheap "CPU" one.
    # (driver_ranker_faulty answers normally for these entities: their first feature is positive.)
    COST_ROUTE: {
        "primary": {"model": CPU_MODEL, "features": FEATURES, "device": "gpu"},
        "alternates": [{"model": FAULTY_MODEL, "features": FEATURES, "device": "cpu"}],
        "budgets": EASY_BUDGETS,
    },
    PIN_ROUTE: {
        "primary": {"model": CPU_MODEL, "features": FEATURES},
        "alternates": [{"model": FAULTY_MODEL, "features": FEATURES}],
        "budgets": EASY_BUDGETS,
    },
}
SPILL_DEADLINE_S = 0.15
EASY_DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def router(routers: Routers, fault_triton: TritonLauncher) -> Iterator[ServerProcess]:
    with routers.running(
        "selection",
        triton=fault_triton,
        routes=ROUTES,
        traffic_classes={"batch": {"prefer_cheapest": True}},
        tenants={"demo": {"pin": {PIN_ROUTE: FAULTY_MODEL}}},
    ) as server:
        yield server


@pytest.fixture
async def client(router: ServerProcess) -> AsyncIterator[PredictClient]:
    async with PredictClient(router.address, server_pid=router.server.pid) as predict_client:
        yield predict_client


async def calls(
    client: PredictClient, route: str, n: int, traffic_class: str = "critical", deadline_s: float = EASY_DEADLINE_S
) -> list[Sample]:
    return [
        await client.predict([1001 + i % 50], deadline_s=deadline_s, route=route, traffic_class=traffic_class)
        for i in range(n)
    ]


def served_by_model(samples: list[Sample]) -> collections.Counter[str]:
    return collections.Counter(s.model_name if s.served_by == "PRIMARY" else s.served_by for s in samples)


async def test_requests_spill_from_a_variant_too_slow_for_the_budget(client: PredictClient) -> None:
    samples = client.watch.annotate(await calls(client, SPILL_ROUTE, 60, deadline_s=SPILL_DEADLINE_S))
    print(f"\n{summarize(samples)}; by model {dict(served_by_model(samples))}")
    assert_answered_in_time(samples)
    first = samples[0]
    assert first.served_by != "PRIMARY" and first.reason == "DEADLINE", "the untried slow variant is tried first"
    later = served_by_model(samples[2:])
    assert later[CPU_MODEL] >= 0.9 * len(samples[2:]), f"no spill to the alternate: {dict(later)}"
    assert later[SLOW_MODEL] == 0


async def test_batch_traffic_takes_the_cheapest_variant_and_critical_the_preferred(client: PredictClient) -> None:
    batch = served_by_model((await calls(client, COST_ROUTE, 30, "batch"))[5:])
    critical = served_by_model((await calls(client, COST_ROUTE, 30, "critical"))[5:])
    print(f"\nbatch {dict(batch)}; critical {dict(critical)}")
    assert batch[FAULTY_MODEL] == 25, f"batch traffic should run on the cheap CPU variant: {dict(batch)}"
    assert critical[CPU_MODEL] == 25, f"critical traffic should run on the preferred variant: {dict(critical)}"


async def test_a_tenant_pin_overrides_the_preference(client: PredictClient) -> None:
    pinned = served_by_model(await calls(client, PIN_ROUTE, 10))
    assert pinned == {FAULTY_MODEL: 10}, dict(pinned)
