"""The rendered Envoy bootstrap: its structure, and that the real ``envoy --mode validate`` accepts it."""

from __future__ import annotations

import base64
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from inferline.cli import cli
from inferline.core import headers
from inferline.core.config import ConfigError, InferlineConfig, load_config, parse_config
from inferline.gateway import ROUTER_CLUSTER, TRAFFIC_CLASS_HEADER, render_envoy
from inferline.gateway.embedded import check_access_log
from inferline.gateway.render import (
    ADAPTIVE_SHED_MESSAGE,
    IN_FLIGHT_FILTER,
    IN_FLIGHT_SHED_MESSAGE,
    KSERVE_CLUSTER,
    PROTECTED_SUFFIX,
    SIGNAL_FILTER,
    SIGNAL_SHED_FILTER,
    SIGNAL_SHED_HEADER,
)
from inferline.gateway.rest import REST_FILTER

DEFAULT = pathlib.Path("deploy/local/inferline.yaml")
ENVOY = pathlib.Path(".venv/bin/envoy")
SHED = {"batch": {"window_s": 2, "sr_threshold": 0.9}, "standard": {}}
SR = "success_rate"


def _config(**gateway: Any) -> InferlineConfig:
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["gateway"] = gateway
    return parse_config(raw, DEFAULT.parent)


def _hcm(rendered: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return hcm["typed_config"]  # type: ignore[no-any-return]


def _routes(rendered: dict[str, Any]) -> list[dict[str, Any]]:
    return _hcm(rendered)["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[no-any-return]


def _front_doors(*names: str) -> list[str]:
    """Route names in render order: the KServe front door's copies of ``names`` first, then ``names``."""
    return [*(f"kserve_{n}" for n in names), *names]


def _validate(rendered: dict[str, Any], tmp_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "gateway",
    [
        {},
        {"shed": SHED},
        {"shed": SHED, "shed_by": SR},
        {"shed": SHED, "in_flight": {"adaptive": False, "max_per_router": 8}},
        {"shed": SHED, "access_log": {"path": "/dev/stdout"}},
        {"shed": SHED, "access_log": {"path": "/dev/stdout", "all_calls": True}},
    ],
    ids=["default", "signal", "success_rate", "fixed_cap", "access_log", "access_log_all"],
)
def test_real_envoy_validates_the_rendered_config(gateway: dict[str, Any], tmp_path: pathlib.Path) -> None:
    result = _validate(render_envoy(_config(**gateway)), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_access_log_is_off_by_default_and_keeps_envoys_own_answers_unless_asked_for_all() -> None:
    assert "access_log" not in _hcm(render_envoy(_config(shed=SHED)))
    (own,) = _hcm(render_envoy(_config(shed=SHED, access_log={"path": "/var/log/gateway.log"})))["access_log"]
    assert own["typed_config"]["path"] == "/var/log/gateway.log"
    fields = own["typed_config"]["log_format"]["json_format"]
    assert fields["traffic_class"] == f"%REQ({TRAFFIC_CLASS_HEADER})%"
    assert {"duration_ms", "details", "flags", "grpc_status", "path", "upstream"} <= set(fields)
    assert not any("authorization" in str(v).lower() for v in fields.values())  # no credentials
    # Only the calls no router answered: the upstream's answers say "via_upstream".
    assert own["filter"]["extension_filter"]["typed_config"]["expression"] == (
        "response.code_details != 'via_upstream'"
    )
    (every,) = _hcm(render_envoy(_config(shed=SHED, access_log={"path": "/dev/stdout", "all_calls": True})))[
        "access_log"
    ]
    assert "filter" not in every and every["typed_config"]["log_format"]["json_format"] == fields


def test_an_access_log_without_a_path_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.access_log\.path"):
        _config(access_log={"all_calls": True})


def test_an_access_log_envoy_could_not_open_is_refused_before_anything_starts(tmp_path: pathlib.Path) -> None:
    check_access_log(_config())  # none configured
    for fine in (str(tmp_path / "gateway.log"), "/dev/stdout"):
        check_access_log(_config(access_log={"path": fine}))
    with pytest.raises(ConfigError, match=r"gateway\.access_log\.path: .*: no such directory"):
        check_access_log(_config(access_log={"path": str(tmp_path / "absent" / "gateway.log")}))
    with pytest.raises(ConfigError, match=r"gateway\.access_log\.path: .* is a directory"):
        check_access_log(_config(access_log={"path": str(tmp_path)}))
    # `inferline up` says so in one line and exits 2, before Triton or a router starts.
    environ = {**os.environ, "INFERLINE_GATEWAY__ACCESS_LOG__PATH": str(tmp_path / "absent" / "gateway.log")}
    up = subprocess.run(
        [sys.executable, "-m", "inferline.cli", "up", "--config", str(DEFAULT), "--port", "1"],
        capture_output=True, text=True, timeout=120, env=environ, check=False,
    )  # fmt: skip
    assert up.returncode == 2, up.stderr[-2000:]
    assert up.stderr.strip().splitlines()[-1].startswith("cannot start: gateway.access_log.path:")
    assert "Traceback" not in up.stderr


def test_callers_connections_are_capped_by_envoys_overload_manager() -> None:
    def cap(rendered: dict[str, Any]) -> int:
        (monitor,) = rendered["overload_manager"]["resource_monitors"]
        assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
        return int(monitor["typed_config"]["max_active_downstream_connections"])

    assert cap(render_envoy(_config())) == 20_000
    assert cap(render_envoy(_config(max_connections=500))) == 500
    with pytest.raises(ConfigError, match=r"gateway\.max_connections"):
        _config(max_connections=0)


def test_hostnames_validate_as_strict_dns(tmp_path: pathlib.Path) -> None:
    rendered = render_envoy(_config(shed=SHED, shed_by=SR), routers=["localhost:50051", "127.0.0.1:50052"])
    assert rendered["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    result = _validate(rendered, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_shed_classes_every_class_goes_at_high_priority() -> None:
    rendered = render_envoy(_config())
    routes = {r["name"]: r for r in _routes(rendered)}
    assert list(routes) == [*_front_doors("class_critical", "class_standard", "class_batch", "default"), "unrouted"]
    assert list(routes["default"]["match"]) == ["safe_regex"]  # the public services' paths, whatever the headers
    assert all(routes[f"class_{c}"]["route"]["priority"] == "HIGH" for c in ("critical", "standard", "batch"))
    assert not any("typed_per_filter_config" in r for r in routes.values())  # no filter to turn off
    assert [f["name"] for f in _hcm(rendered)["http_filters"]][-1] == "envoy.filters.http.router"
    assert not any(f["name"].startswith("inferline.shed.") for f in _hcm(rendered)["http_filters"])


def test_signal_shedding_is_a_lua_filter_and_a_fault_filter_before_the_router() -> None:
    rendered = render_envoy(_config(shed=SHED))
    names = [f["name"] for f in _hcm(rendered)["http_filters"]]
    assert names == [
        REST_FILTER,
        SIGNAL_FILTER,
        SIGNAL_SHED_FILTER,
        IN_FLIGHT_FILTER,
        "envoy.filters.http.buffer",
        "envoy.filters.http.router",
    ]
    # The Lua filter reads the class itself: the class routes set the routing priority, and
    # only the protected class's route turns a filter (the in-flight limit) off.
    routes = {r["name"]: r for r in _routes(rendered)}
    assert list(routes) == [*_front_doors("class_batch", "class_standard", "class_critical", "default"), "unrouted"]
    for prefix in ("", "kserve_"):  # the same on both front doors
        assert "typed_per_filter_config" not in routes[f"{prefix}class_batch"]
        assert "typed_per_filter_config" not in routes[f"{prefix}default"]  # no header: limited like a shed class
        assert set(routes[f"{prefix}class_critical"]["typed_per_filter_config"]) == {IN_FLIGHT_FILTER}


def test_signal_fault_filter_aborts_only_marked_requests_with_resource_exhausted() -> None:
    filters = {f["name"]: f["typed_config"] for f in _hcm(render_envoy(_config(shed=SHED)))["http_filters"]}
    fault = filters[SIGNAL_SHED_FILTER]
    assert fault["abort"]["grpc_status"] == 8
    assert fault["abort"]["percentage"] == {"numerator": 100, "denominator": "HUNDRED"}
    assert fault["headers"] == [{"name": SIGNAL_SHED_HEADER, "present_match": True}]


def test_signal_lua_knows_the_shed_classes_and_the_steps() -> None:
    config = _config(shed={"batch": {}}, signal={"step_up": 0.1, "step_down": 0.01, "max_probability": 0.9})
    filters = {f["name"]: f["typed_config"] for f in _hcm(render_envoy(config))["http_filters"]}
    script = filters[SIGNAL_FILTER]["default_source_code"]["inline_string"]
    assert 'local CLASSES = {["batch"] = true}' in script  # only the listed classes are ever shed
    assert "local STEP_UP, STEP_DOWN, MAX_P = 0.1, 0.01, 0.9" in script
    for name in (headers.TRAFFIC_CLASS, headers.OVERLOADED, SIGNAL_SHED_HEADER):
        assert f'"{name}"' in script


def test_every_request_carries_the_callers_grpc_timeout_and_the_gateway_secret_for_the_router() -> None:
    vhost = _hcm(render_envoy(_config(shed=SHED, secret_env="MY_GATEWAY_SECRET")))["route_config"]["virtual_hosts"][0]
    # Never a caller's own value of either.
    assert vhost["request_headers_to_remove"] == [headers.INGRESS_TIMEOUT, headers.GATEWAY_SECRET]
    timeout, secret = (added["header"] for added in vhost["request_headers_to_add"])
    assert timeout == {"key": headers.INGRESS_TIMEOUT, "value": "%REQ(grpc-timeout)%"}
    # Read from Envoy's environment at start: the secret itself is never in the rendered file.
    assert secret == {"key": headers.GATEWAY_SECRET, "value": "%ENVIRONMENT(MY_GATEWAY_SECRET)%"}


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/inferline.v1.Inference/Predict", True),
        ("/inference.GRPCInferenceService/ModelInfer", True),
        ("/grpc.health.v1.Health/Check", True),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
        ("/inferline.internal.v1.Degradation/RecordScores", False),
        ("/inferline.internal.v1.Features/GetFeatures", False),
        ("/inferline.v1.Inference/Predict/extra", False),
        ("/inferline.v1.InferenceX/Predict", False),
    ],
)
def test_only_the_public_services_are_routed(path: str, forwarded: bool) -> None:
    forwarding = [r for r in _routes(render_envoy(_config(shed=SHED))) if "route" in r]
    clusters = {r["route"]["cluster"] for r in forwarding if re.fullmatch(r["match"]["safe_regex"]["regex"], path)}
    if not forwarded:
        assert not clusters
    else:  # KServe calls to the KServe front door's cluster, every other public call to the other
        assert clusters == {KSERVE_CLUSTER if path.startswith("/inference.") else ROUTER_CLUSTER}


def test_no_shed_classes_means_no_shed_filters() -> None:
    names = [f["name"] for f in _hcm(render_envoy(_config()))["http_filters"]]
    assert names == [REST_FILTER, "envoy.filters.http.buffer", "envoy.filters.http.router"]


def test_each_class_gets_a_header_route_and_the_default_route_is_last() -> None:
    routes = _routes(render_envoy(_config(shed=SHED, shed_by=SR)))
    names = _front_doors("class_batch", "class_standard", "class_critical", "default")
    assert [r["name"] for r in routes] == [*names, "unrouted"]
    for door in (routes[:4], routes[4:8]):
        for route, cls in zip(door, ["batch", "standard", "critical"], strict=False):
            assert route["match"]["headers"] == [{"name": TRAFFIC_CLASS_HEADER, "string_match": {"exact": cls}}]
        assert list(door[-1]["match"]) == ["safe_regex"]  # the front door's paths, whatever the headers


def test_each_class_route_keeps_only_its_own_shed_filter() -> None:
    routes = {r["name"]: r for r in _routes(render_envoy(_config(shed=SHED, shed_by=SR)))}
    assert set(routes["class_batch"]["typed_per_filter_config"]) == {"inferline.shed.standard"}
    assert set(routes["class_standard"]["typed_per_filter_config"]) == {"inferline.shed.batch"}
    assert set(routes["class_critical"]["typed_per_filter_config"]) == {
        "inferline.shed.batch",
        "inferline.shed.standard",
        IN_FLIGHT_FILTER,
    }
    assert set(routes["default"]["typed_per_filter_config"]) == {"inferline.shed.batch", "inferline.shed.standard"}
    assert all(c["disabled"] for r in routes.values() for c in r["typed_per_filter_config"].values())


def test_admission_control_takes_the_class_settings() -> None:
    rendered = render_envoy(_config(shed=SHED, shed_by=SR))
    filters = {f["name"]: f["typed_config"] for f in _hcm(rendered)["http_filters"]}
    assert SIGNAL_FILTER not in filters  # one signal or the other, never both
    batch = filters["inferline.shed.batch"]
    assert batch["sampling_window"] == "2s"
    assert batch["sr_threshold"]["default_value"] == {"value": pytest.approx(90.0)}
    assert batch["max_rejection_probability"]["default_value"] == {"value": pytest.approx(95.0)}
    assert batch["aggression"]["default_value"] == 1.5
    assert batch["rps_threshold"]["default_value"] == 5  # the default: no shedding of a trickle
    success = set(batch["success_criteria"]["grpc_criteria"]["grpc_success_status"])
    assert 0 in success and 16 in success  # OK, and a caller's UNAUTHENTICATED is not overload
    assert not success & {4, 8, 14}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE are failures


def test_routes_forward_under_the_callers_deadline_and_retry_only_calls_no_router_saw() -> None:
    for route in _routes(render_envoy(_config(shed=SHED, shed_by=SR)))[:-1]:  # all but "unrouted"
        action = route["route"]
        assert action["cluster"] == (KSERVE_CLUSTER if route["name"].startswith("kserve_") else ROUTER_CLUSTER)
        assert action["timeout"] == "0s"
        assert action["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
        retry = action["retry_policy"]
        # Never on a router's answer or failure (5xx, reset, gRPC codes): that would double an overload.
        assert retry["retry_on"] == "connect-failure,refused-stream"
        assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
    assert "retry_policy" not in _hcm(render_envoy(_config(shed=SHED)))["route_config"]["virtual_hosts"][0]


def _thresholds(rendered: dict[str, Any], name: str = ROUTER_CLUSTER) -> dict[str, dict[str, Any]]:
    [cluster] = [c for c in rendered["static_resources"]["clusters"] if c["name"] == name]
    return {t["priority"]: t for t in cluster["circuit_breakers"]["thresholds"]}


@pytest.mark.parametrize("shed_by", ["signal", SR])
def test_only_a_named_protected_class_goes_at_high_priority(shed_by: str) -> None:
    rendered = render_envoy(_config(shed=SHED, shed_by=shed_by))
    routes = {r["name"]: r["route"]["priority"] for r in _routes(rendered) if "route" in r}
    expected = {"class_batch": "DEFAULT", "class_standard": "DEFAULT", "class_critical": "HIGH", "default": "DEFAULT"}
    assert routes == expected | {f"kserve_{name}": priority for name, priority in expected.items()}


@pytest.mark.parametrize("shed_by", ["signal", SR])
def test_any_other_path_is_answered_by_envoy_with_every_shed_filter_off(shed_by: str) -> None:
    rendered = render_envoy(_config(shed=SHED, shed_by=shed_by))
    unrouted = _routes(rendered)[-1]
    assert unrouted["match"] == {"prefix": "/"} and unrouted["direct_response"] == {"status": 404}
    chain = {f["name"] for f in _hcm(rendered)["http_filters"]}
    shedding = {n for n in chain if n.startswith(("inferline.shed.", "inferline.signal")) or n == IN_FLIGHT_FILTER}
    assert shedding and set(unrouted["typed_per_filter_config"]) == shedding


def test_in_flight_bound_is_the_default_priority_breaker_times_the_replicas() -> None:
    config = _config(shed=SHED, in_flight={"max_per_router": 24})
    thresholds = _thresholds(render_envoy(config, routers=["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]))
    assert thresholds["DEFAULT"]["max_requests"] == 72
    assert thresholds["HIGH"]["max_requests"] >= 100_000  # critical and unclassed traffic is never held
    for priority in ("DEFAULT", "HIGH"):  # retries (of calls no router saw) bounded by a budget
        assert thresholds[priority]["retry_budget"]["budget_percent"] == {"value": 25.0}


def test_no_fixed_cap_by_default_leaves_the_breakers_open() -> None:
    for cluster in (ROUTER_CLUSTER, KSERVE_CLUSTER):
        thresholds = _thresholds(render_envoy(_config(shed=SHED)), cluster)
        assert thresholds["DEFAULT"]["max_requests"] == thresholds["HIGH"]["max_requests"] >= 100_000


def test_the_kserve_front_door_has_a_cap_of_its_own_over_the_same_routers(tmp_path: pathlib.Path) -> None:
    config = _config(shed=SHED, in_flight={"max_per_router": 16, "kserve_max_per_router": 32})
    rendered = render_envoy(config, routers=["10.0.0.1:1", "10.0.0.2:1"])
    assert _thresholds(rendered)["DEFAULT"]["max_requests"] == 32
    kserve = _thresholds(rendered, KSERVE_CLUSTER)
    assert kserve["DEFAULT"]["max_requests"] == 64 and kserve["HIGH"]["max_requests"] >= 100_000
    router, kserve_cluster = rendered["static_resources"]["clusters"]
    assert (router["name"], kserve_cluster["name"]) == (ROUTER_CLUSTER, KSERVE_CLUSTER)
    assert router["load_assignment"]["endpoints"] == kserve_cluster["load_assignment"]["endpoints"]
    assert kserve_cluster["load_assignment"]["cluster_name"] == KSERVE_CLUSTER
    assert kserve_cluster["health_checks"] == router["health_checks"]  # a draining router leaves both
    result = _validate(rendered, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_kserve_front_door_may_cap_the_protected_classes() -> None:
    config = _config(shed=SHED, in_flight={"kserve_protected_max_per_router": 40})
    rendered = render_envoy(config, routers=["10.0.0.1:1", "10.0.0.2:1"])
    assert _thresholds(rendered, KSERVE_CLUSTER)["HIGH"]["max_requests"] == 80
    assert _thresholds(rendered, KSERVE_CLUSTER)["DEFAULT"]["max_requests"] >= 100_000  # its own key, unset
    assert _thresholds(rendered)["HIGH"]["max_requests"] >= 100_000  # Predict's critical calls degrade instead


def test_adaptive_in_flight_limit_takes_the_config_and_sits_after_the_shed_filters() -> None:
    in_flight = {"latency_percentile": 90, "buffer": 0.25, "update_interval_s": 0.2, "min_rtt_interval_s": 60}
    rendered = render_envoy(_config(shed=SHED, shed_by=SR, in_flight={**in_flight, "min_concurrency": 2}))
    names = [f["name"] for f in _hcm(rendered)["http_filters"]]
    assert names.index(IN_FLIGHT_FILTER) == names.index("envoy.filters.http.buffer") - 1
    assert names.index(IN_FLIGHT_FILTER) > max(names.index(f"inferline.shed.{c}") for c in SHED)
    [adaptive] = [f["typed_config"] for f in _hcm(rendered)["http_filters"] if f["name"] == IN_FLIGHT_FILTER]
    gradient = adaptive["gradient_controller_config"]
    assert gradient["sample_aggregate_percentile"] == {"value": 90}
    assert gradient["concurrency_limit_params"]["concurrency_update_interval"] == "0.2s"
    assert gradient["min_rtt_calc_params"]["interval"] == "60s"
    assert gradient["min_rtt_calc_params"]["buffer"] == {"value": pytest.approx(25.0)}
    assert gradient["min_rtt_calc_params"]["min_concurrency"] == 2


def test_no_adaptive_limit_when_turned_off_or_nothing_is_shed() -> None:
    for config in (_config(shed=SHED, in_flight={"adaptive": False}), _config()):
        hcm = _hcm(render_envoy(config))
        assert IN_FLIGHT_FILTER not in [f["name"] for f in hcm["http_filters"]]
        assert IN_FLIGHT_FILTER not in str(hcm["route_config"])


def test_in_flight_refusals_are_told_as_resource_exhausted() -> None:
    mappers = _hcm(render_envoy(_config(shed=SHED)))["local_reply_config"]["mappers"]
    [overflow] = [m for m in mappers if "response_flag_filter" in m["filter"]]
    assert overflow["filter"]["response_flag_filter"] == {"flags": ["UO"]}
    assert overflow["body"]["inline_string"] == IN_FLIGHT_SHED_MESSAGE
    [adaptive] = [m for m in mappers if "reached_concurrency_limit" in str(m["filter"])]
    assert adaptive["body"]["inline_string"] == ADAPTIVE_SHED_MESSAGE
    for mapper in (overflow, adaptive):
        assert mapper["headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "8"}


def test_cluster_endpoints_come_from_the_routers() -> None:
    rendered = render_envoy(_config(), port=18080, admin_port=19901, routers=["10.0.0.1:50051", "10.0.0.2:50052"])
    cluster = rendered["static_resources"]["clusters"][0]
    addresses = [
        e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [{"address": "10.0.0.1", "port_value": 50051}, {"address": "10.0.0.2", "port_value": 50052}]
    assert cluster["type"] == "STATIC"
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    assert rendered["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert rendered["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 18080


def test_bad_router_address_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        render_envoy(_config(), routers=["router"])


def test_cli_writes_the_rendered_yaml(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "envoy.yaml"
    args = ["gateway", "render", "--config", str(DEFAULT), "--out", str(out), "--port", "8081", "--router", "r:1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written == render_envoy(load_config(DEFAULT), port=8081, routers=["r:1"])


def test_a_fixed_min_rtt_replaces_sampling_it(tmp_path: pathlib.Path) -> None:
    rendered = render_envoy(_config(shed=SHED, in_flight={"min_rtt_ms": 5}))
    [adaptive] = [f["typed_config"] for f in _hcm(rendered)["http_filters"] if f["name"] == IN_FLIGHT_FILTER]
    min_rtt = adaptive["gradient_controller_config"]["min_rtt_calc_params"]
    assert min_rtt["fixed_value"] == "0.005s"
    assert "interval" not in min_rtt and "request_count" not in min_rtt
    result = _validate(rendered, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- REST callers -------------------------------------------------------------------------


def test_rest_transcoder_comes_first_and_carries_the_public_api() -> None:
    from google.protobuf import descriptor_pb2

    from inferline.gateway.rest import REST_SERVICES

    filters = _hcm(render_envoy(_config()))["http_filters"]
    assert filters[0]["name"] == REST_FILTER  # every later filter sees a gRPC call
    transcoder = filters[0]["typed_config"]
    assert transcoder["services"] == list(REST_SERVICES) == ["inferline.v1.Inference", "inferline.v1.BatchJobs"]
    assert transcoder["auto_mapping"] and transcoder["convert_grpc_status"]
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(transcoder["proto_descriptor_bin"]))
    names = [f.name for f in files.file]
    services = {f"{f.package}.{s.name}" for f in files.file for s in f.service}
    assert {"inferline.v1.Inference", "inferline.v1.BatchJobs"} <= services
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= set(names)  # the error details' types
    for i, f in enumerate(files.file):  # every file after its imports, as protoc --include_imports writes them
        assert set(f.dependency) <= set(names[:i]), f.name


def test_rest_is_off_when_the_config_says_so() -> None:
    filters = _hcm(render_envoy(_config(rest=False)))["http_filters"]
    assert REST_FILTER not in {f["name"] for f in filters}


def _endpoints(rendered: dict[str, Any], name: str) -> list[tuple[int, list[str]]]:
    """(priority, host:port of each endpoint) per locality of cluster ``name``."""
    [cluster] = [c for c in rendered["static_resources"]["clusters"] if c["name"] == name]
    return [
        (
            locality.get("priority", 0),
            [f"{e['endpoint']['address']['socket_address']['address']}:"
             f"{e['endpoint']['address']['socket_address']['port_value']}" for e in locality["lb_endpoints"]],
        )
        for locality in cluster["load_assignment"]["endpoints"]
    ]  # fmt: skip


def test_a_protected_lane_takes_the_protected_classes_with_the_other_routers_as_failover(
    tmp_path: pathlib.Path,
) -> None:
    config = _config(shed=SHED, in_flight={"kserve_protected_max_per_router": 40})
    rendered = render_envoy(config, routers=["10.0.0.1:1", "10.0.0.2:1"], protected_routers=["10.0.0.3:1"])
    clusters = {route["name"]: route["route"]["cluster"] for route in _routes(rendered) if "route" in route}
    lane = {"class_critical": ROUTER_CLUSTER + PROTECTED_SUFFIX}
    assert clusters == {"class_batch": ROUTER_CLUSTER, "class_standard": ROUTER_CLUSTER, "default": ROUTER_CLUSTER} | (
        lane
    ) | {
        "kserve_class_batch": KSERVE_CLUSTER,
        "kserve_class_standard": KSERVE_CLUSTER,
        "kserve_default": KSERVE_CLUSTER,
        "kserve_class_critical": KSERVE_CLUSTER + PROTECTED_SUFFIX,
    }
    for name in (ROUTER_CLUSTER, KSERVE_CLUSTER):
        assert _endpoints(rendered, name) == [(0, ["10.0.0.1:1", "10.0.0.2:1"])]
        # The lane first; the others only while no lane replica is healthy.
        assert _endpoints(rendered, name + PROTECTED_SUFFIX) == [(0, ["10.0.0.3:1"]), (1, ["10.0.0.1:1", "10.0.0.2:1"])]
    # A call the lane's replica refused (gone, before the health checks saw it) is retried on the failover.
    retries = {r["name"]: r["route"]["retry_policy"].get("retry_priority", {}).get("name") for r in _routes(rendered)
               if "route" in r}  # fmt: skip
    previous = "envoy.retry_priorities.previous_priorities"
    lane_retries = {name for name, plugin in retries.items() if plugin == previous}
    assert lane_retries == {"class_critical", "kserve_class_critical"}
    # The KServe front door's cap of critical calls counts the lane's replicas.
    assert _thresholds(rendered, KSERVE_CLUSTER + PROTECTED_SUFFIX)["HIGH"]["max_requests"] == 40
    hcm = _hcm(rendered)
    [lua] = [f for f in hcm["http_filters"] if f["name"] == SIGNAL_FILTER]
    assert 'local LANE = {["critical"] = true}' in lua["typed_config"]["default_source_code"]["inline_string"]
    result = _validate(rendered, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lane_comes_from_the_config_unless_given_and_none_renders_no_lane_cluster() -> None:
    config = _config(shed=SHED, protected_routers=["10.0.0.9:7"])
    assert _endpoints(render_envoy(config), ROUTER_CLUSTER + PROTECTED_SUFFIX)[0] == (0, ["10.0.0.9:7"])
    nothing_shed = _config(protected_routers=["10.0.0.9:7"])  # every class protected: no lane to set apart
    for rendered in (
        render_envoy(config, protected_routers=[]),
        render_envoy(_config(shed=SHED)),
        render_envoy(nothing_shed),
    ):
        names = [c["name"] for c in rendered["static_resources"]["clusters"]]
        assert names == [ROUTER_CLUSTER, KSERVE_CLUSTER]
        assert {r["route"]["cluster"] for r in _routes(rendered) if "route" in r} == {ROUTER_CLUSTER, KSERVE_CLUSTER}
        for lua in (f for f in _hcm(rendered)["http_filters"] if f["name"] == SIGNAL_FILTER):
            assert "local LANE = {}" in lua["typed_config"]["default_source_code"]["inline_string"]


def test_cli_renders_a_protected_lane(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "envoy.yaml"
    args = ["gateway", "render", "--config", str(DEFAULT), "--out", str(out), "--router", "r:1"]
    result = CliRunner().invoke(cli, [*args, "--protected-router", "lane:2"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written == render_envoy(load_config(DEFAULT), routers=["r:1"], protected_routers=["lane:2"])
    assert _endpoints(written, ROUTER_CLUSTER + PROTECTED_SUFFIX) == [(0, ["lane:2"]), (1, ["r:1"])]
