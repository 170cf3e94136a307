"""Request and response metadata keys shared by the router, the gateway (Envoy) and clients."""

TRAFFIC_CLASS = "x-inferline-traffic-class"
"""Request: the call's traffic class. The gateway sheds and limits by it; the router takes it when
the message names no class (``traffic_class`` field, KServe ``traffic_class`` parameter) and
refuses a call whose header and message name different classes (``RequestGate.requested_class``)."""
INGRESS_TIMEOUT = "x-inferline-ingress-timeout"
"""Request, set by the gateway: the caller's ``grpc-timeout`` as the gateway received it (gRPC
consumes the original, so a handler never sees it). The router reads its own wait before the
handler off it (``router.ingress``)."""
OVERLOADED = "x-inferline-overloaded"
"""Trailer of the router's answer to a gateway request: comma-separated sheddable classes its
admission refuses right now, lowest first ("" when none). The gateway sheds on it."""
GATEWAY_SECRET = "x-inferline-gateway-secret"
"""Request, set by the gateway: the per-deployment secret (``gateway.secret_env``) that proves a call
came through it. The gateway drops a caller's own copy first; a router acts on the gateway's
headers (``INGRESS_TIMEOUT``) only after authentication and only when this one matches
(``router.gateway_trust``)."""
GATEWAY_HEADERS = (INGRESS_TIMEOUT, GATEWAY_SECRET)
"""Headers only the gateway may set: from anyone else they are ignored (and counted)."""
