"""Routes checked against what will serve them, before any traffic: Triton's models and the Feast registry.

A misconfigured route used to start SERVING and answer BASELINE forever (a width that does
not match logs nothing). ``check_routes`` compares every variant of every route with
Triton's model metadata and config — the model exists, the input and output names, their
datatypes (the router sends FP32 rows and reads one FP32 score per row), the input width
against the variant's feature list, ``max_batch_size`` against what the router sends in
one call — and every Feast reference (``view:feature``) with the feature registry.

Each problem is a ``Finding``: one line naming the route, the variant and the field, of
one of three severities. An ``error`` is a configuration error: ``inferline up`` refuses
to start (exit 2), or with ``validation.on_mismatch: not_serving`` starts with the route
NOT_SERVING, degraded. A model that exists but is not loaded (it failed to load, or
Triton is down) is ``unavailable``: its routes degrade and report NOT_SERVING until it
loads (fault isolation). A ``warning`` works for most calls (a route whose
``max_entities`` exceeds its model's ``max_batch_size`` fails only the largest requests).
``inferline models check`` runs the same check and prints every finding.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from inferline.core.config import InferlineConfig, RouteConfig, VariantConfig
from inferline.core.errors import InferlineError

logger = logging.getLogger(__name__)

Severity = Literal["error", "unavailable", "warning"]
ROUTER_DATATYPE = "FP32"
"""The router sends its feature rows as FP32 and reads the scores as FP32."""


@dataclass(frozen=True)
class Finding:
    """One problem of one route: ``routes.<route>.<where>.<field>: <message>``."""

    route: str
    where: str
    """The variant (``primary``, ``alternates[0]``, ``light``) or the feature (``features[2]``)."""
    field: str
    message: str
    severity: Severity = "error"
    model: str = ""
    """The variant's ``ref`` (model, or model:version) the finding is about; "" for a feature."""

    @property
    def blocking(self) -> bool:
        """A configuration error: start-up refuses it (or starts with the route NOT_SERVING)."""
        return self.severity == "error"

    def line(self) -> str:
        return f"routes.{self.route}.{self.where}.{self.field}: {self.message}"


@dataclass
class CheckReport:
    """Every finding of one check, and what it covered."""

    findings: list[Finding] = field(default_factory=list)
    variants: int = 0
    feature_refs: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    def routes_with_errors(self) -> dict[str, str]:
        """Route → its first error, one line."""
        routes: dict[str, str] = {}
        for finding in self.errors:
            routes.setdefault(finding.route, finding.line())
        return routes

    def blocked_models(self) -> dict[str, frozenset[str]]:
        """Route → the variant refs that failed the check (route selection must not call them)."""
        blocked: dict[str, set[str]] = {}
        for finding in self.errors:
            if finding.model:
                blocked.setdefault(finding.route, set()).add(finding.model)
        return {route: frozenset(models) for route, models in blocked.items()}


class ModelInfoSource(Protocol):
    """What the check asks Triton (``TritonExecutor`` answers it)."""

    async def repository_index(self) -> dict[str, tuple[str, str]]: ...

    async def model_metadata(self, name: str, version: str = "") -> Any: ...

    async def model_config(self, name: str, version: str = "") -> Any: ...


def route_models(config: InferlineConfig) -> list[str]:
    """Every model the routes name (primary, alternates, light) and the KServe-only ``models``
    entries, each once: what the bundled server loads."""
    return config.served_models


def _labelled(route: RouteConfig) -> list[tuple[str, VariantConfig]]:
    variants = [("primary", route.primary), *((f"alternates[{i}]", v) for i, v in enumerate(route.alternates))]
    return [*variants, *([("light", route.light)] if route.light is not None else [])]


def _shape(dims: Collection[int]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


class _VariantCheck:
    """The checks of one variant against one model's metadata and config."""

    def __init__(self, name: str, route: RouteConfig, where: str, variant: VariantConfig, coalesce_rows: int) -> None:
        self.name, self.route, self.where, self.variant = name, route, where, variant
        self.coalesce_rows = coalesce_rows
        self.findings: list[Finding] = []

    def add(self, field_name: str, message: str, severity: Severity = "error") -> None:
        self.findings.append(Finding(self.name, self.where, field_name, message, severity, self.variant.ref))

    def run(self, metadata: Any, config: Any) -> list[Finding]:
        model = self.variant.model
        inputs = {t.name: t for t in metadata.inputs}
        outputs = {t.name: t for t in metadata.outputs}
        tensor = inputs.get(self.variant.input_name)
        if tensor is None:
            names = ", ".join(inputs)
            self.add("input_name", f"model {model!r} has no input {self.variant.input_name!r} (inputs: {names})")
        else:
            self._input(tensor)
        out = outputs.get(self.variant.output_name)
        if out is None:
            names = ", ".join(outputs)
            self.add("output_name", f"model {model!r} has no output {self.variant.output_name!r} (outputs: {names})")
        else:
            self._output(out)
        self._batch(int(config.config.max_batch_size))
        return self.findings

    def _input(self, tensor: Any) -> None:
        model, width = self.variant.model, len(self.variant.features)
        if tensor.datatype != ROUTER_DATATYPE:
            self.add("input_name", f"model {model!r} input {tensor.name!r} is {tensor.datatype}; the router sends FP32")
        dims = list(tensor.shape)
        if len(dims) != 2:
            self.add(
                "input_name",
                f"model {model!r} input {tensor.name!r} has shape {_shape(dims)}; the router sends [rows, features]",
            )
        elif dims[1] not in (-1, width):
            names = ", ".join(self.variant.features)
            self.add(
                "features",
                f"{width} features ({names}), but model {model!r} input {tensor.name!r} takes {dims[1]} "
                f"(shape {_shape(dims)})",
            )

    def _output(self, tensor: Any) -> None:
        model, dims = self.variant.model, list(tensor.shape)
        if tensor.datatype != ROUTER_DATATYPE:
            self.add(
                "output_name", f"model {model!r} output {tensor.name!r} is {tensor.datatype}; the router reads FP32"
            )
        if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
            self.add(
                "output_name",
                f"model {model!r} output {tensor.name!r} has shape {_shape(dims)}; the router reads one score per row",
            )

    def _batch(self, max_batch_size: int) -> None:
        if max_batch_size <= 0:
            return
        model = self.variant.model
        if self.route.max_entities > max_batch_size:
            self.add(
                "max_batch_size",
                f"model {model!r} takes at most {max_batch_size} rows a call; the route accepts up to "
                f"{self.route.max_entities} entities (its max_entities): larger requests degrade",
                "warning",
            )
        if self.coalesce_rows > max_batch_size:
            self.add(
                "max_batch_size",
                f"model {model!r} takes at most {max_batch_size} rows a call; the router merges up to "
                f"{self.coalesce_rows} (triton.coalesce_max_batch_rows)",
            )


async def check_models(config: InferlineConfig, source: ModelInfoSource, report: CheckReport) -> None:
    """Check every variant of every route against Triton; findings go into ``report``."""
    try:
        index = await source.repository_index()
    except InferlineError as err:  # down now: its routes degrade until it is back (not a config error)
        for name in config.routes:
            message = f"not checked, Triton did not answer: {err}"
            report.findings.append(Finding(name, "primary", "model", message, "unavailable"))
        return
    cache: dict[tuple[str, str], tuple[Any, Any] | Finding] = {}
    for name, route in config.routes.items():
        for where, variant in _labelled(route):
            report.variants += 1
            info = await _model_info(name, where, variant, index, source, cache)
            if isinstance(info, Finding):
                report.findings.append(info)
                continue
            check = _VariantCheck(name, route, where, variant, config.triton.coalesce_max_batch_rows)
            report.findings += check.run(*info)


async def _model_info(
    name: str,
    where: str,
    variant: VariantConfig,
    index: Mapping[str, tuple[str, str]],
    source: ModelInfoSource,
    cache: dict[tuple[str, str], tuple[Any, Any] | Finding],
) -> tuple[Any, Any] | Finding:
    """(metadata, config) of the variant's model, or why there are none (cached per model and version)."""
    key = (variant.model, variant.version)
    if key not in cache:
        model = variant.model
        if model not in index:
            message = f"no model {model!r} in Triton's repository ({_known(model, index)})"
            cache[key] = Finding(name, where, "model", message)
        elif index[model][0] != "READY":
            state, reason = index[model]
            why = f"{state or 'not loaded'}{': ' + reason if reason else ''}"
            cache[key] = Finding(name, where, "model", f"model {model!r} is not loaded ({why})", "unavailable")
        else:
            try:
                metadata = await source.model_metadata(model, variant.version)
                cache[key] = (metadata, await source.model_config(model, variant.version))
            except InferlineError as err:
                if variant.version:
                    cache[key] = await _version_not_loaded(name, where, variant, source, err)
                else:
                    cache[key] = Finding(name, where, "model", str(err), "unavailable")
    info = cache[key]
    if isinstance(info, Finding):  # the same finding, for this route and variant
        return Finding(name, where, info.field, info.message, info.severity, variant.ref)
    return info


async def _version_not_loaded(
    name: str, where: str, variant: VariantConfig, source: ModelInfoSource, err: InferlineError
) -> Finding:
    """A pinned version Triton does not serve: not loaded yet (a canary of a version still to
    come: ``inferline models load``), so the variant waits out of route selection, not an error."""
    try:
        served = ", ".join(sorted((await source.model_metadata(variant.model)).versions, key=int)) or "none"
    except InferlineError:
        return Finding(name, where, "version", str(err))
    message = (
        f"version {variant.version} of model {variant.model!r} is not loaded (Triton serves versions: {served}); "
        f"the variant is left out of route selection until it is (inferline models load {variant.model})"
    )
    return Finding(name, where, "version", message, "unavailable")


def _known(name: str, names: Collection[str], what: str = "has") -> str:
    """A typo's likely meaning, else the names there are (the first ten)."""
    close = difflib.get_close_matches(name, list(names), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    listed = sorted(names)
    return f"{what}: {', '.join(listed[:10]) or 'none'}{', ...' if len(listed) > 10 else ''}"


def check_feature_refs(config: InferlineConfig, registry: Mapping[str, Collection[str]], report: CheckReport) -> None:
    """Check every Feast reference (``view:feature``) of every route against ``registry`` (view → features)."""
    for name, route in config.routes.items():
        for i, feature in enumerate(route.features):
            if feature.source is None:
                continue
            report.feature_refs += 1
            view, sep, column = feature.source.partition(":")
            where = f"features[{i}]"
            if not sep or not view or not column:
                message = f"{feature.source!r} is not a Feast reference 'view:feature'"
            elif view not in registry:
                message = f"unknown feature view {view!r} in the Feast registry ({_known(view, registry, 'views')})"
            elif column not in registry[view]:
                message = f"feature view {view!r} has no feature {column!r} (features: {', '.join(registry[view])})"
            else:
                continue
            report.findings.append(Finding(name, where, "source", message))


def feast_registry(repo_path: Any) -> dict[str, list[str]]:
    """Feature view → its features, from the Feast repository's registry."""
    import feast  # deferred: importing Feast takes seconds

    store = feast.FeatureStore(repo_path=str(repo_path))
    views: dict[str, list[str]] = {}
    for view in [*store.list_feature_views(), *store.list_on_demand_feature_views()]:
        views[view.name] = [f.name for f in view.features]
    return views


async def check_routes(
    config: InferlineConfig, source: ModelInfoSource, registry: Mapping[str, Collection[str]] | None
) -> CheckReport:
    """The whole check: Triton's models, then the Feast references (skipped when ``registry`` is None)."""
    report = CheckReport()
    await check_models(config, source, report)
    if registry is not None:
        check_feature_refs(config, registry, report)
    return report


async def run_check(config: InferlineConfig, triton_url: str, *, feast_registry_path: Any = None) -> CheckReport:
    """``check_routes`` against the Triton at ``triton_url`` (over ``triton.tls``) and, when
    ``feast_registry_path`` is given, that Feast repository's registry."""
    from inferline.triton.executor import TritonExecutor

    registry: dict[str, list[str]] | None = None
    if feast_registry_path is not None:
        try:
            registry = await asyncio.to_thread(feast_registry, feast_registry_path)
        except Exception as err:  # any Feast failure: the check of models still stands
            logger.warning("Feast registry of %s unreadable (%s): references not checked", feast_registry_path, err)
    executor = TritonExecutor(triton_url, tls=config.triton.tls)
    try:
        return await check_routes(config, executor, registry)
    finally:
        await executor.close()
