"""``InferenceClient`` (blocking) and ``AsyncInferenceClient`` (``grpc.aio``) for ``Predict``.

Every call carries a deadline (inferline plans its work inside the caller's deadline and
answers before it, so a call without one would get the server's default, not yours) and,
when given, the API key as ``authorization: Bearer <key>``. A failed call raises the typed
error of ``inferline_client._errors`` (one decoding point, chained ``from`` the gRPC error).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc

from inferline.v1 import inference_pb2, inference_pb2_grpc
from inferline_client._errors import decode_error

EntityLike = tuple[str, int | str] | inference_pb2.EntityKey
"""An entity: ``("driver_id", 1001)``, ``("user", "u-17")`` or an ``EntityKey`` message."""


def entity_key(entity: EntityLike) -> inference_pb2.EntityKey:
    """The ``EntityKey`` for ``(name, value)``: an ``int`` goes as int64, a ``str`` as string."""
    if isinstance(entity, inference_pb2.EntityKey):
        return entity
    name, value = entity
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"entity {name!r}: value must be an int or a str, got {type(value).__name__}")
    if isinstance(value, int):
        return inference_pb2.EntityKey(name=name, int64_value=value)
    return inference_pb2.EntityKey(name=name, string_value=value)


def predict_request(
    route: str,
    entities: Iterable[EntityLike],
    *,
    request_features: Mapping[str, float] | None = None,
    traffic_class: str = "",
    top_k: int = 0,
    request_id: str = "",
) -> inference_pb2.PredictRequest:
    """The ``PredictRequest`` the clients send (public for callers that batch their own)."""
    return inference_pb2.PredictRequest(
        route=route,
        entities=[entity_key(e) for e in entities],
        request_features=dict(request_features or {}),
        traffic_class=traffic_class,
        top_k=top_k,
        request_id=request_id,
    )


class _Settings:
    """What both clients share: the default deadline and the call metadata."""

    def __init__(self, target: str, api_key: str | None, timeout_s: float, metadata: Sequence[tuple[str, str]]) -> None:
        if not target:
            raise ValueError("target must be 'host:port' (e.g. '127.0.0.1:50051')")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.metadata = (*metadata, *((("authorization", f"Bearer {api_key}"),) if api_key else ()))

    def timeout(self, timeout_s: float | None) -> float:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        return self.timeout_s if timeout_s is None else timeout_s


class InferenceClient:
    """Blocking client of ``inferline.v1.Inference``.

    Usage::

        with InferenceClient("127.0.0.1:50051", api_key=KEY, timeout_s=0.1) as client:
            reply = client.predict("driver_ranking", [("driver_id", 1001)])

    Args:
        target: ``host:port`` of the gateway (or a router).
        api_key: sent as ``authorization: Bearer <api_key>`` on every call.
        timeout_s: the default deadline of a call, in seconds; ``predict(timeout_s=)`` overrides it.
        credentials: TLS channel credentials; ``None`` for a plaintext channel.
        metadata: extra metadata sent on every call (e.g. a ``traceparent``).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._settings = _Settings(target, api_key, timeout_s, metadata)
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def predict(
        self,
        route: str,
        entities: Iterable[EntityLike],
        *,
        request_features: Mapping[str, float] | None = None,
        traffic_class: str = "",
        top_k: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> inference_pb2.PredictResponse:
        """Score ``entities`` on ``route`` within ``timeout_s`` (default: the client's).

        Raises:
            InferlineError: the call failed; the subclass follows the status code.
        """
        request = predict_request(
            route,
            entities,
            request_features=request_features,
            traffic_class=traffic_class,
            top_k=top_k,
            request_id=request_id,
        )
        try:
            return self._stub.Predict(
                request, timeout=self._settings.timeout(timeout_s), metadata=self._settings.metadata
            )
        except grpc.RpcError as exc:
            raise decode_error(exc) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncInferenceClient:
    """``InferenceClient`` on ``grpc.aio``: ``async with AsyncInferenceClient(...) as client``.

    Make it inside the running event loop (``grpc.aio`` channels belong to the loop that
    made them). Arguments as ``InferenceClient``.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._settings = _Settings(target, api_key, timeout_s, metadata)
        self._channel = (
            grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        )
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def predict(
        self,
        route: str,
        entities: Iterable[EntityLike],
        *,
        request_features: Mapping[str, float] | None = None,
        traffic_class: str = "",
        top_k: int = 0,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> inference_pb2.PredictResponse:
        """As ``InferenceClient.predict``."""
        request = predict_request(
            route,
            entities,
            request_features=request_features,
            traffic_class=traffic_class,
            top_k=top_k,
            request_id=request_id,
        )
        try:
            return await self._stub.Predict(
                request, timeout=self._settings.timeout(timeout_s), metadata=self._settings.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise decode_error(exc) from exc

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
