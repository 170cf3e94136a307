import numpy as np
import pytest

from inferline.core.config import load_config
from inferline.core.errors import ModelOutputInvalid, RouteNotFound
from inferline.postprocess.service import PostprocessService


@pytest.fixture
def service() -> PostprocessService:
    return PostprocessService(load_config("deploy/local/inferline.yaml").routes)


def test_ranks_best_first_with_decisions(service: PostprocessService) -> None:
    ranked = service.process("driver_ranking", np.array([[0.2], [0.9], [0.5]], np.float32), 3)
    assert [r.entity_index for r in ranked] == [1, 2, 0]
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert [r.decision for r in ranked] == ["accept", "accept", "reject"]


def test_top_k_keeps_the_best(service: PostprocessService) -> None:
    ranked = service.process("driver_ranking", np.array([0.1, 0.4, 0.3, 0.8], np.float32), 4, top_k=2)
    assert [r.entity_index for r in ranked] == [3, 1]


def test_ties_keep_request_order(service: PostprocessService) -> None:
    ranked = service.process("driver_ranking", np.array([0.5, 0.7, 0.5], np.float32), 3)
    assert [r.entity_index for r in ranked] == [1, 0, 2]


@pytest.mark.parametrize(
    ("scores", "n", "message"),
    [
        ([0.1, float("nan")], 2, "non-finite"),
        ([0.1, float("inf")], 2, "non-finite"),
        ([0.1, 1.5], 2, "outside"),
        ([-0.01, 0.5], 2, "outside"),
        ([0.1, 0.2, 0.3], 2, "3 scores for 2"),
    ],
)
def test_invalid_output_is_a_model_failure(
    service: PostprocessService, scores: list[float], n: int, message: str
) -> None:
    with pytest.raises(ModelOutputInvalid, match=message):
        service.process("driver_ranking", np.array(scores, np.float32), n)


def test_unknown_route(service: PostprocessService) -> None:
    with pytest.raises(RouteNotFound):
        service.process("nope", np.array([0.5], np.float32), 1)
