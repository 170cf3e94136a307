"""numbers_or_nan (a column of stored Feast values at once) against number_or_nan (one at a time)."""

from __future__ import annotations

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import FloatList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from hypothesis import given, settings
from hypothesis import strategies as st

from inferline.features.value_blobs import number_or_nan, numbers_or_nan

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)

stored = st.one_of(
    st.none(),
    st.just(b""),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: ValueProto(double_val=v).SerializeToString()),
    st.floats(width=32, allow_nan=True).map(lambda v: ValueProto(float_val=v).SerializeToString()),
    INT64.map(lambda v: ValueProto(int64_val=v).SerializeToString()),
    INT32.map(lambda v: ValueProto(int32_val=v).SerializeToString()),
    st.booleans().map(lambda v: ValueProto(bool_val=v).SerializeToString()),
    # An int32 field holding a 64-bit varint (another writer's): protobuf keeps its low 32 bits.
    INT64.map(lambda v: b"\x18" + ValueProto(int64_val=v).SerializeToString()[1:]),
    INT64.map(lambda v: ValueProto(unix_timestamp_val=v).SerializeToString()),
    st.just(ValueProto(null_val=0).SerializeToString()),
    st.integers(-1000, 1000).map(lambda v: ValueProto(string_val=str(v)).SerializeToString()),
    # Two fields of the oneof in one blob (the last wins in protobuf): not one fixed shape.
    st.tuples(INT64, st.floats(allow_nan=False)).map(
        lambda v: ValueProto(int64_val=v[0]).SerializeToString() + ValueProto(double_val=v[1]).SerializeToString()
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(stored, max_size=40))
def test_a_column_decodes_as_each_value_alone(blobs: list[bytes | None]) -> None:
    with np.errstate(over="ignore"):  # a double past float32's range: inf either way
        want = np.array([number_or_nan(blob) for blob in blobs], dtype=np.float32)
    np.testing.assert_array_equal(numbers_or_nan(blobs), want)  # NaN where NaN, the same float32 elsewhere


def test_the_usual_shapes_and_the_edges_of_each() -> None:
    blobs = [
        ValueProto(double_val=0.5).SerializeToString(),
        ValueProto(float_val=-2.25).SerializeToString(),
        ValueProto(int64_val=-1).SerializeToString(),  # a 10-byte varint
        ValueProto(int64_val=2**63 - 1).SerializeToString(),
        ValueProto(int32_val=-(2**31)).SerializeToString(),  # sign-extended to 10 bytes
        ValueProto(int64_val=0).SerializeToString(),
        ValueProto(bool_val=True).SerializeToString(),
        None,
    ]
    got = numbers_or_nan(blobs)
    np.testing.assert_array_equal(got[:7], np.array([0.5, -2.25, -1, 2.0**63, -(2.0**31), 0, 1], np.float32))
    assert np.isnan(got[7])
    assert numbers_or_nan([]).shape == (0,)


def test_a_value_that_is_not_a_number_still_raises_as_it_did() -> None:
    blobs = [ValueProto(double_val=1.0).SerializeToString(), ValueProto(string_val="fast").SerializeToString()]
    with pytest.raises(ValueError):
        numbers_or_nan(blobs)
    with pytest.raises(TypeError):
        numbers_or_nan([ValueProto(float_list_val=FloatList(val=[1.0])).SerializeToString()])
