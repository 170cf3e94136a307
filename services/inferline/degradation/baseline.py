"""``Baseline``: a route's predefined safe scores, the answer that needs nothing and never fails."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from inferline.core.config import BaselineConfig
from inferline.features.vector import FeatureVector


class Baseline:
    """A constant score, or a prior per segment of one feature's value.

    Policy: with segments ``[(b0, s0), (b1, s1), ...]`` (increasing bounds), a value ``v``
    gets ``s_i`` for the first ``i`` with ``v < b_i`` and ``config.score`` when ``v`` is at
    or above the last bound (``np.searchsorted(bounds, v, side="right")``). NaN sorts
    past every bound, so it also gets ``config.score``. With no features, or a feature
    matrix without the segment column, every entity gets ``config.score``.

    The value is used even when it is the feature's default: the defaulted flags do not
    cross the gRPC contract (``DegradeRequest`` carries values only), and both client
    twins must answer alike.
    """

    def __init__(self, config: BaselineConfig, feature_names: Sequence[str]) -> None:
        """
        Raises:
            ValueError: the segment feature is not among the route's ``feature_names``.
        """
        if config.segment_feature is not None and config.segment_feature not in feature_names:
            raise ValueError(f"baseline segment feature {config.segment_feature!r} is not among {list(feature_names)}")
        self._feature = config.segment_feature if config.segments else None
        self._default = np.float32(config.score)
        # float32 like the feature values: a value sent as exactly a bound (0.7) must land
        # above it, and float32(0.7) < 0.7 in float64.
        self._bounds = np.array([s.below for s in config.segments], dtype=np.float32)
        # One score per slot searchsorted can return: segment i, or past the last bound.
        self._table = np.array([*(s.score for s in config.segments), config.score], dtype=np.float32)

    def scores(self, features: FeatureVector | None, n: int) -> npt.NDArray[np.float32]:
        """``n`` baseline scores, one per entity (row of ``features`` when given).

        Args:
            features: The entities' feature matrix, or None when there is none.
            n: Number of entities; equals ``features.rows`` when features are given.

        Returns:
            A new float32 array ``[n]``.
        """
        if self._feature is None or features is None or self._feature not in features.names:
            return np.full(n, self._default, dtype=np.float32)
        column = features.values[:, features.names.index(self._feature)]
        slots = np.searchsorted(self._bounds, column, side="right")
        return self._table[slots]
