"""``RequestGate``: everything a request passes before any work is done on it.

In order, each step cheaper than the next and each failure a clear status:
authentication (API key or JWT → tenant; UNAUTHENTICATED), tenant rules (route and
traffic class allowed; NOT_FOUND / INVALID_ARGUMENT / PERMISSION_DENIED), the tenant's
quota (token bucket; RESOURCE_EXHAUSTED with a retry hint) and admission (the route's
adaptive concurrency limit and queue wait; shed or degraded). Both front doors — inferline
``Predict`` and the KServe v2 ``ModelInfer`` — go through the same gate, so an unmodified
Triton client gets the same auth, quotas, priorities and shedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from inferline.core.auth import Authenticator
from inferline.core.config import CanaryConfig, InferlineConfig, TrafficClassConfig
from inferline.core.errors import InvalidInput, PermissionDenied, QuotaExceeded, echo
from inferline.core.headers import OVERLOADED, TRAFFIC_CLASS
from inferline.router.admission import AdmissionController, Permit
from inferline.router.gateway_trust import GatewayTrust
from inferline.router.ingress import IngressWait
from inferline.router.quota import RateLimiter

Metadata = Sequence[tuple[str, str | bytes]] | None


@dataclass(frozen=True, slots=True)
class TenantRules:
    routes: frozenset[str]
    """Routes (``Predict``) the tenant may call."""
    models: frozenset[str]
    """Triton models (KServe v2 front door) the tenant may call: the variants of its routes and its ``models``."""
    pins: Mapping[str, str]
    """Route → the variant this tenant's requests always use."""
    canaries: Mapping[str, CanaryConfig]
    """Route → a variant that gets a share of this tenant's requests."""
    classes: frozenset[str]
    default_class: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A request that passed the gate."""

    tenant: str
    traffic_class: str
    class_config: TrafficClassConfig
    permit: Permit


class RequestGate:
    def __init__(
        self,
        config: InferlineConfig,
        authenticator: Authenticator,
        rate_limiter: RateLimiter,
        admission: Mapping[str, AdmissionController],
        ingress: IngressWait | None = None,
        trust: GatewayTrust | None = None,
    ) -> None:
        self._auth = authenticator
        self._trust = trust if trust is not None else GatewayTrust(None)
        self._quota = rate_limiter
        self._admission = admission
        self.ingress = ingress if ingress is not None else IngressWait()
        self._classes = config.traffic_classes
        in_flight = config.gateway.in_flight
        caps = (in_flight.max_per_router, in_flight.kserve_max_per_router)
        gateway_limits = in_flight.adaptive or any(cap is not None for cap in caps)
        # Classes whose gateway calls wait behind the gateway's in-flight limit, not in an
        # unbounded transport queue: their queue wait is the gateway's to act on.
        self._gateway_bounded = frozenset(config.gateway.shed) if gateway_limits else frozenset()
        self._rules = {
            name: TenantRules(
                routes=frozenset(t.routes),
                models=frozenset([*(v.model for r in t.routes for v in config.routes[r].all_variants), *t.models]),
                classes=frozenset(t.traffic_classes),
                default_class=t.default_traffic_class,
                pins=dict(t.pin),
                canaries=dict(t.canary),
            )
            for name, t in config.tenants.items()
        }

    def authenticate(self, metadata: Metadata) -> tuple[str, TenantRules]:
        """The caller's tenant and its rules. Raises ``Unauthenticated``."""
        tenant = self._auth.authenticate(metadata)
        return tenant, self._rules[tenant]

    def traffic_class(self, tenant: str, rules: TenantRules, requested: str) -> str:
        """The class a request runs in: the requested one, or the tenant's default.

        Raises:
            InvalidInput: no such class.
            PermissionDenied: the tenant may not use it.
        """
        traffic_class = requested or rules.default_class
        if traffic_class not in self._classes:
            raise InvalidInput("traffic_class", f"unknown traffic class {echo(traffic_class)}")
        if traffic_class not in rules.classes:
            raise PermissionDenied(f"tenant {tenant!r} may not use traffic class {traffic_class!r}")
        return traffic_class

    @staticmethod
    def requested_class(in_request: str, metadata: Metadata, field: str) -> str:
        """The class a call asks for: ``in_request`` (the message's own ``field``), else the
        ``x-inferline-traffic-class`` header, else "" (the tenant's default).

        The header is what the gateway sheds and limits by; the router admits by the class
        it resolves here. A call whose header names another class than its message would be
        shed or spared by the gateway as one class and served as another, so it is refused.

        Raises:
            InvalidInput: the header and the message name different classes.
        """
        header = next((v for k, v in metadata or () if k == TRAFFIC_CLASS), None)
        if header is None:
            return in_request
        hinted = header if isinstance(header, str) else header.decode(errors="replace")
        if in_request and hinted != in_request:
            raise InvalidInput(
                field,
                f"{echo(in_request)} differs from the {TRAFFIC_CLASS} header {echo(hinted)}: "
                "send one class, or both alike",
            )
        return in_request or hinted

    def waited(self, metadata: Metadata, time_remaining_s: float | None) -> float | None:
        """How long an authenticated request waited before its handler; None when the gateway did not send it.

        Call only after authentication: an unauthenticated caller's headers must never move
        the queue-wait signal every tenant is admitted by. ``time_remaining_s`` is the
        handler's ``context.time_remaining()`` read first thing in the handler (the wait is
        read off it). The gateway's header counts only with the gateway's secret
        (``GatewayTrust``); anyone else's is ignored and counted.
        """
        if not self._trust.from_gateway(metadata):
            return None
        return self.ingress.measure(metadata, time_remaining_s)

    def signal_overload(self, context: grpc.aio.ServicerContext[Any, Any], admission_key: str) -> None:
        """Tell the gateway which classes ``admission_key``'s admission refuses now (``x-inferline-overloaded``).

        A trailer sent with whatever status the call ends in (``rpc_method`` keeps it). Only
        for gateway requests of authenticated callers: the state is the operator's, not the world's.
        """
        context.set_trailing_metadata(((OVERLOADED, self._admission[admission_key].overloaded()),))

    async def admit(
        self,
        tenant: str,
        admission_key: str,
        traffic_class: str,
        waited_s: float | None = None,
        *,
        degradable: bool = True,
        slack_s: float | None = None,
    ) -> Entry:
        """Quota, then admission, for an authenticated, authorized request.

        ``waited_s``: its wait before the handler, for a call through the gateway (None: a
        direct call). A gateway call of a class the gateway limits in flight is not shed for
        queue wait: the gateway's latency-driven limit keeps that queue short, and a router's
        shed for queue wait comes only after the wait (tens of ms). Its class's share of the
        route's limit still sheds it, and the queue wait still goes to the gateway in the
        overload signal. ``degradable``: False for a request with no degraded answer (the
        KServe front door's): a class that may not be shed then runs over the limit
        (``AdmissionController.admit``). ``slack_s``: its time left beyond what the main path
        needs on an idle router (None: no deadline), which a miss needs to count against the
        lower classes.

        Raises:
            QuotaExceeded: the tenant is over its quota.
            Shed: the route (or model) is overloaded for this class.
        """
        decision = await self._quota.check(tenant)
        if not decision.allowed:
            raise QuotaExceeded(f"tenant {tenant!r} is over its request quota", decision.retry_after_s)
        bounded = waited_s is not None and traffic_class in self._gateway_bounded
        permit = self._admission[admission_key].admit(
            traffic_class, waited_s, queue_wait=not bounded, degradable=degradable, slack_s=slack_s
        )
        return Entry(tenant, traffic_class, self._classes[traffic_class], permit)
