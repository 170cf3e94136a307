"""The bench's entity samplers (Zipf over the demo store's drivers by default) and the requests they fill."""

from __future__ import annotations

import numpy as np
import pytest

from inferline.bench.mix import DEFAULT_MIX
from inferline.bench.recording import TargetSpec, _predict_requests, make_targets
from inferline.bench.targets import DEMO_ENTITY_IDS, ZipfEntityIds, entity_sampler, uniform_entity_ids
from inferline.demo.driver_data import driver_ids

DRAWS = 200_000
S = 1.1


def counts_by_rank(sampler: ZipfEntityIds, draws: np.ndarray) -> np.ndarray:
    """How often each id was drawn, in the sampler's popularity order (most popular first)."""
    ids, counts = np.unique(draws, return_counts=True)
    by_id = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return np.array([by_id.get(i, 0) for i in sampler.ids_by_rank.tolist()])


def test_the_bench_pool_is_the_demo_store() -> None:
    ids = driver_ids()
    assert (int(ids[0]), int(ids[-1])) == DEMO_ENTITY_IDS
    assert len(ids) == DEMO_ENTITY_IDS[1] - DEMO_ENTITY_IDS[0] + 1 >= 100_000


def test_zipf_draws_follow_the_power_law() -> None:
    sampler = ZipfEntityIds(1, 1000, S, seed=3)
    counts = counts_by_rank(sampler, sampler.draw(DRAWS))
    assert counts.sum() == DRAWS
    # Rank 1 is drawn 2**s times as often as rank 2 (2.14 for s = 1.1), and the top ranks fall
    # on a line of slope -s in log-log.
    assert counts[0] / counts[1] == pytest.approx(2**S, rel=0.05)
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts[:50]), 1)[0]
    assert slope == pytest.approx(-S, abs=0.05)
    weights = np.arange(1, 1001, dtype=np.float64) ** -S
    assert counts[:10].sum() / DRAWS == pytest.approx(weights[:10].sum() / weights.sum(), abs=0.01)
    assert counts[0] == counts.max()  # the most drawn id is the one the sampler ranks first


def test_a_larger_exponent_concentrates_the_draws() -> None:
    flat, steep = (ZipfEntityIds(1, 1000, s, seed=3) for s in (0.8, 1.5))
    top = [counts_by_rank(z, z.draw(DRAWS))[:10].sum() for z in (flat, steep)]
    assert top[1] > 1.5 * top[0]


def test_zipf_ids_stay_in_the_pool_and_hot_ids_are_spread_over_it() -> None:
    low, high = DEMO_ENTITY_IDS
    sampler = ZipfEntityIds(low, high, S, seed=5)
    draws = sampler.draw(100_000)
    assert draws.min() >= low and draws.max() <= high
    assert all(low <= sampler() <= high for _ in range(10_000))
    assert sorted(sampler.ids_by_rank.tolist()) == list(range(low, high + 1))  # a permutation of the pool
    hot = sampler.ids_by_rank[:100]
    assert not np.array_equal(np.sort(hot), np.arange(low, low + 100))
    assert hot.max() - hot.min() > (high - low) // 2
    # Both the hot cache and the store are on the path: many distinct ids, most draws on few.
    assert len(np.unique(draws)) > 10_000
    assert np.isin(draws, sampler.ids_by_rank[:1000]).mean() > 0.5


def test_every_generator_agrees_on_which_ids_are_hot() -> None:
    a, b = ZipfEntityIds(1, 5000, S, seed=1), ZipfEntityIds(1, 5000, S, seed=2)
    assert np.array_equal(a.ids_by_rank, b.ids_by_rank)
    assert not np.array_equal(a.draw(100), b.draw(100))  # but each draws its own stream
    again = ZipfEntityIds(1, 5000, S, seed=1)
    assert [again() for _ in range(5000)] == ZipfEntityIds(1, 5000, S, seed=1).draw(5000).tolist()
    assert not np.array_equal(ZipfEntityIds(1, 5000, S, permutation_seed=9).ids_by_rank, a.ids_by_rank)


def test_uniform_draws_are_flat() -> None:
    sample = entity_sampler("uniform", (1, 100), seed=4)
    counts = np.bincount([sample() for _ in range(50_000)], minlength=101)[1:]
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500
    assert uniform_entity_ids(1, 100, seed=4)() == entity_sampler("uniform", (1, 100), seed=4)()


@pytest.mark.parametrize(
    ("args", "message"),
    [(("zipf", (5, 4)), "empty entity range"), (("zipf", (1, 10), 0.0), "exponent"), (("pareto",), "unknown")],
)
def test_bad_sampler_settings_are_refused(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kind, *rest = args
        ids = rest[0] if rest else (1, 10)
        entity_sampler(str(kind), ids, zipf_s=rest[1] if len(rest) > 1 else S)  # type: ignore[arg-type]


def test_predict_targets_draw_zipf_over_the_demo_store_by_default() -> None:
    (spec,) = make_targets(["predict=127.0.0.1:1"])
    assert (spec.entities, spec.zipf_s, spec.entity_ids, spec.pool_size) == ("zipf", S, DEMO_ENTITY_IDS, 0)
    with pytest.raises(ValueError, match="unknown entity distribution"):
        TargetSpec("predict", "127.0.0.1:1", entities="normal")
    with pytest.raises(ValueError, match="exponent"):
        TargetSpec("predict", "127.0.0.1:1", zipf_s=-1.0)


def test_predict_requests_draw_one_entity_per_request_without_reuse() -> None:
    spec = TargetSpec("predict", "127.0.0.1:1", zipf_s=S)
    classes = DEFAULT_MIX.draw(20_000, 7)
    requests = _predict_requests(spec, DEFAULT_MIX.classes, classes, seed=7)
    assert len(requests) == len(classes)
    assert [r.traffic_class for r in requests] == [DEFAULT_MIX.classes[c] for c in classes]
    ids = np.array([r.entities[0].int64_value for r in requests])
    assert ids.min() >= DEMO_ENTITY_IDS[0] and ids.max() <= DEMO_ENTITY_IDS[1]
    assert len({id(r) for r in requests}) == len(requests)  # no message reused
    # The draws are the sampler's: the same seed gives the same ids.
    assert ids.tolist() == ZipfEntityIds(*DEMO_ENTITY_IDS, S, seed=7).draw(len(classes)).tolist()


def test_a_pool_size_reuses_requests_per_class() -> None:
    spec = TargetSpec("predict", "127.0.0.1:1", entities="uniform", entity_ids=(1001, 2000), pool_size=10)
    classes = DEFAULT_MIX.draw(1000, 1)
    requests = _predict_requests(spec, DEFAULT_MIX.classes, classes, seed=1)
    assert len({id(r) for r in requests}) == 10 * len(DEFAULT_MIX.classes)
    assert all(r.traffic_class == DEFAULT_MIX.classes[c] for r, c in zip(requests, classes, strict=True))
    assert all(1001 <= r.entities[0].int64_value <= 2000 for r in requests)
