"""What the KServe front door refuses before Triton sees it: shared memory, oversized strings, bad versions."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2

from inferline.core.errors import InvalidInput
from inferline.router.kserve import MAX_NAME_CHARS, MAX_PARAMETER_CHARS, check_request


def request(**fields: object) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="driver_ranker", **fields)  # type: ignore[arg-type]
    message.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    return message


def test_an_ordinary_request_passes() -> None:
    check_request(request(model_version="1", id="req-1"))
    check_request(request())


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (request(model_version="1" * 20), "model_version"),
        (request(model_version="v1"), "model_version"),
        (request(model_version="x" * 20_000), "model_version"),
        (request(id="i" * (MAX_NAME_CHARS + 1)), "id"),
    ],
)
def test_strings_triton_would_echo_past_the_metadata_limit_are_refused(
    message: service_pb2.ModelInferRequest, field: str
) -> None:
    # Triton echoes them in its errors; past gRPC's 16 KiB metadata limit that error reads as an outage.
    with pytest.raises(InvalidInput) as info:
        check_request(message)
    assert info.value.field == field
    assert len(info.value.message) < 200


def test_oversized_tensor_names_and_parameters_are_refused() -> None:
    named = request()
    named.inputs.add(name="n" * (MAX_NAME_CHARS + 1))
    with pytest.raises(InvalidInput, match=r"inputs\[1\]\.name"):
        check_request(named)
    parameter = request()
    parameter.parameters["note"].string_param = "p" * (MAX_PARAMETER_CHARS + 1)
    with pytest.raises(InvalidInput, match="parameters"):
        check_request(parameter)
    key = request()
    key.parameters["k" * (MAX_NAME_CHARS + 1)].int64_param = 1
    with pytest.raises(InvalidInput, match="a key is longer"):
        check_request(key)


def test_shared_memory_tensors_are_refused() -> None:
    message = request()
    message.inputs[0].parameters["shared_memory_region"].string_param = "someone-elses"
    with pytest.raises(InvalidInput, match="shared memory"):
        check_request(message)
