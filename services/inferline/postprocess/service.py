"""``PostprocessService``: model scores → validated, thresholded, ranked predictions.

A score that is not finite, is out of the route's range, or a score vector of the wrong
length is a *model failure* (``ModelOutputInvalid``), never something to pass on to a
caller: the router degrades instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from inferline.core.config import PostprocessConfig, RouteConfig
from inferline.core.errors import ModelOutputInvalid, RouteNotFound


@dataclass(frozen=True, slots=True)
class RankedScore:
    entity_index: int
    score: float
    decision: str
    rank: int


class PostprocessService:
    """Validation, threshold → decision, ranking and top-k for every configured route."""

    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self._configs: dict[str, PostprocessConfig] = {name: r.postprocess for name, r in routes.items()}

    def process(self, route: str, scores: np.ndarray, num_entities: int, top_k: int = 0) -> list[RankedScore]:
        """Rank ``scores`` (one per entity, any shape of that size) best first.

        Raises:
            RouteNotFound: unknown route.
            ModelOutputInvalid: wrong number of scores, a non-finite or out-of-range score.
        """
        config = self._configs.get(route)
        if config is None:
            raise RouteNotFound(route)
        # Plain Python over the score list: requests carry a handful to ~100 entities, where
        # a dozen numpy calls (each ~1 µs of dispatch) cost more than the work itself.
        values = np.asarray(scores, dtype=np.float32).reshape(-1).tolist()
        if len(values) != num_entities:
            raise ModelOutputInvalid(f"model returned {len(values)} scores for {num_entities} entities")
        if not all(map(math.isfinite, values)):
            raise ModelOutputInvalid("model returned a non-finite score")
        if min(values) < config.score_min or max(values) > config.score_max:
            raise ModelOutputInvalid(f"model returned a score outside [{config.score_min}, {config.score_max}]")
        keep = min(top_k or config.top_k, num_entities)
        # sorted() is stable: ties keep request order, so ranks are deterministic.
        order = sorted(range(num_entities), key=values.__getitem__, reverse=True)[:keep]
        threshold = config.threshold
        above, below = config.decision_above, config.decision_below
        return [
            RankedScore(i, values[i], above if values[i] >= threshold else below, rank)
            for rank, i in enumerate(order, start=1)
        ]
