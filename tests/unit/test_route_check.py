"""route_check: each mismatch of a route with its model or the Feast registry is one line: route, variant, field."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml
from tritonclient.grpc import model_config_pb2, service_pb2

from inferline.core.config import InferlineConfig, parse_config
from inferline.core.errors import ModelNotFound
from inferline.route_check import CheckReport, check_feature_refs, check_routes

ROOT = pathlib.Path(__file__).resolve().parents[2]
REGISTRY = {"driver_hourly_stats": ["conv_rate", "acc_rate", "avg_daily_trips"]}


def tensor(name: str, shape: list[int], datatype: str = "FP32") -> service_pb2.ModelMetadataResponse.TensorMetadata:
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


class TritonModels:
    """Answers as Triton does, from messages built here: ``models`` name → (inputs, outputs, max_batch_size)."""

    def __init__(self, models: dict[str, tuple[list[Any], list[Any], int]], unloaded: dict[str, str]) -> None:
        self.models, self.unloaded = models, unloaded

    async def repository_index(self) -> dict[str, tuple[str, str]]:
        index = {name: ("READY", "") for name in self.models}
        return index | {name: ("UNAVAILABLE", reason) for name, reason in self.unloaded.items()}

    async def model_metadata(self, name: str, version: str = "") -> service_pb2.ModelMetadataResponse:
        if version not in ("", "1"):
            raise ModelNotFound(name, f"model {name!r} has no version {version!r}")
        inputs, outputs, _ = self.models[name]
        return service_pb2.ModelMetadataResponse(name=name, versions=["1"], inputs=inputs, outputs=outputs)

    async def model_config(self, name: str, version: str = "") -> service_pb2.ModelConfigResponse:
        config = model_config_pb2.ModelConfig(name=name, max_batch_size=self.models[name][2])
        return service_pb2.ModelConfigResponse(config=config)


RANKER = ([tensor("features", [-1, 4])], [tensor("score", [-1, 1])], 128)
LIGHT = ([tensor("features", [-1, 2])], [tensor("score", [-1, 1])], 128)


def config(**primary: Any) -> InferlineConfig:
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    raw["routes"]["driver_ranking"]["primary"].update(primary)
    return parse_config(raw, ROOT / "deploy/local")


async def lines(cfg: InferlineConfig, **models: tuple[list[Any], list[Any], int]) -> list[str]:
    source = TritonModels({"driver_ranker": RANKER, "driver_ranker_light": LIGHT, **models}, {"broken": "corrupt"})
    report = await check_routes(cfg, source, REGISTRY)
    return [f.line() for f in report.errors]


async def test_the_demo_config_matches_its_models() -> None:
    report = await check_routes(
        config(), TritonModels({"driver_ranker": RANKER, "driver_ranker_light": LIGHT}, {}), REGISTRY
    )
    assert report.findings == [] and report.variants == 2 and report.feature_refs == 3


@pytest.mark.parametrize(
    ("primary", "models", "expected"),
    [
        (
            {"features": ["conv_rate", "acc_rate", "avg_daily_trips"]},
            {},
            "routes.driver_ranking.primary.features: 3 features (conv_rate, acc_rate, avg_daily_trips), "
            "but model 'driver_ranker' input 'features' takes 4 (shape [-1, 4])",
        ),
        (
            {"input_name": "x"},
            {},
            "routes.driver_ranking.primary.input_name: model 'driver_ranker' has no input 'x' (inputs: features)",
        ),
        (
            {"output_name": "prob"},
            {},
            "routes.driver_ranking.primary.output_name: model 'driver_ranker' has no output 'prob' (outputs: score)",
        ),
        (
            {"model": "rankr"},
            {},
            "routes.driver_ranking.primary.model: no model 'rankr' in Triton's repository "
            "(has: broken, driver_ranker, driver_ranker_light)",
        ),
        (
            {"model": "ints"},
            {"ints": ([tensor("features", [-1, 4], "INT64")], [tensor("score", [-1, 1])], 128)},
            "routes.driver_ranking.primary.input_name: model 'ints' input 'features' is INT64; the router sends FP32",
        ),
        (
            {"model": "many"},
            {"many": ([tensor("features", [-1, 4])], [tensor("score", [-1, 3])], 128)},
            "routes.driver_ranking.primary.output_name: model 'many' output 'score' has shape [-1, 3]; "
            "the router reads one score per row",
        ),
        (
            {"model": "small"},
            {"small": ([tensor("features", [-1, 4])], [tensor("score", [-1, 1])], 32)},
            "routes.driver_ranking.primary.max_batch_size: model 'small' takes at most 32 rows a call; "
            "the router merges up to 128 (triton.coalesce_max_batch_rows)",
        ),
        (
            {"model": "driver_rankr"},
            {},
            "routes.driver_ranking.primary.model: no model 'driver_rankr' in Triton's repository "
            "(did you mean 'driver_ranker'?)",
        ),
    ],
)
async def test_a_mismatch_is_one_line_naming_route_variant_and_field(
    primary: dict[str, Any], models: dict[str, Any], expected: str
) -> None:
    assert await lines(config(**primary), **models) == [expected]


async def test_more_entities_than_the_max_batch_size_is_a_warning() -> None:
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    raw["triton"]["coalesce_max_batch_rows"] = 32
    small = ([tensor("features", [-1, 4])], [tensor("score", [-1, 1])], 32)
    report = await check_routes(
        parse_config(raw, ROOT / "deploy/local"),
        TritonModels({"driver_ranker": small, "driver_ranker_light": LIGHT}, {}),
        REGISTRY,
    )
    assert report.errors == []
    assert [(f.severity, f.field) for f in report.findings] == [("warning", "max_batch_size")]


async def test_a_model_that_failed_to_load_degrades_its_route_without_refusing() -> None:
    source = TritonModels({"driver_ranker_light": LIGHT}, {"driver_ranker": "weights are corrupt"})
    report = await check_routes(config(), source, REGISTRY)
    assert report.errors == []
    [finding] = report.findings
    assert finding.line() == (
        "routes.driver_ranking.primary.model: model 'driver_ranker' is not loaded (UNAVAILABLE: weights are corrupt)"
    )


async def test_a_pinned_version_not_loaded_leaves_its_variant_out_without_refusing() -> None:
    """A version still to come (a canary declared before ``inferline models load``) is like a
    model not loaded: the variant waits out of route selection, the route's others serve."""
    report = await check_routes(
        config(version="7"), TritonModels({"driver_ranker": RANKER, "driver_ranker_light": LIGHT}, {}), REGISTRY
    )
    assert report.errors == []
    [finding] = report.findings
    assert (finding.severity, finding.model) == ("unavailable", "driver_ranker:7")
    assert finding.line() == (
        "routes.driver_ranking.primary.version: version 7 of model 'driver_ranker' is not loaded (Triton serves "
        "versions: 1); the variant is left out of route selection until it is (inferline models load driver_ranker)"
    )


def test_feast_references_are_checked_against_the_registry() -> None:
    raw = yaml.safe_load((ROOT / "deploy/local/inferline.yaml").read_text())
    features = raw["routes"]["driver_ranking"]["features"]
    features[0]["source"] = "driver_stats:conv_rate"
    features[1]["source"] = "driver_hourly_stats:accept_rate"
    features[2]["source"] = "avg_daily_trips"
    report = CheckReport()
    check_feature_refs(parse_config(raw, ROOT / "deploy/local"), REGISTRY, report)
    assert [f.line() for f in report.findings] == [
        "routes.driver_ranking.features[0].source: unknown feature view 'driver_stats' in the Feast registry "
        "(did you mean 'driver_hourly_stats'?)",
        "routes.driver_ranking.features[1].source: feature view 'driver_hourly_stats' has no feature 'accept_rate' "
        "(features: conv_rate, acc_rate, avg_daily_trips)",
        "routes.driver_ranking.features[2].source: 'avg_daily_trips' is not a Feast reference 'view:feature'",
    ]


async def test_blocked_models_and_disabled_routes_come_from_errors_only() -> None:
    report = await check_routes(
        config(output_name="prob"), TritonModels({"driver_ranker_light": LIGHT, "driver_ranker": RANKER}, {}), REGISTRY
    )
    assert report.blocked_models() == {"driver_ranking": frozenset({"driver_ranker"})}
    assert list(report.routes_with_errors()) == ["driver_ranking"]
