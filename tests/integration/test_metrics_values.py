"""Metric values after known traffic through a real router and the real bundled Triton.

The router process is shared with other tests of the session, so every check compares
the values before and after this test's own traffic.
"""

from __future__ import annotations

import collections
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.dashboard_queries import dashboard_and_alert_selectors, unmatched
from tests.integration.router_fixtures import DEMO_KEY, ServerProcess

pytestmark = pytest.mark.requires_triton

AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
ROUTE = "driver_ranking"
N = 40
ENTITIES = 3
REFRESH_WAIT_S = 60.0
"""The collector snapshots Triton every 5 s; polled until it has, for as long as a busy machine could take."""
TINY_DEADLINE_S = 0.008
MAX_TINY_CALLS = 10 * N
"""Calls with the tiny deadline until ``N`` were answered: on a busy machine many expire on the
way (the round trip alone can take 8 ms), and each answer, not each call, is what is checked."""

Sample = tuple[str, dict[str, str], float]


def scrape(server: ServerProcess) -> list[Sample]:
    """Every sample of the router's metrics endpoint as (name, labels, value)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


UNDEFINED_UNTIL_ANSWERS = ("inferline_cost_per_1k_requests", "inferline_device_utilization")
"""Cost per 1K answers is undefined before the first answer; GPU utilization exists only where Triton has GPUs."""


def _request(i: int) -> pb.PredictRequest:
    ids = [1001 + (i + k) % 5 for k in range(ENTITIES)]
    return pb.PredictRequest(
        route=ROUTE, traffic_class="standard", entities=[pb.EntityKey(name="driver_id", int64_value=x) for x in ids]
    )


@pytest.fixture
def stub(router_server: ServerProcess) -> Iterator[pb_grpc.InferenceStub]:
    channel = grpc.insecure_channel(router_server.address)
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def test_primary_traffic_counts_latency_triton_figures_and_cost(
    router_server: ServerProcess, stub: pb_grpc.InferenceStub
) -> None:
    ok_primary = {"route": ROUTE, "traffic_class": "standard", "served_by": "PRIMARY", "reason": "", "code": "OK"}
    total_layer = {"route": ROUTE, "traffic_class": "standard", "layer": "total"}
    stub.Predict(_request(0), timeout=5, metadata=AUTH)  # connected and warm before the "before" scrape
    before = scrape(router_server)
    models = collections.Counter()
    for i in range(N):
        response = stub.Predict(_request(i), timeout=5, metadata=AUTH)
        assert response.served_by == pb.SERVED_BY_PRIMARY
        models[response.model_name] += 1
    after = scrape(router_server)
    assert (
        total(after, "inferline_requests_total", **ok_primary) - total(before, "inferline_requests_total", **ok_primary)
        == N
    )
    count = "inferline_layer_latency_seconds_count"
    assert total(after, count, **total_layer) - total(before, count, **total_layer) == N
    calls = "inferline_model_calls_total"
    assert (
        sum(total(after, calls, route=ROUTE, model=m) - total(before, calls, route=ROUTE, model=m) for m in models) == N
    )

    # Triton's figures reach the router at its next statistics refresh.
    def inferred(samples: list[Sample]) -> float:
        return sum(total(samples, "inferline_triton_inferences_total", model=m) for m in models)

    deadline = time.monotonic() + REFRESH_WAIT_S
    while inferred(after) - inferred(before) < N * ENTITIES and time.monotonic() < deadline:
        time.sleep(0.5)
        after = scrape(router_server)
    assert inferred(after) - inferred(before) >= N * ENTITIES  # every answered row was inferred on Triton
    for model in models:
        assert total(after, "inferline_triton_batch_efficiency", model=model) >= 1
        assert total(after, "inferline_triton_busy_seconds_total", model=model, device="cpu") > 0
        assert total(after, "inferline_triton_queue_seconds_total", model=model) >= 0
        assert total(after, "inferline_triton_compute_seconds_total", model=model) > 0
    assert total(after, "inferline_cost_total", route=ROUTE) > total(before, "inferline_cost_total", route=ROUTE)
    assert total(after, "inferline_cost_per_1k_requests", route=ROUTE) > 0


def test_answers_past_a_tiny_deadline_are_counted_by_who_served_them(
    router_server: ServerProcess, stub: pb_grpc.InferenceStub
) -> None:
    """8 ms deadlines leave no room for the primary path, so every answer is degraded.

    On a loaded machine a request can also spend more than 3 ms in transport and arrive
    with less than the 5 ms fallback reserve: the router then refuses it at once with
    DEADLINE_EXCEEDED, which is the documented behaviour, so those are counted apart
    rather than failing the test; or it expires on the way, at the client. Calls are sent
    until ``N`` were answered (at most ``MAX_TINY_CALLS``), and each answer must be counted
    by who served it, and why.
    """
    stub.Predict(_request(0), timeout=5, metadata=AUTH)  # warm: the score cache now holds these entities
    before = scrape(router_server)
    served: collections.Counter[tuple[str, str]] = collections.Counter()
    refused_on_arrival = expired_at_client = 0
    for i in range(MAX_TINY_CALLS):
        if served.total() == N:
            break
        try:
            response = stub.Predict(_request(i), timeout=TINY_DEADLINE_S, metadata=AUTH)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            if "needed even for a degraded answer" in (error.details() or ""):
                refused_on_arrival += 1
            else:
                expired_at_client += 1  # the router may still have answered, after the client gave up
            continue
        served[pb.ServedBy.Name(response.served_by), pb.DegradationReason.Name(response.degradation_reason)] += 1
    after = scrape(router_server)
    answered = served.total()
    assert answered == N, (served, refused_on_arrival, expired_at_client)

    def delta(**labels: str) -> float:
        labels = {"route": ROUTE, "traffic_class": "standard", "code": "OK", **labels}
        return total(after, "inferline_requests_total", **labels) - total(before, "inferline_requests_total", **labels)

    degraded = sum(delta(served_by=s, reason="DEADLINE") for s in ("CACHE", "BASELINE", "LIGHT"))
    assert answered <= degraded <= answered + expired_at_client, served
    assert delta(served_by="PRIMARY", reason="") <= expired_at_client
    for (served_by, reason), n in served.items():
        counted = delta(
            served_by=served_by.removeprefix("SERVED_BY_"), reason=reason.removeprefix("DEGRADATION_REASON_")
        )
        assert n <= counted <= n + expired_at_client


def test_every_series_the_dashboard_and_alerts_read_is_exported_with_one_route_scheme(
    router_server: ServerProcess,
) -> None:
    """Every selector of deploy/grafana matches a series of the real router (its first scrape may be this one),
    and admission gauges name KServe front-door routes as request counters do (``kserve:<model>``)."""
    samples = [(name, labels) for name, labels, _ in scrape(router_server)]
    selected = dashboard_and_alert_selectors(keep=lambda name: name not in UNDEFINED_UNTIL_ANSWERS)
    missing = {where: unmatched(found, samples) for where, found in selected.items()}
    assert not {where: m for where, m in missing.items() if m}
    gauge_routes = {labels["route"] for name, labels in samples if name == "inferline_admission_limit"}
    request_routes = {labels["route"] for name, labels in samples if name == "inferline_requests_total"}
    assert "kserve:driver_ranker" in gauge_routes & request_routes
    assert not any(route.startswith("model:") for route in gauge_routes | request_routes)
