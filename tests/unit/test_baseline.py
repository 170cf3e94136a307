"""Baseline: a constant, or a prior per segment of one feature's value (searchsorted, below exclusive)."""

from __future__ import annotations

import numpy as np
import pytest

from inferline.core.config import BaselineConfig
from inferline.degradation import Baseline
from inferline.features.vector import FeatureVector

NAMES = ("acc_rate", "conv_rate")
SEGMENTED = BaselineConfig.model_validate(
    {
        "score": 0.6,
        "segment_feature": "conv_rate",
        "segments": [{"below": 0.3, "score": 0.25}, {"below": 0.7, "score": 0.45}],
    }
)


def vector(conv: list[float], names: tuple[str, ...] = NAMES) -> FeatureVector:
    rows = [[0.9, c] if len(names) == 2 else [0.9] for c in conv]
    values = np.array(rows, dtype=np.float32)
    return FeatureVector(names, values, np.zeros(values.shape, np.bool_), False)


@pytest.mark.parametrize(
    ("conv", "expected"),
    [
        (-5.0, 0.25),  # below the first bound: first segment
        (0.29, 0.25),
        (0.3, 0.45),  # a bound belongs to the segment above it (below is exclusive)
        (0.7, 0.6),  # exactly the last bound, sent as float32: at or above → the constant
        (0.69, 0.45),
        (12.0, 0.6),
        (float("nan"), 0.6),  # NaN: no segment applies
    ],
)
def test_segment_by_feature_value(conv: float, expected: float) -> None:
    scores = Baseline(SEGMENTED, NAMES).scores(vector([conv]), 1)
    assert scores.dtype == np.float32
    assert scores.tolist() == [pytest.approx(expected)]


def test_many_rows_in_one_call() -> None:
    scores = Baseline(SEGMENTED, NAMES).scores(vector([0.1, 0.5, 0.9]), 3)
    np.testing.assert_allclose(scores, [0.25, 0.45, 0.6])


def test_no_features_gives_the_constant() -> None:
    scores = Baseline(SEGMENTED, NAMES).scores(None, 4)
    np.testing.assert_array_equal(scores, np.full(4, 0.6, np.float32))


def test_features_without_the_segment_column_give_the_constant() -> None:
    scores = Baseline(SEGMENTED, NAMES).scores(vector([0.1], names=("acc_rate",)), 1)
    np.testing.assert_allclose(scores, [0.6])


def test_constant_config_ignores_features() -> None:
    scores = Baseline(BaselineConfig(score=0.3), NAMES).scores(vector([0.1, 0.9]), 2)
    np.testing.assert_allclose(scores, [0.3, 0.3])


def test_segment_feature_must_be_a_route_feature() -> None:
    with pytest.raises(ValueError, match="conv_rate"):
        Baseline(SEGMENTED, ["acc_rate"])


def test_scores_are_a_fresh_array() -> None:
    baseline = Baseline(SEGMENTED, NAMES)
    first = baseline.scores(vector([0.1]), 1)
    first[0] = 0.99
    assert baseline.scores(vector([0.1]), 1).tolist() == [pytest.approx(0.25)]
    constant = baseline.scores(None, 1)
    constant[0] = 0.99
    assert baseline.scores(None, 1).tolist() == [pytest.approx(0.6)]
