"""The stream worker on NATS JetStream, the second engine: the same contract as on Redis
(each output once, order per key, poison parked, redelivery after ack_wait deduplicated),
against a real ``nats-server -js`` of the test's own on a free port."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from inferline.core.ports import LOOPBACK, free_port
from inferline.stream import StreamSpec
from inferline.stream.runner import run_stream
from inferline.triton.launcher import TritonLauncher
from tests.integration.conftest import require
from tests.integration.test_batch_run import ROUTE, batch_config, direct_scores, expected_features, feast_source
from tests.integration.test_stream_run import HOUR_MS, until

pytestmark = [pytest.mark.requires_triton, pytest.mark.requires_feast]


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private JetStream server (file store in a temp dir), terminated after the module."""
    binary = shutil.which("nats-server")
    require(binary is not None, "requires_nats", "no nats-server binary on PATH")
    assert binary is not None
    port = free_port()
    store = tmp_path_factory.mktemp("nats")
    log = (store / "nats.log").open("wb")
    process = subprocess.Popen([binary, "-js", "-sd", str(store), "-a", LOOPBACK, "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield f"nats://{LOOPBACK}:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        log.close()


@pytest.fixture
async def jetstream(nats_url: str) -> AsyncIterator[Any]:
    async def connect() -> Any:
        return await nats.connect(nats_url)

    nc = None
    for _ in range(200):  # until the server accepts connections (a hang fails after ~10 s)
        try:
            nc = await connect()
            break
        except Exception:
            await asyncio.sleep(0.05)
    assert nc is not None, "nats-server did not accept connections"
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def messages(js: Any, stream: str) -> list[dict[str, str]]:
    count = (await js.stream_info(stream)).state.messages
    return [json.loads((await js.get_msg(stream, seq)).data) for seq in range(1, count + 1)]


async def count(js: Any, stream: str, n: int) -> bool:
    try:
        return int((await js.stream_info(stream)).state.messages) >= n
    except nats.js.errors.NotFoundError:
        return False


async def test_jetstream_events_scored_once_in_key_order_with_poison_parked(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, nats_url: str, jetstream: Any
) -> None:
    config = batch_config(tmp_path)
    source = feast_source(config)
    js = jetstream
    await js.add_stream(name="nin", subjects=["nin"])
    n = 60
    rows = pd.DataFrame({"driver_id": 1001 + np.arange(n) % 6, "trip_distance_km": np.linspace(1.0, 20.0, n)})
    ids = []
    for r in rows.itertuples():
        ack = await js.publish(
            "nin", json.dumps({"driver_id": r.driver_id, "trip_distance_km": r.trip_distance_km}).encode()
        )
        ids.append(str(ack.seq))
    poison = str((await js.publish("nin", b'{"driver_id": "x"}')).seq)
    spec = StreamSpec.build(
        route=ROUTE, source=f"{nats_url}/nin", group="g", sink=f"{nats_url}/nout", budget_ms=HOUR_MS,
        read_count=8, max_in_flight=16,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(run_stream(config, spec, triton_server.grpc_url, stop))
    try:
        await until(lambda: count(js, "nout", n), "every good event answered")
        await until(lambda: count(js, "nin:dead", 1), "the poison event parked")
    finally:
        stop.set()
        await task
    out = await messages(js, "nout")
    dead = await messages(js, "nin:dead")
    info = await js.consumer_info("nin", "g")

    assert sorted(f["event_id"] for f in out) == sorted(ids)  # each once
    assert info.num_ack_pending == 0 and info.num_pending == 0
    for key in range(1001, 1007):
        assert [f["event_id"] for f in out if f["driver_id"] == str(key)] == [
            i for i, d in zip(ids, rows["driver_id"], strict=True) if d == key
        ]
    by_event = {f["event_id"]: f for f in out}
    want = direct_scores(triton_server.grpc_url, expected_features(source, rows))
    np.testing.assert_allclose([float(by_event[i]["score"]) for i in ids], want, atol=1e-5)
    assert {f["served_by"] for f in out} == {"PRIMARY"}
    assert dead[0]["event_id"] == poison and "driver_id" in dead[0]["reason"]


async def test_jetstream_sink_appends_each_source_event_once(nats_url: str, jetstream: Any) -> None:
    from inferline.stream.nats_streams import NatsStreamSink
    from inferline.stream.ports import Output
    from inferline.stream.spec import StreamEndpoint

    sink = NatsStreamSink(StreamEndpoint.parse(f"{nats_url}/once"), "once:dead", dedupe_ttl_s=3600)
    batch = [Output(str(i), {"score": f"0.{i}"}) for i in range(1, 9)]
    try:
        assert await sink.write([Output("7", {"score": "0.7"})]) == [True]
        # a redelivered batch: 7 again (written alone before), the rest new, in order
        assert await sink.write(batch) == [True] * 6 + [False, True]
        assert await sink.write(batch) == [False] * 8  # the whole batch again: nothing appended
    finally:
        await sink.close()
    scores = [m["score"] for m in await messages(jetstream, "once")]
    assert scores == ["0.7", *(f"0.{i}" for i in (1, 2, 3, 4, 5, 6, 8))]


async def test_jetstream_lag_spike_switches_to_the_light_model_and_back(
    tmp_path: pathlib.Path, triton_server: TritonLauncher, nats_url: str, jetstream: Any
) -> None:
    config = batch_config(tmp_path)
    feast_source(config)
    js = jetstream
    await js.add_stream(name="lagin", subjects=["lagin"])
    for i in range(150):  # the backlog a burst leaves
        await js.publish("lagin", json.dumps({"driver_id": 1001 + i % 7}).encode())
    spec = StreamSpec.build(
        route=ROUTE, source=f"{nats_url}/lagin", group="g", sink=f"{nats_url}/lagout", budget_ms=HOUR_MS,
        lag_high=40, lag_low=5, lag_interval_s=0.05, read_count=8, max_in_flight=8,
    )  # fmt: skip
    registry = CollectorRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(run_stream(config, spec, triton_server.grpc_url, stop, registry=registry))

    async def primary_again() -> bool:
        return registry.get_sample_value("inferline_stream_light_mode", {"route": ROUTE}) == 0

    try:
        await until(lambda: count(js, "lagout", 150), "the backlog answered")
        await until(primary_again, "back to the primary once the lag fell")
        after = [str((await js.publish("lagin", b'{"driver_id": 1001}')).seq) for _ in range(5)]
        await until(lambda: count(js, "lagout", 155), "the later events answered")
    finally:
        stop.set()
        await task
    out = {f["event_id"]: f for f in await messages(js, "lagout")}
    assert (out["1"]["mode"], out["1"]["served_by"], out["1"]["reason"]) == ("light", "LIGHT", "OVERLOAD")
    assert [(out[i]["mode"], out[i]["served_by"]) for i in after] == [("primary", "PRIMARY")] * 5
