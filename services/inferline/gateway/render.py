"""Renders the Envoy v3 bootstrap of the ingress that sheds low traffic classes before the router.

A Python gRPC router cannot shed fast enough under overload: a shed still costs ~220 µs of
router CPU against ~370 µs for an answer, and the backlog forms in gRPC's transport before
the handler runs. So the lower classes are shed earlier, by Envoy in C++, keyed by the
``x-inferline-traffic-class`` request header (the bench and well-behaved clients send it;
the router still authenticates, and refuses a call whose header names another class than
its message, ``RequestGate.requested_class``).

One of two signals drives the shedding (``gateway.shed_by``):

* ``signal`` (the default), the routers' own: every answer to a gateway request
  carries ``x-inferline-overloaded``, the classes its route's admission refuses right now. A
  Lua filter keeps a shed probability per class, raised by each answer naming the class and
  lowered by each that does not, and marks that share of the class's requests; a fault
  filter turns marked requests away (RESOURCE_EXHAUSTED, counted per class as
  ``http.inferline_ingress.fault.<class>.aborts_injected``). So the lower classes are shed
  before they cost a router anything, as soon as the router says so, not after it failed.
  The gateway also copies the caller's ``grpc-timeout`` into ``x-inferline-ingress-timeout``,
  from which a router measures how long a call waited in its transport (``router.ingress``).
* ``success_rate``: the class's success rate (Envoy's ``admission_control``, one filter
  per class), for routers that do not send the signal. Not both: admission_control would
  count the signal's sheds (local replies pass its encoder) as the class's failures and shed
  on top of them.

Layout of the rendered config::

    listener host:port ── http_connection_manager (codec AUTO: gRPC over HTTP/2, REST over HTTP/1.1 or 2)
        http_filters: gateway.rest:         inferline.rest (gRPC-JSON transcoder, gateway.rest)
                      shed_by signal:       inferline.signal (Lua), inferline.signal_shed (fault)
                      shed_by success_rate: inferline.shed.<class> (admission_control), one per class
                      inferline.in_flight (adaptive_concurrency; gateway.in_flight.adaptive)
                      envoy.filters.http.buffer, envoy.filters.http.router
        routes:       header x-inferline-traffic-class == <shed class> → router at priority DEFAULT
                                                             (success_rate: only shed.<class> on)
                      header x-inferline-traffic-class == <other class> → router at priority HIGH
                                                             (in_flight off; success_rate: every shed.* off)
                      no or unknown class header → router at priority DEFAULT
                                                             (success_rate: every shed.* off)
                      any other path → Envoy's own 404 (gRPC UNIMPLEMENTED), every shed filter off
                      (all: only the public services' paths (PUBLIC_SERVICES), anything else
                       is UNIMPLEMENTED; x-inferline-ingress-timeout = the caller's grpc-timeout,
                       x-inferline-gateway-secret = $gateway.secret_env, callers' copies dropped)
        (the KServe front door's paths, inference.GRPCInferenceService, have routes of their own
         first, the same per class, to cluster inferline_router_kserve)
    cluster inferline_router: HTTP/2, round robin per request, gRPC health checks, circuit
                      breakers: DEFAULT max_requests = in_flight.max_per_router × replicas, HIGH unbounded
    cluster inferline_router_kserve: the same routers; DEFAULT max_requests = in_flight.kserve_max_per_router
                      × replicas, HIGH = in_flight.kserve_protected_max_per_router × replicas (or unbounded)
    with a protected lane (``gateway.protected_routers``): clusters inferline_router_protected and
                      inferline_router_kserve_protected, the same over the lane's replicas (priority 0)
                      with the other routers as failover (priority 1); the protected classes' routes
                      go there, and their answers only raise the signal's shed probabilities
    TLS (``gateway.tls``): listener over TLS, ALPN h2 and http/1.1, mutual with a client CA;
        (``gateway.upstream_tls``): to the routers and their health checks (``gateway.tls`` module)

A third shed, under both signals: the in-flight limit (``gateway.in_flight``). Envoy keeps the
shed classes' requests outstanding at the routers under an adaptive concurrency limit (and an
optional fixed cap) and refuses the rest of a burst at once (RESOURCE_EXHAUSTED), so they
cannot queue deep in a router's transport — where a router's own shed would wait tens of ms —
while the shed probability or the success-rate window is still catching up.

``render_envoy`` returns plain dicts and lists; ``inferline gateway render`` dumps them as YAML.
"""

from __future__ import annotations

from typing import Any

from inferline.core import headers
from inferline.core.config import (
    ClassShedConfig,
    GatewayAccessLogConfig,
    InferlineConfig,
    InFlightConfig,
    ShedSignalConfig,
    TlsClientConfig,
)
from inferline.gateway.rest import rest_filter
from inferline.gateway.tls import downstream_transport_socket, is_ip, upstream_transport_socket

TRAFFIC_CLASS_HEADER = headers.TRAFFIC_CLASS
ROUTER_CLUSTER = "inferline_router"
KSERVE_CLUSTER = "inferline_router_kserve"
"""The KServe front door's calls reach the same routers through a cluster of their own, so that
their fixed in-flight cap (``gateway.in_flight.kserve_max_per_router``) is theirs alone: a
tensor pass-through call costs a router a fraction of a ``Predict`` (no features, no
post-processing), so the cap that keeps ``Predict``'s critical calls in time holds the KServe
front door far below what the routers serve in time (measured: docs/performance.md)."""
PROTECTED_SUFFIX = "_protected"
"""With a protected lane (``render_envoy(protected_routers=...)``), each front door's cluster has
a twin of this suffix over the lane's routers alone, which the protected classes' calls take."""
KSERVE_SERVICE = "inference.GRPCInferenceService"
STAT_PREFIX = "inferline_ingress"
"""Envoy's stats for the listener live under ``http.<STAT_PREFIX>.`` (e.g. ``...admission_control.rq_rejected``)."""
SHED_FILTER_PREFIX = "inferline.shed."
GATEWAY_SHED_PREFIX = "shed by the gateway"
"""How every gateway shed's grpc-message starts (a router's own sheds say "route ... is overloaded")."""
SHED_MESSAGE = f"{GATEWAY_SHED_PREFIX}: traffic class over its failure budget"
"""grpc-message of a gateway shed on the success rate (status RESOURCE_EXHAUSTED)."""
SIGNAL_SHED_MESSAGE = f"{GATEWAY_SHED_PREFIX}: the routers are shedding this traffic class"
"""grpc-message of a gateway shed on the routers' overload signal (status RESOURCE_EXHAUSTED)."""
ADAPTIVE_SHED_MESSAGE = f"{GATEWAY_SHED_PREFIX}: the shed classes are at the routers' adaptive concurrency limit"
"""grpc-message of a gateway shed by the adaptive in-flight limit (status RESOURCE_EXHAUSTED)."""
IN_FLIGHT_SHED_MESSAGE = (
    f"{GATEWAY_SHED_PREFIX}: the routers already hold as many calls of this kind as gateway.in_flight lets in"
    " (max_per_router, kserve_max_per_router, kserve_protected_max_per_router)"
)
"""grpc-message of a gateway shed by a fixed in-flight cap (status RESOURCE_EXHAUSTED): Envoy's
overflow flag does not say which cluster or priority overflowed, so the message names every cap."""
IN_FLIGHT_FILTER = "inferline.in_flight"
"""The adaptive_concurrency filter: off on the protected classes' routes only."""
SIGNAL_FILTER = "inferline.signal"
SIGNAL_SHED_FILTER = "inferline.signal_shed"
SIGNAL_SHED_HEADER = "x-inferline-gateway-shed"
"""Set by the Lua filter on a request it sheds; the fault filter turns such requests away."""
_DOWNSTREAM_CLUSTER = "x-envoy-downstream-service-cluster"
"""The fault filter counts aborts per value of this header: the Lua filter sets it to the class."""

_LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"

_ADMISSION_CONTROL = "type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl"
_ADAPTIVE_CONCURRENCY = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_MAX_CONNECTIONS = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# gRPC codes that mean "the router (or its dependencies) could not cope": the only ones that
# count against a class's success rate. Caller errors (INVALID_ARGUMENT, UNAUTHENTICATED,
# NOT_FOUND, ...) are answers, not overload: a tenant sending bad requests must not get its
# whole class shed. UNKNOWN 2, DEADLINE_EXCEEDED 4, RESOURCE_EXHAUSTED 8, ABORTED 10,
# INTERNAL 13, UNAVAILABLE 14, DATA_LOSS 15.
_GRPC_FAILURES = frozenset({2, 4, 8, 10, 13, 14, 15})
GRPC_SUCCESS_CODES = tuple(code for code in range(17) if code not in _GRPC_FAILURES)

# Far above anything one router replica can take: the limit of everything the in-flight bound
# does not cover (the protected classes, connections, pending requests), where Envoy must
# never be what refuses a request.
_CIRCUIT_LIMIT = 100_000


def render_envoy(
    config: InferlineConfig,
    *,
    port: int | None = None,
    admin_port: int | None = None,
    host: str = "0.0.0.0",
    routers: list[str] | None = None,
    protected_routers: list[str] | None = None,
) -> dict[str, Any]:
    """The Envoy v3 bootstrap for ``config.gateway`` as a dict (YAML-ready).

    Args:
        config: the inferline config; ``gateway`` gives ports, routers, shedding and limits.
        port: listener port instead of ``gateway.port``.
        admin_port: admin port (bound to 127.0.0.1 only) instead of ``gateway.admin_port``.
        routers: ``host:port`` of each router replica instead of ``gateway.routers``.
        protected_routers: a protected lane's replicas instead of ``gateway.protected_routers``
            ([]: none): the protected classes' calls go there, to ``routers`` only while
            none of them is healthy.
        host: the interface the listener binds (``inferline up``: ``server.host``).

    Raises:
        ValueError: a router address is not ``host:port`` (shed classes are checked by the config).
    """
    gateway = config.gateway
    listen_port = gateway.port if port is None else port
    replicas = gateway.routers if routers is None else routers
    caps = (
        (ROUTER_CLUSTER, gateway.in_flight.max_per_router, None),
        (KSERVE_CLUSTER, gateway.in_flight.kserve_max_per_router, gateway.in_flight.kserve_protected_max_per_router),
    )
    lane = gateway.protected_routers if protected_routers is None else protected_routers
    if not gateway.shed:
        lane = []  # nothing shed: every class is protected, and a lane would take every call
    clusters = [_router_cluster(name, replicas, cap, gateway.upstream_tls, high) for name, cap, high in caps]
    if lane:
        # The lane first; the other routers only while no lane replica is healthy (priority 1).
        clusters += [
            _router_cluster(name + PROTECTED_SUFFIX, lane, cap, gateway.upstream_tls, high, fallback=replicas)
            for name, cap, high in caps
        ]
    return {
        # Admin only on loopback: it can change log levels, drain listeners and quit the server.
        "admin": {"address": _socket_address("127.0.0.1", gateway.admin_port if admin_port is None else admin_port)},
        # RE2 refuses regexes over 100 program units by default; the public-path regex is ~130.
        # The admin layer keeps /runtime_modify working (Envoy's default runtime, had none been given).
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {"re2.max_program_size.error_level": 1000}},
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "static_resources": {
            "listeners": [_listener(config, host, listen_port, lane=bool(lane))],
            "clusters": clusters,
        },
        # Callers' connections at most (gateway.max_connections); more are refused at accept.
        "overload_manager": {"resource_monitors": [_max_connections(gateway.max_connections)]},
    }


def _max_connections(limit: int) -> dict[str, Any]:
    return {
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {"@type": _MAX_CONNECTIONS, "max_active_downstream_connections": limit},
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _listener(config: InferlineConfig, host: str, port: int, *, lane: bool = False) -> dict[str, Any]:
    """One listener, one HCM: gRPC callers speak HTTP/2, REST tooling HTTP/1.1 (codec AUTO)."""
    gateway = config.gateway
    hcm = {
        "@type": _HCM,
        "stat_prefix": STAT_PREFIX,
        "codec_type": "AUTO",
        # A stream with no bytes either way for this long is reset; unary calls never get near it,
        # a stuck client does not hold a stream forever. No request_timeout: deadlines are the caller's.
        "stream_idle_timeout": "30s",
        "common_http_protocol_options": {"idle_timeout": "300s"},
        # Headers: Envoy's default 60 KiB is ample for metadata; bounded well below max_request_bytes.
        "max_request_headers_kb": max(1, min(60, gateway.max_request_bytes // 1024)),
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "route_config": _route_config(config, lane=lane),
        "local_reply_config": _local_replies(),
        **({"access_log": _access_log(gateway.access_log)} if gateway.access_log is not None else {}),
        "http_filters": [
            *([rest_filter()] if gateway.rest else []),  # first: every later filter sees a gRPC call
            *_signal_filters(config, lane=lane),
            *_shed_filters(config),
            *_in_flight_filters(config),
            _buffer_filter(gateway.max_request_bytes),
            _router_filter(),
        ],
    }
    return {
        "name": "inferline_ingress",
        "address": _socket_address(host, port),
        "filter_chains": [
            {
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                **downstream_transport_socket(gateway.tls),  # TLS on the listener (gateway.tls)
            }
        ],
    }


def _signal_filters(config: InferlineConfig, *, lane: bool = False) -> list[dict[str, Any]]:
    """The Lua filter that follows the routers' overload signal, and the fault filter that sheds.

    Lua cannot count into Envoy's stats, so it only marks a request (``x-inferline-gateway-shed``,
    and the class as the downstream cluster); the fault filter aborts marked requests with
    RESOURCE_EXHAUSTED and counts them per class.
    """
    signal = config.gateway.signal
    if config.gateway.shed_by != "signal" or not config.gateway.shed:
        return []
    shed = list(config.gateway.shed)
    lane_classes = [cls for cls in config.traffic_classes if cls not in shed] if lane else []
    lua = {"@type": _LUA, "default_source_code": {"inline_string": _signal_lua(shed, signal, lane_classes)}}
    fault = {
        "@type": _FAULT,
        "abort": {"grpc_status": 8, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
        "headers": [{"name": SIGNAL_SHED_HEADER, "present_match": True}],
    }
    return [{"name": SIGNAL_FILTER, "typed_config": lua}, {"name": SIGNAL_SHED_FILTER, "typed_config": fault}]


def _signal_lua(classes: list[str], signal: ShedSignalConfig, lane_classes: list[str] | None = None) -> str:
    """The Lua script: one shed probability per (method, class), per worker thread (Lua state is per worker).

    Each answer with ``x-inferline-overloaded`` (a trailer of unary gRPC answers, a header of
    trailers-only ones such as sheds) moves the probability of every class of the method it
    answers (``:path``, kept for the answer in the stream's dynamic metadata): up ``step_up``
    if the list names the class, else down ``step_down``. So an overloaded KServe front door
    (whose signal comes from its models' admission) sheds its own lower classes, not
    ``Predict``'s, and the other way round.

    KServe ``ModelInfer`` calls are keyed by model too, as the routers admit them: every
    model shares one path, and one overloaded model must not make the gateway shed another
    model's calls. The model is read off the request body — ``model_name`` is field 1 of
    ``ModelInferRequest``, the first bytes on the wire after the 5-byte gRPC frame header —
    so unmodified Triton clients need send nothing more. A body that does not start that way
    (compressed, or a name over 127 bytes) falls back to the method's key.

    With a protected lane (``lane_classes``: the classes whose calls the lane's routers take),
    an answer to such a call only raises: the lane never sees the lower classes, so its
    routers' silence about them says nothing, but when its critical calls miss they name
    every sheddable class (``admission.protected_miss_rate``), and that must still shed.

    Answers without the signal (other servers, the gateway's own replies) move nothing; only
    the routers' answers carry it, and only to authenticated calls of known models, so the
    table holds a handful of keys whatever names callers send. Class names are plain
    (config-checked), so they are safe in Lua strings and in the comma-separated list.
    """
    table = ", ".join(f'["{cls}"] = true' for cls in classes)
    lane_table = ", ".join(f'["{cls}"] = true' for cls in lane_classes or [])
    return f"""-- inferline gateway: shed on the routers' overload signal (rendered by `inferline gateway render`)
local CLASS_HEADER = "{headers.TRAFFIC_CLASS}"
local OVERLOADED = "{headers.OVERLOADED}"
local SHED_HEADER = "{SIGNAL_SHED_HEADER}"
local DOWNSTREAM_CLUSTER = "{_DOWNSTREAM_CLUSTER}"
local METADATA = "{SIGNAL_FILTER}"
local STEP_UP, STEP_DOWN, MAX_P = {signal.step_up!r}, {signal.step_down!r}, {signal.max_probability!r}
local CLASSES = {{{table}}}
local LANE = {{{lane_table}}} -- classes whose answers only raise (a protected lane's)
local MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
local shed_p = {{}} -- key (path, or path#model) -> class -> probability

-- ModelInferRequest's model_name: field 1 (tag 0x0A), a one-byte length, after the gRPC frame
-- header (flag 0: uncompressed, 4-byte length). nil when the body does not start that way.
local function model_of(handle)
  local body = handle:body()
  if body == nil then return nil end
  local size = body:length()
  if size < 8 then return nil end
  local head = body:getBytes(0, math.min(size, 7 + 127))
  if string.byte(head, 1) ~= 0 or string.byte(head, 6) ~= 10 then return nil end
  local length = string.byte(head, 7)
  if length >= 128 or 7 + length > #head then return nil end
  return string.sub(head, 8, 7 + length)
end

local function follow(path, list, raise_only)
  local by_class = shed_p[path]
  if by_class == nil then
    by_class = {{}}
    for cls, _ in pairs(CLASSES) do by_class[cls] = 0.0 end
    shed_p[path] = by_class
  end
  local padded = "," .. list .. ","
  for cls, p in pairs(by_class) do
    if string.find(padded, "," .. cls .. ",", 1, true) then
      p = p + STEP_UP
      if p > MAX_P then p = MAX_P end
    elseif not raise_only then
      p = p - STEP_DOWN
      if p < 0 then p = 0 end
    end
    by_class[cls] = p
  end
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path")
  local key = path
  if path == MODEL_INFER then
    -- body() suspends the script until the body is in: header objects taken before it are
    -- out of scope after it, so the headers are taken (again) below.
    local model = model_of(handle)
    if model ~= nil then key = path .. "#" .. model end
  end
  local headers = handle:headers()
  headers:remove(SHED_HEADER) -- only this script marks a request for the fault filter
  if path == nil then return end
  handle:streamInfo():dynamicMetadata():set(METADATA, "path", key)
  local cls = headers:get(CLASS_HEADER)
  if cls ~= nil and LANE[cls] then handle:streamInfo():dynamicMetadata():set(METADATA, "lane", "1") end
  local by_class = shed_p[key]
  if cls == nil or by_class == nil then return end
  local p = by_class[cls]
  if p ~= nil and p > 0 and math.random() < p then
    headers:replace(SHED_HEADER, cls)
    headers:replace(DOWNSTREAM_CLUSTER, cls)
  end
end

function envoy_on_response(handle)
  local list = handle:headers():get(OVERLOADED)
  if list == nil then
    local trailers = handle:trailers()
    if trailers == nil then return end
    list = trailers:get(OVERLOADED)
    if list == nil then return end
  end
  local meta = handle:streamInfo():dynamicMetadata():get(METADATA)
  if meta == nil or meta["path"] == nil then return end
  follow(meta["path"], list, meta["lane"] ~= nil)
end
"""


def _shed_filters(config: InferlineConfig) -> list[dict[str, Any]]:
    """One admission_control filter per shed class, so each class has its own success-rate window.

    admission_control has no per-route config of its own, and one filter instance keeps one
    sliding window: a shared filter would shed ``batch`` because ``standard`` failed. Every
    route but its class's turns it off (``FilterConfig{disabled: true}``; Envoy 1.40 refuses
    to switch a chain-disabled filter on with an empty ``FilterConfig``), so health checks,
    reflection and unlisted classes never pass through any of them. They run before the
    buffer filter: a rejection costs one header lookup, not a buffered body.
    """
    if config.gateway.shed_by != "success_rate":
        return []
    return [
        {"name": SHED_FILTER_PREFIX + cls, "typed_config": _admission_control(cls, shed)}
        for cls, shed in config.gateway.shed.items()
    ]


def _admission_control(cls: str, shed: ClassShedConfig) -> dict[str, Any]:
    """Envoy's client-side-throttling filter (Google SRE book) for one class.

    P(reject) = ((total - success / sr_threshold) / (total + 1)) ** (1 / aggression), capped
    at ``max_rejection_probability``, over the last ``window_s`` of this class's requests.
    A rejection is a local 503 reply before any upstream work; its own rejections are not
    counted, so the class recovers once the router answers again. Runtime keys let an
    operator tune a live Envoy (``/runtime_modify``) without a new config.
    """
    runtime = f"inferline.shed.{cls}"
    return {
        "@type": _ADMISSION_CONTROL,
        "enabled": {"default_value": True, "runtime_key": f"{runtime}.enabled"},
        "sampling_window": _duration(shed.window_s),
        "sr_threshold": {"default_value": {"value": shed.sr_threshold * 100}, "runtime_key": f"{runtime}.sr_threshold"},
        "aggression": {"default_value": shed.aggression, "runtime_key": f"{runtime}.aggression"},
        "rps_threshold": {"default_value": shed.rps_threshold, "runtime_key": f"{runtime}.rps_threshold"},
        "max_rejection_probability": {
            "default_value": {"value": shed.max_rejection_probability * 100},
            "runtime_key": f"{runtime}.max_rejection_probability",
        },
        "success_criteria": {
            "grpc_criteria": {"grpc_success_status": list(GRPC_SUCCESS_CODES)},
            # Non-gRPC callers (REST tooling): only 5xx means the backend is struggling.
            "http_criteria": {"http_success_status": [{"start": 100, "end": 500}]},
        },
    }


def _in_flight_filters(config: InferlineConfig) -> list[dict[str, Any]]:
    """Envoy's adaptive concurrency limit (gradient controller) for the shed classes' requests.

    After the shed filters: a request they turn away never counts as outstanding, and their
    instant local replies never pass for router latency samples. The routes of the
    protected classes turn it off, so only the shed classes' calls (and calls without the
    class header) are limited and sampled. Under ``shed_by:
    success_rate`` its refusals count against the class's success rate, as a router's own
    sheds would.
    """
    in_flight = config.gateway.in_flight
    if not _adaptive_in_flight(config):
        return []
    gradient = {
        "sample_aggregate_percentile": {"value": in_flight.latency_percentile},
        "concurrency_limit_params": {
            "max_concurrency_limit": in_flight.max_limit,
            "concurrency_update_interval": _duration(in_flight.update_interval_s),
        },
        "min_rtt_calc_params": {
            "buffer": {"value": in_flight.buffer * 100},
            "min_concurrency": in_flight.min_concurrency,
            **_min_rtt(in_flight),
        },
    }
    typed = {
        "@type": _ADAPTIVE_CONCURRENCY,
        "gradient_controller_config": gradient,
        "enabled": {"default_value": True, "runtime_key": "inferline.in_flight.enabled"},
    }
    return [{"name": IN_FLIGHT_FILTER, "typed_config": typed}]


def _adaptive_in_flight(config: InferlineConfig) -> bool:
    """Whether the gateway has the adaptive in-flight limit: it is on, and there are classes to hold."""
    return bool(config.gateway.shed) and config.gateway.in_flight.adaptive


def _min_rtt(in_flight: InFlightConfig) -> dict[str, Any]:
    """Sample minRTT every ``min_rtt_interval_s`` (±10 % jitter), or take ``min_rtt_ms`` as it."""
    if in_flight.min_rtt_ms is not None:
        return {"fixed_value": _duration(in_flight.min_rtt_ms / 1000)}
    return {
        "interval": _duration(in_flight.min_rtt_interval_s),
        "request_count": in_flight.min_rtt_requests,
        "jitter": {"value": 10.0},
    }


def _local_replies() -> dict[str, Any]:
    """Turns the gateway's sheds into gRPC RESOURCE_EXHAUSTED (8) with a message saying why.

    The filter answers a plain local 503, which Envoy sends to gRPC callers as UNAVAILABLE
    (14): the code gRPC clients and retry policies retry at once, into the overload. A shed
    must read as the router's own shed does (RESOURCE_EXHAUSTED, never in ``retry_on``).
    Only these rejections are matched (CEL on the response code details, and the upstream
    overflow flag ``UO`` of the fixed in-flight cap); Envoy's other local 503s (no healthy
    router, connect failure) stay UNAVAILABLE, which is right there.
    """
    grpc_status = {"key": "grpc-status", "value": "8"}

    def mapper(access_log_filter: dict[str, Any], message: str) -> dict[str, Any]:
        return {
            "filter": access_log_filter,
            "headers_to_add": [{"header": grpc_status, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "body": {"inline_string": message},
        }

    return {
        "mappers": [
            mapper(_cel_filter("response.code_details.contains('admission_control')"), SHED_MESSAGE),
            mapper(_cel_filter("response.code_details.contains('fault_filter_abort')"), SIGNAL_SHED_MESSAGE),
            mapper(_cel_filter("response.code_details.contains('reached_concurrency_limit')"), ADAPTIVE_SHED_MESSAGE),
            mapper({"response_flag_filter": {"flags": ["UO"]}}, IN_FLIGHT_SHED_MESSAGE),
        ]
    }


ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%E3SZ)%",
    "duration_ms": "%DURATION%",
    "path": "%REQ(:PATH)%",
    "traffic_class": f"%REQ({TRAFFIC_CLASS_HEADER})%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "grpc_status": "%GRPC_STATUS(NUMBER)%",
    "upstream": "%UPSTREAM_HOST%",
}
"""One access-log line (``gateway.access_log``): no header but the class is logged, so no
caller's credentials are; ``duration_ms`` is Envoy's time from the call's first byte in to
its last byte out."""


def _access_log(log: GatewayAccessLogConfig) -> list[dict[str, Any]]:
    """Envoy's file access logger, JSON lines; unless ``all_calls``, only of the calls no router
    answered (Envoy's own replies: ``response.code_details`` other than ``via_upstream``)."""
    logger: dict[str, Any] = {
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": _FILE_LOG, "path": log.path, "log_format": {"json_format": ACCESS_LOG_FIELDS}},
    }
    if not log.all_calls:
        logger["filter"] = _cel_filter("response.code_details != 'via_upstream'")
    return [logger]


def _cel_filter(expression: str) -> dict[str, Any]:
    """An access-log filter (local replies' mappers, the access log) on a CEL ``expression``."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _CEL_FILTER, "expression": expression},
        }
    }


def _buffer_filter(max_request_bytes: int) -> dict[str, Any]:
    """Refuses request bodies over ``gateway.max_request_bytes`` (413) before they reach a router.

    Buffering costs nothing extra for unary gRPC calls, whose message arrives whole anyway.
    """
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": _BUFFER, "max_request_bytes": max_request_bytes},
    }


def _router_filter() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}


def _route_config(config: InferlineConfig, *, lane: bool = False) -> dict[str, Any]:
    """Per front door, a route per traffic class first (Envoy takes the first match) and its
    catch-all; then every other path.

    The KServe front door's paths come first, to the KServe cluster (``KSERVE_CLUSTER``), then
    the other public services', to ``ROUTER_CLUSTER``: the same routes for each, to clusters
    with caps of their own. Only a class the gateway never sheds (critical), named in the
    class header, goes at Envoy's HIGH routing priority, where the in-flight limit is off and
    no cap applies but the KServe front door's ``kserve_protected_max_per_router``. The shed
    classes, and calls without the header (or with an unknown class), go at DEFAULT, under
    the in-flight limit: leaving the header out never buys a way past it, and naming a class
    the message does not is refused by the router.
    With ``shed_by: success_rate`` each shed class's route also keeps only its own
    success-rate filter on; with ``signal`` the Lua filter reads the class itself.
    """
    shed = list(config.gateway.shed)
    protected = [cls for cls in config.traffic_classes if cls not in config.gateway.shed]
    filters = [SHED_FILTER_PREFIX + cls for cls in shed] if config.gateway.shed_by == "success_rate" else []
    unlimited = [*filters, *([IN_FLIGHT_FILTER] if _adaptive_in_flight(config) else [])]
    routes: list[dict[str, Any]] = []
    for prefix, cluster, match in (
        ("kserve_", KSERVE_CLUSTER, _public_match([KSERVE_SERVICE])),
        ("", ROUTER_CLUSTER, _public_match([s for s in PUBLIC_SERVICES if s != KSERVE_SERVICE])),
    ):
        routes += [
            _class_route(prefix, cls, match, _route_action(cluster, "DEFAULT"), filters, keep=SHED_FILTER_PREFIX + cls)
            for cls in shed
        ]
        high = _route_action(cluster + PROTECTED_SUFFIX, "HIGH", lane=True) if lane else _route_action(cluster, "HIGH")
        routes += [_class_route(prefix, cls, match, high, unlimited, keep=None) for cls in protected]
        default = {"name": f"{prefix}default", "match": match, "route": _route_action(cluster, "DEFAULT")}
        routes.append({**default, **_filters_off(filters, keep=None)})
    # Any other path is no service of ours: Envoy answers it itself (404; UNIMPLEMENTED to a
    # gRPC caller) with every shedding filter off. Matching no route at all would leave them
    # on (they run before the router filter), so after a class's failures the success-rate
    # filter refused an unknown path with 503, which reads as overload, not as a wrong path.
    signal = [SIGNAL_FILTER, SIGNAL_SHED_FILTER] if _signal_filters(config) else []
    unrouted = {"name": "unrouted", "match": {"prefix": "/"}, "direct_response": {"status": 404}}
    routes.append({**unrouted, **_filters_off([*signal, *unlimited], keep=None)})
    # The caller's grpc-timeout, for the router to measure its transport wait (router.ingress),
    # and the deployment's secret, without which a router ignores that header
    # (router.gateway_trust). Envoy reads the secret from its own environment when it starts,
    # so it is never written into the rendered file. A caller's own copies are dropped
    # first; an absent grpc-timeout adds nothing.
    ingress_timeout = {"key": headers.INGRESS_TIMEOUT, "value": "%REQ(grpc-timeout)%"}
    secret = {"key": headers.GATEWAY_SECRET, "value": f"%ENVIRONMENT({config.gateway.secret_env})%"}
    return {
        "name": "inferline",
        "virtual_hosts": [
            {
                "name": "inferline",
                "domains": ["*"],
                "routes": routes,
                "request_headers_to_remove": list(headers.GATEWAY_HEADERS),
                "request_headers_to_add": [
                    {"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for header in (ingress_timeout, secret)
                ],
            }
        ],
    }


PUBLIC_SERVICES = (
    "inferline.v1.Inference",
    "inferline.v1.BatchJobs",
    KSERVE_SERVICE,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)
"""The only services the gateway forwards; any other path (the internal Features,
Postprocess and Degradation services among them) takes the ``unrouted`` route, and Envoy
answers gRPC UNIMPLEMENTED without reaching a router."""


def _public_match(public: list[str]) -> dict[str, Any]:
    """Route match of these public services' methods: ``/<service>/<method>``, nothing else."""
    services = "|".join(name.replace(".", "\\.") for name in public)
    return {"safe_regex": {"regex": f"^/({services})/[A-Za-z0-9_]+$"}}


def _class_route(
    prefix: str, cls: str, match: dict[str, Any], action: dict[str, Any], filters_off: list[str], *, keep: str | None
) -> dict[str, Any]:
    """The route of calls on ``match`` naming ``cls`` in the class header: ``filters_off`` off but ``keep``."""
    return {
        "name": f"{prefix}class_{cls}",
        "match": {**match, "headers": [{"name": TRAFFIC_CLASS_HEADER, "string_match": {"exact": cls}}]},
        "route": action,
        **_filters_off(filters_off, keep=keep),
    }


def _filters_off(names: list[str], *, keep: str | None) -> dict[str, Any]:
    """``typed_per_filter_config`` turning off every filter in ``names`` but ``keep``."""
    off = {name: {"@type": _FILTER_CONFIG, "disabled": True} for name in names if name != keep}
    return {"typed_per_filter_config": off} if off else {}


def _route_action(cluster: str, priority: str, *, lane: bool = False) -> dict[str, Any]:
    """Forward to the routers of ``cluster`` at ``priority`` under the caller's own deadline.

    ``timeout: 0s`` turns off Envoy's 15 s default; ``grpc_timeout_header_max: 0s`` makes the
    caller's ``grpc-timeout`` the stream's limit, uncapped, so Envoy gives up exactly when the
    caller does. Retried only when no router saw the call — the connection was refused (a
    replica stopped, before the health checks noticed) or the stream refused (a replica
    going away) — on another replica, at once. Never after a router answered or failed: a
    retry of an overloaded router doubles its load, and the router already degrades within
    the budget itself. ``lane``: to a protected lane's cluster, whose retry goes to the other
    priority (the failover routers) when the lane's replica refused it, before the health
    checks have seen the lane go.
    """
    retry = {**_UNSEEN_RETRY, "retry_priority": _PREVIOUS_PRIORITIES} if lane else _UNSEEN_RETRY
    return {
        "cluster": cluster,
        "priority": priority,
        "timeout": "0s",
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        "retry_policy": retry,
    }


_PREVIOUS_PRIORITIES: dict[str, Any] = {
    "name": "envoy.retry_priorities.previous_priorities",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        "update_frequency": 1,
    },
}


_UNSEEN_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
    "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.005s"},
}
"""Retries of calls no router saw (see ``_route_action``): each on a replica not yet tried."""


def _router_cluster(
    name: str,
    routers: list[str],
    max_per_router: int | None,
    upstream_tls: TlsClientConfig | None = None,
    protected_max_per_router: int | None = None,
    *,
    fallback: list[str] | None = None,
) -> dict[str, Any]:
    """The router replicas, over HTTP/2, balanced per request and health-checked over gRPC.

    The DEFAULT-priority circuit breaker (the shed classes, and calls without the class
    header) is the fixed in-flight cap, for the replicas listed: a DNS name that resolves to
    several counts once. HIGH (calls naming a protected class) is limited only by
    ``protected_max_per_router`` (the KServe front door's). Each front
    door has a cluster of its own (``ROUTER_CLUSTER``, ``KSERVE_CLUSTER``) over the same
    replicas, each health-checking them (a check a second per replica each: nothing next to
    the calls). ``fallback``: replicas at priority 1, which Envoy sends calls to only while
    those of ``routers`` are unhealthy (a protected lane's cluster: a lane process that died
    is started again within seconds, and meanwhile the other routers answer its calls).
    """
    endpoints = [_endpoint(address) for address in routers]
    spare = [_endpoint(address) for address in fallback or []]
    localities: list[dict[str, Any]] = [{"lb_endpoints": endpoints}]
    if spare:
        localities.append({"lb_endpoints": spare, "priority": 1})
    bound = _CIRCUIT_LIMIT if max_per_router is None else max_per_router * len(routers)
    protected = _CIRCUIT_LIMIT if protected_max_per_router is None else protected_max_per_router * len(routers)
    static = all(is_ip(_host(e)) for e in [*endpoints, *spare])
    return {
        "name": name,
        # STATIC for IP literals; STRICT_DNS resolves names and follows DNS changes (k8s services).
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "1s",
        # Per request, not per connection: one HTTP/2 connection would pin all traffic to one replica.
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}},
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": localities},
        "health_checks": [_health_check()],
        "circuit_breakers": {"thresholds": [_circuit("DEFAULT", bound), _circuit("HIGH", protected)]},
        # TLS to the routers, health checks included (gateway.upstream_tls).
        **upstream_transport_socket(upstream_tls, [_host(e) for e in [*endpoints, *spare]]),
    }


def _circuit(priority: str, max_requests: int) -> dict[str, Any]:
    """One priority's limits; retries (of calls no router saw) at most a quarter of the calls in flight."""
    return {
        "priority": priority,
        "max_connections": _CIRCUIT_LIMIT,
        "max_pending_requests": _CIRCUIT_LIMIT,
        "max_requests": max_requests,
        "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 10},
    }


def _health_check() -> dict[str, Any]:
    """``grpc.health.v1`` Check against each router: a draining router (NOT_SERVING) leaves rotation.

    Within about two intervals (two failed checks), which a router's ``server.drain_s`` must
    cover. ``no_traffic_interval`` is short so a freshly started gateway learns quickly that
    a router is up.
    """
    return {
        "timeout": "1s",
        "interval": "1s",
        "no_traffic_interval": "2s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {},
    }


def _endpoint(address: str) -> dict[str, Any]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"router address must be host:port, got {address!r}")
    return {"endpoint": {"address": _socket_address(host.strip("[]"), int(port))}}


def _host(endpoint: dict[str, Any]) -> str:
    host: str = endpoint["endpoint"]["address"]["socket_address"]["address"]
    return host


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
