"""Client of inferline's public gRPC API: typed ``Predict`` calls with deadline, API key and decoded errors."""

from inferline.v1.errors_pb2 import ErrorReason
from inferline_client._client import (
    AsyncInferenceClient,
    EntityLike,
    InferenceClient,
    entity_key,
    predict_request,
)
from inferline_client._errors import (
    AuthenticationError,
    DeadlineExceededError,
    InferlineError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    UnavailableError,
    decode_error,
)

__all__ = [
    "AsyncInferenceClient",
    "AuthenticationError",
    "DeadlineExceededError",
    "EntityLike",
    "ErrorReason",
    "InferenceClient",
    "InferlineError",
    "InvalidArgumentError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "UnavailableError",
    "decode_error",
    "entity_key",
    "predict_request",
]
