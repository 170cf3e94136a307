import pathlib

import pytest
import yaml

from inferline.core.config import ConfigError, InFlightConfig, load_config, parse_config

DEFAULT = pathlib.Path("deploy/local/inferline.yaml")


def _write(tmp_path: pathlib.Path, mutate) -> pathlib.Path:  # type: ignore[no-untyped-def]
    raw = yaml.safe_load(DEFAULT.read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_config_loads_and_resolves_paths() -> None:
    config = load_config(DEFAULT)
    assert config.triton.model_repository == pathlib.Path("triton_models").resolve()
    assert config.routes["driver_ranking"].primary.model == "driver_ranker"


def test_unknown_key_is_named(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, lambda r: r["server"].update(prot=1))
    with pytest.raises(ConfigError, match=r"server\.prot: Extra inputs are not permitted"):
        load_config(path)


def test_bad_value_is_named(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, lambda r: r["routes"]["driver_ranking"].update(max_entities=0))
    with pytest.raises(ConfigError, match=r"routes\.driver_ranking\.max_entities"):
        load_config(path)


def test_variant_with_undeclared_feature_is_refused(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, lambda r: r["routes"]["driver_ranking"]["light"]["features"].append("nope"))
    with pytest.raises(ConfigError, match=r"light\.features names undeclared features \['nope'\]"):
        load_config(path)


def test_tenant_with_unknown_route_is_refused(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, lambda r: r["tenants"]["demo"]["routes"].append("ghost"))
    with pytest.raises(ConfigError, match=r"tenants\.demo\.routes: unknown route .ghost."):
        load_config(path)


def test_plaintext_key_instead_of_digest_is_refused(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, lambda r: r["tenants"]["demo"].update(api_key_sha256=["secret"]))
    with pytest.raises(ConfigError, match=r"tenants\.demo\.api_key_sha256"):
        load_config(path)


def test_environment_overrides_nested_values() -> None:
    config = load_config(DEFAULT, environ={"INFERLINE_SERVER__PORT": "6001", "INFERLINE_TRITON__URL": "triton:8001"})
    assert config.server.port == 6001
    assert config.triton.url == "triton:8001"


def test_bad_environment_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(DEFAULT, environ={"INFERLINE_SERVER__PORT": "not-a-port"})


def test_missing_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "absent.yaml")


def test_a_tenant_without_api_keys_needs_a_jwt_section() -> None:
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["tenants"]["t"] = {"jwt_subjects": ["svc"], "routes": ["driver_ranking"]}
    with pytest.raises(ConfigError, match="no way to authenticate"):
        parse_config(raw, DEFAULT.parent)


def test_a_tenants_default_class_must_be_one_it_may_use() -> None:
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["tenants"]["demo"]["traffic_classes"] = ["batch"]
    with pytest.raises(ConfigError, match="default_traffic_class"):
        parse_config(raw, DEFAULT.parent)


def test_a_traffic_class_name_must_be_plain() -> None:
    # Class names travel in headers, comma-separated overload lists and Prometheus labels.
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["traffic_classes"]["bulk,slow"] = {"priority": 3, "default_deadline_ms": 1000}
    with pytest.raises(ConfigError, match=r"traffic_classes: .*traffic class name 'bulk,slow'"):
        parse_config(raw, DEFAULT.parent)


def test_gateway_sheds_on_the_router_signal_unless_told_otherwise() -> None:
    raw = yaml.safe_load(DEFAULT.read_text())
    assert parse_config(raw, DEFAULT.parent).gateway.shed_by == "signal"
    raw["gateway"]["shed_by"] = "latency"
    with pytest.raises(ConfigError, match=r"gateway\.shed_by"):
        parse_config(raw, DEFAULT.parent)


def test_the_default_install_starts_a_protected_lane_while_the_gateway_sheds_some_class() -> None:
    raw = yaml.safe_load(DEFAULT.read_text())
    gateway = parse_config(raw, DEFAULT.parent).gateway
    assert gateway.protected_lane and gateway.shed and gateway.starts_protected_lane
    raw["gateway"]["shed"] = {}  # every class protected: a lane would take every call
    assert not parse_config(raw, DEFAULT.parent).gateway.starts_protected_lane
    raw["gateway"] |= {"shed": {"batch": {}}, "protected_lane": False}
    assert not parse_config(raw, DEFAULT.parent).gateway.starts_protected_lane
    raw["gateway"] |= {"protected_lane": True, "protected_lane_boost": 20}
    with pytest.raises(ConfigError, match=r"gateway\.protected_lane_boost"):
        parse_config(raw, DEFAULT.parent)


def test_gateway_in_flight_limit_is_adaptive_unless_told_otherwise() -> None:
    raw = yaml.safe_load(DEFAULT.read_text())
    in_flight = parse_config(raw, DEFAULT.parent).gateway.in_flight
    # The default deployment: a latency target (a sampled minRTT pins the limit to min_concurrency
    # while it samples, shedding at light load) and a fixed cap for bursts the target is too slow for.
    assert in_flight.adaptive and in_flight.min_rtt_ms is not None and in_flight.max_per_router is not None
    assert InFlightConfig().max_per_router is None and InFlightConfig().min_rtt_ms is None  # the model's own: off
    bad_values = (("max_per_router", 0), ("kserve_max_per_router", 0), ("latency_percentile", 101), ("buffer", -0.1))
    for key, bad in (*bad_values, ("min_concurrency", 0)):
        raw["gateway"]["in_flight"] = {key: bad}
        with pytest.raises(ConfigError, match=rf"gateway\.in_flight\.{key}"):
            parse_config(raw, DEFAULT.parent)


def _with_kserve_models(**tenant: object) -> dict[str, object]:
    """The default config plus a KServe-only model ``tensors`` and a tenant ``owner`` calling it."""
    raw: dict[str, object] = yaml.safe_load(DEFAULT.read_text())
    raw["models"] = {"tensors": {"traffic_classes": ["standard", "batch"], "deadline_ms": 500}}
    owner = {"api_key_sha256": ["0" * 64], "models": ["tensors"], **tenant}
    raw["tenants"]["owner"] = owner  # type: ignore[index]
    return raw


def test_a_kserve_only_model_and_a_tenant_without_routes_load() -> None:
    config = parse_config(_with_kserve_models(), DEFAULT.parent)
    assert config.models["tensors"].deadline_ms == 500
    assert config.models["tensors"].admission.enabled and config.models["tensors"].quota is None
    assert config.tenants["owner"].routes == [] and config.tenants["owner"].models == ["tensors"]
    assert config.tenants["demo"].models == []


def test_the_bundled_triton_loads_kserve_only_models_too() -> None:
    from inferline.route_check import route_models

    config = parse_config(_with_kserve_models(), DEFAULT.parent)
    assert route_models(config)[-1] == "tensors"
    assert set(route_models(config)) == {"driver_ranker", "driver_ranker_light", "tensors"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["tenants"]["owner"]["models"].append("ghost"), r"tenants\.owner\.models: unknown model 'ghost'"),
        (lambda r: r["tenants"]["demo"].update(models=["driver_ranker"]), r"tenants\.demo\.models: unknown model"),
        (lambda r: r["models"]["tensors"].update(quot=1), r"models\.tensors\.quot: Extra inputs"),
        (lambda r: r["models"]["tensors"].update(deadline_ms=0), r"models\.tensors\.deadline_ms"),
        (lambda r: r["models"]["tensors"].update(quota={"rate_per_s": 1}), r"models\.tensors\.quota\.burst"),
        (
            lambda r: r["models"]["tensors"].update(admission={"min_limit": 9, "initial_limit": 2}),
            r"models\.tensors\.admission: .*min_limit <= initial_limit",
        ),
        (
            lambda r: r["models"]["tensors"]["traffic_classes"].append("platinum"),
            r"models\.tensors: unknown traffic class 'platinum'",
        ),
        (
            lambda r: r["models"]["tensors"].update(default_traffic_class="critical"),
            r"models\.tensors: .*default_traffic_class 'critical' is not one of its traffic_classes",
        ),
        (
            lambda r: r["models"]["tensors"].update(traffic_classes=["batch"]),
            r"tenants\.owner\.models: model 'tensors' takes traffic classes \['batch'\], not the tenant's default "
            r"'standard': set models\.tensors\.default_traffic_class",
        ),
        (
            lambda r: r["tenants"]["owner"].update(traffic_classes=["critical"], default_traffic_class="critical"),
            r"tenants\.owner\.models: model 'tensors' takes traffic classes",
        ),
        (
            lambda r: (
                r["models"]["tensors"].update(default_traffic_class="batch")
                or r["tenants"]["owner"].update(traffic_classes=["standard"])
            ),
            r"tenants\.owner\.models: models\.tensors\.default_traffic_class 'batch' is not one of the tenant's",
        ),
        (
            lambda r: r["models"].update(driver_ranker={"max_in_flight": 8}),
            r"models\.driver_ranker\.max_in_flight: 8, but routes\.driver_ranking calls 'driver_ranker' "
            r"with max_in_flight 64 \(one in-flight bound per model\)",
        ),
    ],
    ids=[
        "tenant-names-unknown-model",
        "route-model-needs-no-entry",
        "unknown-key",
        "zero-deadline",
        "quota-without-burst",
        "admission-limits",
        "unknown-class",
        "default-class-not-taken",
        "tenant-default-not-taken",
        "tenant-has-no-class-of-the-model",
        "model-default-not-the-tenants",
        "in-flight-conflicts-with-route",
    ],
)
def test_a_bad_kserve_model_entry_is_named(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = _with_kserve_models()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, DEFAULT.parent)


def test_a_route_model_may_have_an_entry_of_its_own() -> None:
    raw = _with_kserve_models()
    raw["models"]["driver_ranker"] = {"max_in_flight": 64, "quota": {"rate_per_s": 5, "burst": 10}}  # type: ignore[index]
    raw["models"]["tensors"]["default_traffic_class"] = "batch"  # type: ignore[index]
    raw["tenants"]["owner"].update(traffic_classes=["batch"], default_traffic_class="batch")  # type: ignore[index]
    config = parse_config(raw, DEFAULT.parent)
    assert config.models["driver_ranker"].quota is not None
