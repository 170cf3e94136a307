"""Stream options, events and the lag switch: validation errors name the option or field at fault."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from inferline.core.config import BudgetsConfig, ConfigError, RouteConfig, parse_config
from inferline.core.served_by import Reason, ServedBy
from inferline.stream import StreamInputError, StreamSpec
from inferline.stream.events import Event, InvalidEvent, Outcome, output_fields, parse_event
from inferline.stream.mode import LagSwitch

ROUTE = RouteConfig.model_validate(
    {
        "entity": {"join_key": "driver_id"},
        "features": [
            {"name": "conv_rate", "source": "v:conv_rate", "default": 0.5},
            {"name": "trip_distance_km", "default": 6.0},
        ],
        "primary": {"model": "m", "features": ["conv_rate", "trip_distance_km"]},
    }
)


def build(**options: object) -> StreamSpec:
    base = {"route": "r", "source": "redis://127.0.0.1:7000/in", "group": "g", "sink": "redis://127.0.0.1:7000/out"}
    return StreamSpec.build(**{**base, **options})


def test_urls_name_server_and_stream() -> None:
    spec = build()
    assert (spec.source.host, spec.source.port, spec.source.stream) == ("127.0.0.1", 7000, "in")
    assert spec.dead_letter_stream == "in:dead"
    assert spec.traffic_class == "standard"


def test_nats_urls_name_the_jetstream_engine() -> None:
    spec = build(source="nats://127.0.0.1/events", sink="nats://127.0.0.1:4333/scores")
    assert (spec.source.scheme, spec.source.port, spec.sink.port, spec.sink.stream) == ("nats", 4222, 4333, "scores")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "http://h:1/in"}, "--source: "),
        ({"sink": "redis://h:1/"}, "--sink: "),
        ({"max_in_flight": 0}, "--max-in-flight: "),
        ({"lag_high": 10, "lag_low": 10}, "--lag-low (10) must be below --lag-high (10)"),
        ({"surprise": 1}, "--surprise: "),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(StreamInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(**options)


def test_event_fields_become_key_request_features_and_time() -> None:
    event = parse_event("1700000000123-4", {"driver_id": "1001", "trip_distance_km": "3.5", "extra": "x"}, ROUTE)
    assert event == Event("1700000000123-4", 1001, {"trip_distance_km": 3.5}, 1700000000123)
    given = parse_event("5-0", {"driver_id": "7", "event_time_ms": "42"}, ROUTE)
    assert (given.time_ms, given.request_features) == (42, {})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "driver_id"),
        ({"driver_id": "abc"}, "driver_id"),
        ({"driver_id": "1", "trip_distance_km": "far"}, "trip_distance_km"),
        ({"driver_id": "1", "trip_distance_km": "nan"}, "trip_distance_km"),
        ({"driver_id": "1", "event_time_ms": "yesterday"}, "event_time_ms"),
    ],
)
def test_poison_events_name_the_field(fields: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidEvent, match=field):
        parse_event("1-0", fields, ROUTE)


def test_output_names_source_event_server_and_time() -> None:
    event = Event("9-0", 1001, {}, 9)
    out = output_fields(
        event, Outcome(0.75, ServedBy.LIGHT, Reason.OVERLOAD, "m_light", ""), ROUTE,
        worker="w1", computed_at_ms=12, mode="light",
    )  # fmt: skip
    assert out["event_id"] == "9-0" and out["driver_id"] == "1001"
    assert (out["served_by"], out["reason"], out["model"], out["worker"], out["computed_at_ms"]) == (
        "LIGHT", "OVERLOAD", "m_light", "w1", "12"
    )  # fmt: skip
    assert out["decision"] == "accept" and out["mode"] == "light"


def test_lag_switch_has_hysteresis() -> None:
    switch = LagSwitch(high=100, low=10)
    readings = [50, 101, 60, 10, 9, 50, 100, 101]
    assert [switch.update(lag) for lag in readings] == [False, True, True, True, False, False, False, True]


def test_stream_budget_comes_from_the_route_unless_the_option_gives_one() -> None:
    route = ROUTE.model_copy(update={"budgets": BudgetsConfig(stream_ms=1234.0)})
    assert build().budget_for(route) == 1234.0
    assert build(budget_ms=50).budget_for(route) == 50.0
    assert build().budget_for(ROUTE) == 5_000.0  # the setting's default


@pytest.mark.parametrize("value", [0, -5, "soon"])
def test_bad_stream_budget_in_the_config_names_its_key(tmp_path: pathlib.Path, value: object) -> None:
    raw = yaml.safe_load(pathlib.Path("deploy/local/inferline.yaml").read_text())
    raw["routes"]["driver_ranking"].setdefault("budgets", {})["stream_ms"] = value
    with pytest.raises(ConfigError, match=r"routes\.driver_ranking\.budgets\.stream_ms"):
        parse_config(raw, tmp_path)
