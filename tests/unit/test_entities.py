import pytest

from inferline.core.config import load_config
from inferline.core.entities import parse_entity_ids
from inferline.core.errors import InvalidInput
from inferline.v1 import inference_pb2 as pb

ROUTE = load_config("deploy/local/inferline.yaml").routes["driver_ranking"]


def test_ids_in_request_order() -> None:
    keys = [pb.EntityKey(name="driver_id", int64_value=v) for v in (1003, 1001)]
    assert parse_entity_ids(ROUTE, keys) == [1003, 1001]


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        ([], "entities"),
        ([pb.EntityKey(name="driver_id", int64_value=i) for i in range(101)], "entities"),
        ([pb.EntityKey(name="rider_id", int64_value=1)], "entities[0].name"),
        (
            [pb.EntityKey(name="driver_id", int64_value=1), pb.EntityKey(name="driver_id", string_value="x")],
            "entities[1]",
        ),
        ([pb.EntityKey(name="driver_id")], "entities[0]"),
    ],
)
def test_bad_entities_name_the_field(keys: list[pb.EntityKey], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_entity_ids(ROUTE, keys)
    assert info.value.field == field
