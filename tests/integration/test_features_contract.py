"""One contract suite for both FeatureClient implementations, against the real Feast SQLite repo.

``local`` calls FeaturesService in-process; ``grpc`` goes through a real grpc.aio server on an
ephemeral port running FeaturesServicer. Both read the materialized demo repo through
FeastOnlineStore, and both must answer (and fail) the same way.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferline.core.config import InferlineConfig, load_config
from inferline.core.deadline import Deadline
from inferline.core.errors import InferlineError, InvalidInput, RouteNotFound
from inferline.features import (
    FeastOnlineStore,
    FeatureClient,
    FeaturesService,
    GrpcFeatureClient,
    LocalFeatureClient,
    feast_direct,
)
from inferline.features.servicer import FeaturesServicer
from inferline.features.store import INLINE_MAX_ENTITIES
from inferline.internal.v1 import features_pb2_grpc

pytestmark = pytest.mark.requires_feast

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUTE = "driver_ranking"
KNOWN, UNKNOWN = 1001, 99
STORED = ["conv_rate", "acc_rate", "avg_daily_trips"]


@pytest.fixture(scope="module")
def config() -> InferlineConfig:
    return load_config(ROOT / "deploy/local/inferline.yaml")


@pytest.fixture(scope="module")
def feast_repo(config: InferlineConfig) -> pathlib.Path:
    """The materialized demo repo; skipped outside CI when absent, a failure in CI."""
    repo = config.feature_store.feast_repo
    if not all((repo / "data" / name).is_file() for name in ("registry.db", "online_store.db")):
        message = f"requires_feast: run make setup (no materialized Feast data under {repo / 'data'})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return repo


@pytest.fixture
async def store(feast_repo: pathlib.Path) -> AsyncIterator[FeastOnlineStore]:
    online = FeastOnlineStore(feast_repo)
    yield online
    await online.close()


@pytest.fixture(scope="module")
def expected(feast_repo: pathlib.Path, config: InferlineConfig) -> dict[str, list[object]]:
    """What Feast itself returns for the known and unknown driver (the reference answer)."""
    import feast

    route = config.routes[ROUTE]
    refs = [f.source for f in route.features if f.source is not None]
    rows = [{"driver_id": KNOWN}, {"driver_id": UNKNOWN}]
    table: dict[str, list[object]] = (
        feast.FeatureStore(repo_path=str(feast_repo)).get_online_features(features=refs, entity_rows=rows).to_dict()
    )
    return table


@pytest.fixture
async def service(config: InferlineConfig, store: FeastOnlineStore) -> AsyncIterator[FeaturesService]:
    svc = FeaturesService(config.routes, store, config.feature_store)
    await svc.warm_up()
    yield svc
    await svc.close()


@pytest.fixture(params=["local", "grpc"])
async def client(
    request: pytest.FixtureRequest, service: FeaturesService, config: InferlineConfig
) -> AsyncIterator[FeatureClient]:
    if request.param == "local":
        yield LocalFeatureClient(service)
        return
    server = grpc.aio.server()
    features_pb2_grpc.add_FeaturesServicer_to_server(FeaturesServicer(service, config.routes), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield GrpcFeatureClient(channel, config.routes)
    finally:
        await server.stop(None)


def deadline() -> Deadline:
    return Deadline.after(5.0)


def assert_status(err: InferlineError, code: grpc.StatusCode) -> None:
    """The domain error carries ``code``; over gRPC it also came back with that status."""
    assert err.code == code
    if isinstance(err.__cause__, grpc.aio.AioRpcError):
        assert err.__cause__.code() == code


async def test_known_driver_gets_store_values(client: FeatureClient, expected: dict[str, list[object]]) -> None:
    vector = await client.get(ROUTE, [KNOWN], {"trip_distance_km": 3.5}, deadline=deadline())
    assert vector.names == (*STORED, "trip_distance_km")
    want = [float(expected[name][0]) for name in STORED]  # type: ignore[arg-type]
    np.testing.assert_array_equal(vector.values[0], np.array([*want, 3.5], dtype=np.float32))
    assert not vector.defaulted.any()
    assert not vector.degraded


async def test_unknown_driver_gets_defaults_flagged(
    client: FeatureClient, config: InferlineConfig, expected: dict[str, list[object]]
) -> None:
    assert all(expected[name][1] is None for name in STORED)  # Feast agrees it is unknown
    vector = await client.get(ROUTE, [KNOWN, UNKNOWN], {}, deadline=deadline())
    defaults = [f.default for f in config.routes[ROUTE].features]
    np.testing.assert_array_equal(vector.values[1], np.array(defaults, dtype=np.float32))
    assert vector.defaulted_names(1) == [*STORED, "trip_distance_km"]
    assert vector.defaulted_names(0) == ["trip_distance_km"]  # request-time feature not given
    assert not vector.degraded


async def test_names_select_columns(client: FeatureClient, expected: dict[str, list[object]]) -> None:
    vector = await client.get(ROUTE, [KNOWN], {}, deadline=deadline(), names=["acc_rate", "conv_rate"])
    assert vector.names == ("acc_rate", "conv_rate")
    want = [float(expected[name][0]) for name in ("acc_rate", "conv_rate")]  # type: ignore[arg-type]
    np.testing.assert_array_equal(vector.values[0], np.array(want, dtype=np.float32))


async def test_wrong_key_type_is_invalid_argument(client: FeatureClient) -> None:
    with pytest.raises(InvalidInput) as err:
        await client.get(ROUTE, ["1001"], {}, deadline=deadline())
    assert err.value.field == "entities[0]"
    assert_status(err.value, grpc.StatusCode.INVALID_ARGUMENT)


async def test_unknown_request_feature_is_invalid_argument(client: FeatureClient) -> None:
    with pytest.raises(InvalidInput) as err:
        await client.get(ROUTE, [KNOWN], {"surge": 1.0}, deadline=deadline())
    assert err.value.field == "request_features"
    assert_status(err.value, grpc.StatusCode.INVALID_ARGUMENT)


async def test_unknown_route_is_not_found(client: FeatureClient) -> None:
    with pytest.raises(RouteNotFound) as err:
        await client.get("no_such_route", [KNOWN], {}, deadline=deadline())
    assert_status(err.value, grpc.StatusCode.NOT_FOUND)


# Reads of plain views go through the online store's online_read (feast_direct), not Feast's
# get_online_features: they must answer exactly as Feast's full read does.

REFS = [f"driver_hourly_stats:{name}" for name in STORED]


def feast_columns(feast_repo: pathlib.Path, refs: list[str], ids: list[int]) -> dict[str, list[float | None]]:
    import feast

    table = (
        feast.FeatureStore(repo_path=str(feast_repo))
        .get_online_features(features=refs, entity_rows={"driver_id": ids}, full_feature_names=True)
        .to_dict()
    )
    return {ref: [None if v is None else float(v) for v in table[ref.replace(":", "__")]] for ref in refs}


async def test_direct_reads_answer_as_feasts_full_read(store: FeastOnlineStore, feast_repo: pathlib.Path) -> None:
    rng = np.random.default_rng(7)
    # Known drivers, unknown ones, and repeats, in one read; refs in another order than the view's.
    ids = [*rng.integers(1001, 100_001, 300).tolist(), UNKNOWN, 1, KNOWN, KNOWN]
    refs = [REFS[2], REFS[0], REFS[1]]
    assert store.reads_directly(refs, "driver_id")
    got = await store.read(refs, "driver_id", ids)
    assert got == feast_columns(feast_repo, refs, ids)
    assert got[REFS[0]][-1] is not None and got[REFS[0]][300] is None  # both kinds really occur
    assert store.read_blocking(refs[:1], "driver_id", [KNOWN]) == feast_columns(feast_repo, refs[:1], [KNOWN])


async def test_refs_without_a_direct_plan_go_through_feasts_full_read(store: FeastOnlineStore) -> None:
    # Another join key than the view's, an unknown view or feature: Feast's own read (and errors).
    assert not store.reads_directly(REFS, "rider_id")
    assert not store.reads_directly(["no_such_view:conv_rate"], "driver_id")
    assert not store.reads_directly([*REFS, "driver_hourly_stats:no_such_feature"], "driver_id")
    with pytest.raises(Exception, match="no_such_feature"):
        await store.read([*REFS, "driver_hourly_stats:no_such_feature"], "driver_id", [KNOWN])


async def test_small_direct_reads_run_on_the_calling_thread_and_large_ones_on_the_read_thread(
    store: FeastOnlineStore, feast_repo: pathlib.Path
) -> None:
    assert store.reads_inline(REFS, "driver_id", INLINE_MAX_ENTITIES)
    assert not store.reads_inline(REFS, "driver_id", INLINE_MAX_ENTITIES + 1)
    assert not store.reads_inline(REFS, "rider_id", 1)  # Feast's full read: always on the thread
    ids = [KNOWN, UNKNOWN, 1002]
    assert await store.read(REFS, "driver_id", ids) == feast_columns(feast_repo, REFS, ids)
    bulk = FeastOnlineStore(feast_repo, inline_small_reads=False)  # a batch job's: never on its loop
    try:
        assert not bulk.reads_inline(REFS, "driver_id", 1)
        assert await bulk.read(REFS, "driver_id", ids) == feast_columns(feast_repo, REFS, ids)
    finally:
        await bulk.close()


async def test_an_inline_read_fails_at_once_while_a_writer_holds_the_store_and_reads_again_after(
    store: FeastOnlineStore, feast_repo: pathlib.Path
) -> None:
    writer = sqlite3.connect(feast_repo / "data" / "online_store.db", timeout=0)
    try:
        writer.execute("BEGIN EXCLUSIVE")  # as a committing `feast materialize` does
        started = time.perf_counter()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await store.read(REFS, "driver_id", [KNOWN])
        # Python's own wait would be 5 s; the loop is held for INLINE_BUSY_TIMEOUT_MS (2 ms).
        assert time.perf_counter() - started < 1.0
    finally:
        writer.rollback()
        writer.close()
    assert await store.read(REFS, "driver_id", [KNOWN]) == feast_columns(feast_repo, REFS, [KNOWN])


# On Feast's SQLite store a planned read queries the view's table itself (feast_direct.SqliteView):
# it must answer exactly as the online store's own online_read does, and step aside when the
# table is not there or not laid out as read.


def planned(feast_repo: pathlib.Path, refs: list[str]) -> tuple[feast_direct.ReadPlan, Any, Any]:
    import feast

    fs = feast.FeatureStore(repo_path=str(feast_repo))
    plan = feast_direct.plan_read(fs, refs, "driver_id")
    assert plan is not None
    return plan, fs._get_provider(), fs.config


def through_online_read(plan: feast_direct.ReadPlan) -> feast_direct.ReadPlan:
    return dataclasses.replace(plan, views=[dataclasses.replace(v, sqlite=None) for v in plan.views])


@pytest.mark.parametrize("refs", [REFS, [REFS[2], REFS[0]]], ids=["every-feature", "some-features"])
def test_sqlite_table_reads_answer_as_online_read(feast_repo: pathlib.Path, refs: list[str]) -> None:
    plan, provider, config = planned(feast_repo, refs)
    where = plan.views[0].sqlite
    assert where is not None and where.int64_key_prefix is not None  # the table path, keys built here
    rng = np.random.default_rng(11)
    ids = [*rng.integers(1001, 100_001, 500).tolist(), UNKNOWN, KNOWN, KNOWN, -1, 2**63 - 1]
    got = plan.read(provider, config, refs, ids)
    assert got == through_online_read(plan).read(provider, config, refs, ids)
    assert got[refs[0]][0] is not None and got[refs[0]][500] is None and got[refs[0]][501] == got[refs[0]][502]
    assert plan.read(provider, config, refs, []) == {ref: [] for ref in refs}


@settings(max_examples=200, deadline=None)
@given(value=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_keys_built_here_are_feasts_serialisation(value: int) -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    prefix = feast_direct._int64_key_prefix("driver_id", 3)  # Feast 0.67 writes no other version
    assert prefix is not None
    key = EntityKey(join_keys=["driver_id"], entity_values=[Value(int64_val=value)])
    assert prefix + value.to_bytes(8, "little", signed=True) == serialize_entity_key(
        key, entity_key_serialization_version=3
    )


@pytest.mark.parametrize("table", ["absent", "other-layout"])
def test_a_store_without_the_read_table_layout_is_read_through_online_read(
    feast_repo: pathlib.Path, tmp_path: pathlib.Path, table: str
) -> None:
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(feast_repo / "feature_store.yaml", repo)
    shutil.copy(feast_repo / "data" / "registry.db", repo / "data")
    online = sqlite3.connect(repo / "data" / "online_store.db")
    if table == "other-layout":  # a layout this code does not know: no `value` column
        online.execute("CREATE TABLE inferline_demo_driver_hourly_stats (entity_key BLOB, feature_name TEXT, v BLOB)")
        online.commit()
    online.close()
    plan, provider, config = planned(repo, REFS)
    assert plan.views[0].sqlite is None
    # Feast's own read, and so Feast's own error naming the problem.
    with pytest.raises(sqlite3.OperationalError, match=r"no such (table|column)"):
        plan.read(provider, config, REFS, [KNOWN])


# A batch job that meets most of the store reads the views whole (ReadPlan.scan): the scan
# must hold exactly what reads of the same entities answer.


def scanned(plan: feast_direct.ReadPlan, refs: list[str], parts: int) -> dict[object, list[float | None]]:
    """Every scanned entity's values, one per ref (None where the scan found none)."""
    from inferline.batch.view_scan import scan_matrix

    ids, matrix = scan_matrix([plan.scan(refs, part, parts) for part in range(parts)], len(refs))
    return {e: [None if np.isnan(v) else float(v) for v in row] for e, row in zip(ids, matrix.tolist(), strict=True)}


@pytest.mark.parametrize("keys", ["int64-keys-decoded-here", "keys-decoded-by-feast"])
def test_a_whole_view_scan_holds_what_reads_answer(feast_repo: pathlib.Path, keys: str) -> None:
    refs = [REFS[2], REFS[0]]  # some of the view's features, in another order
    plan, provider, config = planned(feast_repo, refs)
    assert plan.scannable and plan.entities() == 100_000
    if keys == "keys-decoded-by-feast":
        where = plan.views[0].sqlite
        assert where is not None
        feast_keys = dataclasses.replace(where, int64_key_prefix=None)
        plan = dataclasses.replace(plan, views=[dataclasses.replace(plan.views[0], sqlite=feast_keys)])
    whole = scanned(plan, refs, parts=3)
    assert len(whole) == 100_000 and KNOWN in whole and UNKNOWN not in whole
    sample = [KNOWN, *np.random.default_rng(5).choice(sorted(whole), 300, replace=False).tolist()]
    read = plan.read(provider, config, refs, sample)
    assert [whole[e] for e in sample] == [[read[ref][i] for ref in refs] for i in range(len(sample))]
    if keys == "int64-keys-decoded-here":
        assert scanned(plan, refs, parts=1) == whole  # slices change nothing but who reads what


async def test_views_read_through_feast_cannot_be_scanned(store: FeastOnlineStore) -> None:
    assert store.scan_entities_blocking(REFS, "rider_id") is None  # no direct plan
    with pytest.raises(ValueError, match="cannot be read whole"):
        store.scan_blocking(REFS, "rider_id", 0, 1)
    with pytest.raises(ValueError, match="part 2 is not one of 2"):
        store.scan_blocking(REFS, "driver_id", 2, 2)
