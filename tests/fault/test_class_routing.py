"""Traffic classes reach their own Triton model copies through an embedded router.

``inferline up`` with ``triton.class_copies`` for ``driver_ranker``: the bundled Triton loads
``driver_ranker__critical`` (a 100 µs window) and ``driver_ranker__batch`` (20 ms, large
preferred batches), and the router sends each class to its copy; a class without a copy
uses the model itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.fault.conftest import BASE_ROUTE, EASY_BUDGETS
from tests.fault.load import PredictClient
from tests.integration.router_fixtures import ServerProcess

if TYPE_CHECKING:
    from tests.fault.conftest import Routers

pytestmark = pytest.mark.requires_triton

CLASS_COPIES = {
    "models": ["driver_ranker"],
    "classes": {
        "critical": {"max_queue_delay_us": 100, "preferred_batch_sizes": [1, 2]},
        "batch": {"max_queue_delay_us": 20000, "preferred_batch_sizes": [64, 128]},
    },
}


@pytest.fixture(scope="module")
def embedded(routers: Routers) -> Iterator[ServerProcess]:
    # Which copy serves a class is the point, not how fast: budgets no busy machine misses.
    config = routers.write_config(
        "class-copies", routes={BASE_ROUTE: {"budgets": EASY_BUDGETS}}, triton={"class_copies": CLASS_COPIES}
    )
    server = routers.start("class-copies", config)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


@pytest.mark.parametrize(
    ("traffic_class", "model"),
    [("critical", "driver_ranker__critical"), ("batch", "driver_ranker__batch"), ("standard", "driver_ranker")],
)
async def test_each_class_runs_on_its_copy(embedded: ServerProcess, traffic_class: str, model: str) -> None:
    async with PredictClient(embedded.address) as client:
        samples = [await client.predict([1001 + i], deadline_s=2.0, traffic_class=traffic_class) for i in range(5)]
    assert all(s.ok and s.served_by == "PRIMARY" for s in samples), [s.details or s.reason for s in samples]
    assert {s.model_name for s in samples} == {model}
