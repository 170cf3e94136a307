"""The ``inferline`` command line: up, serve, triton (and triton class-copies), models check and load, gateway render,
predict, bench, batch run, stream run."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from inferline.core.config import ConfigError, InferlineConfig, load_config
from inferline.core.logging import configure_logging

if TYPE_CHECKING:  # the app module imports Feast and friends: keep `inferline predict` fast
    from inferline.app import Role

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("deploy/local/inferline.yaml")
DEMO_API_KEY = "inferline-demo-key"
SERVICES: tuple[Role, ...] = ("router", "features", "postprocess", "degradation")

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Deadline-aware serving runtime in front of Triton.")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file")]


def _load(path: Path, **overrides: Any) -> InferlineConfig:
    try:
        config = load_config(path)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    server = config.server.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return config.model_copy(update={"server": server})


def _check_tls(
    config: InferlineConfig, *, router: bool, triton_client: bool, bundled_triton: bool, grpc_server: bool = True
) -> None:
    """Read every TLS file the process will use before anything starts: a bad one exits 2, naming its key."""
    from inferline.core.tls import check_files

    try:
        check_files(
            config,
            router=router,
            triton_client=triton_client,
            bundled_triton=bundled_triton,
            grpc_server=grpc_server,
        )
    except ConfigError as err:
        typer.echo(f"invalid TLS configuration: {err}", err=True)
        raise typer.Exit(2) from err


def _run(coro: Any) -> Any:
    """Run ``coro``; a ``ConfigError`` found while starting (a missing secret, say) is one line and
    exit 2, a bundled Triton that would not start is one line and its log and exit 1."""
    import uvloop

    from inferline.triton.launcher import TritonStartError

    try:
        return uvloop.run(coro)
    except ConfigError as err:
        typer.echo(f"cannot start: {err}", err=True)
        raise typer.Exit(2) from err
    except TritonStartError as err:
        typer.echo(f"the bundled Triton did not start: {str(err).splitlines()[0]}", err=True)
        if err.log_tail:
            typer.echo(f"--- the end of its log ---\n{err.log_tail}", err=True)
        raise typer.Exit(1) from err


@cli.command()
def up(
    config: ConfigOption = DEFAULT_CONFIG,
    port: Annotated[
        int | None, typer.Option(help="public gRPC port (the gateway's, or the router's with --no-gateway)")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: off)")] = None,
    triton_url: Annotated[str | None, typer.Option(help="use this running Triton (host:port)")] = None,
    gateway: Annotated[
        bool | None,
        typer.Option(
            "--gateway/--no-gateway",
            help="Envoy in front on the public port (default: gateway.embedded); --no-gateway if you bring your own",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="router processes behind the gateway (one per core uses every core)")
    ] = 1,
) -> None:
    """Run the embedded stack: the Envoy gateway, bundled Triton and every service in one process."""
    from inferline.runtime import serve_process

    cfg = _load(config, port=port, metrics_port=metrics_port)
    url = triton_url or cfg.triton.url
    _check_tls(cfg, router=True, triton_client=True, bundled_triton=url is None)
    in_front = cfg.gateway.embedded if gateway is None else gateway
    if workers > 1 and not in_front:
        typer.echo("--workers needs the gateway in front to balance calls over them (drop --no-gateway)", err=True)
        raise typer.Exit(2)
    process = serve_process(
        cfg, set(SERVICES), url, start_triton=True, gateway=in_front, workers=workers, config_path=config.resolve()
    )
    raise typer.Exit(_run(process))


@cli.command()
def serve(
    service: Annotated[str, typer.Argument(help="router | features | postprocess | degradation")],
    config: ConfigOption = DEFAULT_CONFIG,
    port: Annotated[int | None, typer.Option(help="gRPC port")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: off)")] = None,
    triton_url: Annotated[str | None, typer.Option(help="Triton gRPC host:port (router)")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="router processes (one per core uses every core); more than one puts the embedded gateway "
            "on the port to balance calls over them",
        ),
    ] = 1,
) -> None:
    """Run one service in its own process (the suite topology)."""
    from inferline.runtime import serve_process

    if service not in SERVICES:
        typer.echo(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    if workers > 1 and service != "router":
        typer.echo(f"--workers is for the router; {service} runs as one process", err=True)
        raise typer.Exit(2)
    cfg = _load(config, port=port, metrics_port=metrics_port)
    url = triton_url or cfg.triton.url
    if service == "router" and not url:
        typer.echo("serve router needs --triton-url or triton.url in the config", err=True)
        raise typer.Exit(2)
    uses_triton = service in ("router", "degradation") and url is not None
    _check_tls(cfg, router=service == "router", triton_client=uses_triton, bundled_triton=False)
    # One router process per core behind Envoy: a gRPC load balancer in front of one port
    # would balance connections, and a gateway holds few, long-lived ones; Envoy balances calls.
    process = serve_process(
        cfg, {service}, url, start_triton=False, gateway=workers > 1, workers=workers, config_path=config.resolve()
    )
    raise typer.Exit(_run(process))


triton_cli = typer.Typer()
cli.add_typer(triton_cli, name="triton")


@triton_cli.callback(invoke_without_command=True)
def triton(
    ctx: typer.Context,
    config: ConfigOption = DEFAULT_CONFIG,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default 8001)")] = 8001,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = 8000,
    metrics_port: Annotated[int | None, typer.Option(help="metrics port (default 8002)")] = 8002,
    model_repository: Annotated[Path | None, typer.Option(help="model repository")] = None,
) -> None:
    """Start the bundled Triton server on the model repository; stop on SIGINT/SIGTERM.

    The class-copies subcommand writes per-class model copies instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from inferline.triton.launcher import run_triton_forever

    cfg = _load(config)
    update: dict[str, Any] = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
    if model_repository is not None:
        update["model_repository"] = model_repository.resolve()
    _check_tls(cfg, router=False, triton_client=False, bundled_triton=True, grpc_server=False)
    raise typer.Exit(run_triton_forever(cfg.triton.model_copy(update=update)))


@triton_cli.command("autoscale")
def triton_autoscale(
    triton_url: Annotated[str, typer.Option(help="Triton gRPC host:port (explicit model control)")],
    model: Annotated[list[str], typer.Option(help="NAME=MIN:MAX instances, repeatable; MIN is the warm pool")],
    interval_s: Annotated[float, typer.Option(help="seconds between samples")] = 1.0,
    scale_up_queue_ms: Annotated[float, typer.Option(help="add instances above this mean queue time")] = 5.0,
    scale_up_after_s: Annotated[float, typer.Option(help="the queue above it this long first (0: at once)")] = 0.0,
    scale_down_queue_ms: Annotated[float, typer.Option(help="quiet below this mean queue time")] = 1.0,
    scale_down_after_s: Annotated[float, typer.Option(help="quiet this long before removing one")] = 60.0,
    up_cooldown_s: Annotated[float, typer.Option(help="no new change this soon after one")] = 5.0,
    down_cooldown_s: Annotated[float, typer.Option(help="no removal this soon after a change")] = 60.0,
) -> None:
    """Change models' instance counts with their queue time (Triton model control); stop on SIGINT/SIGTERM."""
    import asyncio

    from inferline.triton.autoscaler import AutoscalerConfig, parse_model_bounds, run_until_stopped

    try:
        config = AutoscalerConfig(
            models=dict(parse_model_bounds(spec) for spec in model),
            interval_s=interval_s,
            scale_up_queue_ms=scale_up_queue_ms,
            scale_up_after_s=scale_up_after_s,
            scale_down_queue_ms=scale_down_queue_ms,
            scale_down_after_s=scale_down_after_s,
            up_cooldown_s=up_cooldown_s,
            down_cooldown_s=down_cooldown_s,
        )
    except ValueError as err:  # pydantic's ValidationError too
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    configure_logging(os.environ.get("INFERLINE_LOG_LEVEL", "INFO"))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_until_stopped(config, triton_url, stop)

    _run(main())  # a Triton that refuses model control: one line, exit 2


@triton_cli.command("class-copies")
def class_copies(
    repository: Annotated[Path, typer.Option(exists=True, file_okay=False, help="model repository holding the models")],
    config: ConfigOption = DEFAULT_CONFIG,
    out: Annotated[Path | None, typer.Option(help="write the copies here (default: into the repository)")] = None,
) -> None:
    """Write the per-class model copies of triton.class_copies, for a Triton run elsewhere."""
    from inferline.triton.class_copies import write_class_copies

    copies_config = _load(config).triton.class_copies
    if not copies_config.models or not copies_config.classes:
        typer.echo(f"{config}: triton.class_copies configures no copies; nothing written", err=True)
        return
    missing = [m for m in copies_config.models if not (repository / m / "config.pbtxt").is_file()]
    if missing:
        typer.echo(f"{repository}: no model {', '.join(missing)} (triton.class_copies.models)", err=True)
        raise typer.Exit(1)
    target = out or repository
    try:
        names = write_class_copies(repository, target, copies_config)
    except (ValueError, OSError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from err
    for name in names:
        typer.echo(str(target / name))


models_cli = typer.Typer(
    no_args_is_help=True, help="For model owners: check routes against their models, load new versions."
)
cli.add_typer(models_cli, name="models")


@models_cli.command("check")
def models_check(
    config: ConfigOption = DEFAULT_CONFIG,
    triton_url: Annotated[str | None, typer.Option(help="check against this running Triton (host:port)")] = None,
) -> None:
    """Check every route against Triton's models and the Feast registry, as start-up does.

    Input and output names, datatypes, input width against the route's features, max batch
    size, Feast references. Without a Triton URL (--triton-url or triton.url) the bundled
    server is started on triton.model_repository with the routes' models. One line per
    problem, naming the route, the variant and the field; exit 1 if there is any.
    """
    cfg = _load(config)
    url = triton_url or cfg.triton.url
    _check_tls(cfg, router=False, triton_client=True, bundled_triton=url is None, grpc_server=False)
    raise typer.Exit(_run(_models_check(cfg, url)))


async def _models_check(config: InferlineConfig, url: str | None) -> int:
    import asyncio

    from inferline.route_check import route_models, run_check
    from inferline.triton.launcher import TritonLauncher, TritonStartError

    launcher = None
    problems: list[str] = []
    try:
        if url is None:
            launcher = TritonLauncher(config.triton, models=route_models(config))
            try:
                await asyncio.to_thread(launcher.start)
            except TritonStartError as err:
                typer.echo(f"the bundled Triton did not start: {str(err).splitlines()[0]}", err=True)
                return 1
            url = launcher.grpc_url
            problems += [f"model {name}: {reason}" for name, reason in launcher.failed.items()]
        report = await run_check(config, url, feast_registry_path=config.feature_store.feast_repo)
    finally:
        if launcher is not None:
            await asyncio.to_thread(launcher.stop)
    problems += [finding.line() for finding in report.findings if finding.severity != "warning"]
    for line in problems:
        typer.echo(line)
    warnings = [finding.line() for finding in report.findings if finding.severity == "warning"]
    for line in warnings:
        typer.echo(f"warning: {line}")
    summary = f"{len(config.routes)} routes, {report.variants} variants, {report.feature_refs} feature references"
    count = f"{len(problems) or 'no'} problem{'' if len(problems) == 1 else 's'}"
    typer.echo(f"{summary}: {count}{f', {len(warnings)} warnings' if warnings else ''}", err=True)
    return 1 if problems else 0


@models_cli.command("load")
def models_load(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="model directories to load (again)")],
    config: ConfigOption = DEFAULT_CONFIG,
    triton_url: Annotated[
        str | None, typer.Option(help="a Triton of your own in explicit model-control mode (host:port)")
    ] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", help="seconds to wait for each load")] = 120.0,
) -> None:
    """Load models again, with the versions their directories have now: no restart.

    Add N+1/ to a model directory, then run this: Triton loads the versions its
    version_policy selects, runs the config's model_warmup, and moves calls without a
    version over only once they are ready; dropped versions unload after their calls in
    flight. Without --triton-url (and triton.url) it loads on the bundled Triton that
    inferline up runs on triton.model_repository. One line per model (versions, how long
    the switch took); exit 2 for a bad model directory, 1 when a load fails.
    """
    cfg = _load(config)
    url = triton_url or cfg.triton.url
    _check_tls(cfg, router=False, triton_client=True, bundled_triton=False, grpc_server=False)
    raise typer.Exit(_models_load(cfg, names, url, timeout_s))


def _models_load(config: InferlineConfig, names: list[str], url: str | None, timeout_s: float) -> int:
    from inferline.triton.class_copies import ClassModelMap
    from inferline.triton.model_repository import ModelDirectory
    from inferline.triton.versions import (
        LoadError,
        find_bundled,
        inspect_for_load,
        load,
        refresh_derived,
        triton_client,
        warnings,
    )

    repository = config.triton.model_repository
    try:
        # A Triton of your own may serve a repository this machine does not have: its
        # directories are checked here when they are here, else Triton's answer says.
        models: dict[str, ModelDirectory | None] = {
            name: inspect_for_load(repository, name) if url is None or (repository / name).is_dir() else None
            for name in dict.fromkeys(names)
        }
        bundled = find_bundled(repository) if url is None else None
        if url is None and bundled is None:
            raise LoadError(
                f"no bundled Triton is running on {repository} (start it with inferline up), "
                "or pass --triton-url HOST:PORT of a Triton in explicit model-control mode"
            )
        tls = config.triton.tls if url is not None or (bundled is not None and bundled.tls) else None
        target = url or (bundled.grpc_url if bundled is not None else "")
        class_map = ClassModelMap(config.triton.class_copies)
        client = triton_client(target, tls)
        try:
            for name, model in models.items():
                if bundled is not None and bundled.derived and model is not None:
                    copies = refresh_derived(bundled.repository, model, config.triton.class_copies)[1:]
                else:
                    copies = [copy for copy, base in class_map.bases.items() if base == name]
                report = load(client, name, copies, timeout_s)
                typer.echo(report.line())
                for line in warnings(config, model, report):
                    typer.echo(f"warning: {line}", err=True)
        finally:
            client.close()
    except LoadError as err:
        typer.echo(str(err), err=True)
        return err.exit_code
    except OSError as err:  # the derived repository of the bundled Triton could not be written
        typer.echo(f"cannot update the bundled Triton's repository: {err}", err=True)
        return 1
    return 0


@cli.command(
    "perf-analyzer",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def perf_analyzer(ctx: typer.Context) -> None:
    """Run NVIDIA's perf_analyzer with every argument as given (it needs libraries make setup installs).

    E.g. through the front door: inferline perf-analyzer -m driver_ranker -u 127.0.0.1:50051 -i grpc
    -H "authorization:Bearer KEY" (no space after the colon: perf_analyzer would send it);
    or against Triton itself with -u TRITON_HOST:PORT.
    """
    from inferline.triton.perf_analyzer import perf_analyzer_command

    try:
        command, env = perf_analyzer_command(ctx.args)
    except FileNotFoundError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    os.execve(command[0], command, env)


gateway_cli = typer.Typer(no_args_is_help=True, help="The Envoy ingress in front of the routers.")
cli.add_typer(gateway_cli, name="gateway")


@gateway_cli.command("render")
def gateway_render(
    config: ConfigOption = DEFAULT_CONFIG,
    out: Annotated[Path | None, typer.Option(help="write the YAML here (default: stdout)")] = None,
    port: Annotated[int | None, typer.Option(help="listener port (default gateway.port)")] = None,
    admin_port: Annotated[int | None, typer.Option(help="admin port (default gateway.admin_port)")] = None,
    router: Annotated[
        list[str] | None, typer.Option(help="router host:port, repeatable (default gateway.routers)")
    ] = None,
    protected_router: Annotated[
        list[str] | None,
        typer.Option(help="host:port of a protected lane's router, repeatable (default gateway.protected_routers)"),
    ] = None,
) -> None:
    """Render the Envoy bootstrap (envoy -c FILE) that sheds gateway.shed classes before the router."""
    import yaml

    from inferline.gateway import render_envoy

    try:
        rendered = render_envoy(
            _load(config), port=port, admin_port=admin_port, routers=router or None,
            protected_routers=protected_router or None,
        )  # fmt: skip
    except ValueError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    text = yaml.safe_dump(rendered, sort_keys=False)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


def _entity(spec: str) -> Any:
    from inferline.v1 import inference_pb2 as pb

    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise typer.BadParameter(f"--entity must look like driver_id=1001, got {spec!r}")
    try:
        return pb.EntityKey(name=name, int64_value=int(value))
    except ValueError:
        return pb.EntityKey(name=name, string_value=value)


@cli.command()
def predict(
    route: Annotated[str, typer.Option(help="route name")],
    entity: Annotated[list[str], typer.Option(help="join_key=value, repeatable")],
    target: Annotated[str, typer.Option(help="router host:port")] = "127.0.0.1:50051",
    deadline_ms: Annotated[float, typer.Option(help="gRPC deadline in ms")] = 100.0,
    traffic_class: Annotated[str, typer.Option("--class", help="traffic class")] = "",
    api_key: Annotated[str | None, typer.Option(help="API key (default: the demo key)")] = None,
    feature: Annotated[list[str] | None, typer.Option(help="request-time feature name=value")] = None,
    top_k: Annotated[int, typer.Option(help="keep the best k (0: route default)")] = 0,
    ca_file: Annotated[Path | None, typer.Option(help="TLS: the CA the router's certificate is signed by")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="TLS: client certificate (mutual TLS)")] = None,
    key_file: Annotated[Path | None, typer.Option(help="TLS: the client certificate's key")] = None,
    server_name: Annotated[str | None, typer.Option(help="TLS: name the router's certificate carries")] = None,
) -> None:
    """Send one Predict request and print the response as JSON (non-zero exit on an error status).

    Over TLS when --ca-file is given (docs/tls.md), plain text otherwise.
    """
    import grpc
    from google.protobuf import json_format
    from pydantic import ValidationError

    from inferline.core.config import TlsClientConfig, format_validation_error
    from inferline.core.headers import TRAFFIC_CLASS
    from inferline.core.tls import channel
    from inferline.v1 import inference_pb2 as pb
    from inferline.v1 import inference_pb2_grpc as pb_grpc

    request_features = {}
    for spec in feature or []:
        name, _, value = spec.partition("=")
        request_features[name] = float(value)
    request = pb.PredictRequest(
        route=route,
        entities=[_entity(e) for e in entity],
        traffic_class=traffic_class,
        request_features=request_features,
        top_k=top_k,
    )
    key = api_key or os.environ.get("INFERLINE_API_KEY") or DEMO_API_KEY
    tls = None
    if ca_file is not None:
        try:
            tls = TlsClientConfig(ca_file=ca_file, cert_file=cert_file, key_file=key_file, server_name=server_name)
        except ValidationError as err:
            typer.echo(f"TLS options:\n{format_validation_error(err)}", err=True)
            raise typer.Exit(2) from err
    try:
        opened = channel(target, tls, "tls")
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    with opened:
        try:
            # The gateway sheds and limits by the class header: send it with the class.
            class_header = ((TRAFFIC_CLASS, traffic_class),) if traffic_class else ()
            metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {key}"), *class_header)
            response = pb_grpc.InferenceStub(opened).Predict(request, timeout=deadline_ms / 1000, metadata=metadata)
        except grpc.RpcError as err:
            typer.echo(json.dumps({"code": err.code().name, "message": err.details()}), err=True)
            raise typer.Exit(1) from err
    typer.echo(json_format.MessageToJson(response, preserving_proto_field_name=True))


@cli.command()
def bench(
    target: Annotated[list[str], typer.Option(help="KIND=HOST:PORT, repeatable; KIND: predict | kserve | triton")],
    mode: Annotated[str, typer.Option(help="fixed (one rate) | sweep (find the knee)")] = "fixed",
    rate: Annotated[float, typer.Option(help="fixed: requests per second")] = 200.0,
    start: Annotated[float, typer.Option(help="sweep: first rate")] = 100.0,
    factor: Annotated[float, typer.Option(help="sweep: rate multiplier per step")] = 1.25,
    max_rate: Annotated[float, typer.Option(help="sweep: highest rate tried")] = 5000.0,
    duration: Annotated[float, typer.Option(help="measured seconds per run")] = 10.0,
    warmup: Annotated[float, typer.Option(help="unmeasured seconds before each run")] = 2.0,
    deadline_ms: Annotated[float, typer.Option(help="deadline of every request")] = 100.0,
    mix: Annotated[str, typer.Option(help="class=share,...")] = "critical=0.3,standard=0.35,batch=0.35",
    tenant_key: Annotated[list[str] | None, typer.Option(help="API key, repeatable (round robin)")] = None,
    generators: Annotated[int, typer.Option(help="generator processes (0: one per 1500 req/s)")] = 0,
    connections: Annotated[
        int, typer.Option(help="connections each generator spreads its calls over (many callers: many)")
    ] = 1,
    route: Annotated[str, typer.Option(help="Predict route")] = "driver_ranking",
    model: Annotated[str, typer.Option(help="KServe v2 model")] = "driver_ranker",
    seed: Annotated[int, typer.Option(help="seed of arrivals and classes")] = 1,
    entities: Annotated[str, typer.Option(help="Predict entity ids: zipf | uniform over --entity-ids")] = "zipf",
    zipf_s: Annotated[float, typer.Option(help="Zipf exponent of --entities zipf")] = 1.1,
    entity_ids: Annotated[str, typer.Option(help="LOW-HIGH: Predict entity ids (default: the demo's drivers)")] = "",
    metrics: Annotated[
        str, typer.Option(help="the router's metrics HOST:PORT: hot-cache hit rate and Feast reads/s per run")
    ] = "",
    out: Annotated[Path | None, typer.Option(help="writes OUT.json and OUT.html")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Open-loop load (Poisson arrivals, mixed classes, deadlines) against Predict and KServe v2 targets."""
    import time

    from inferline.bench.mix import DEFAULT_PRIORITIES, TrafficMix
    from inferline.bench.multiproc import Generators
    from inferline.bench.recording import make_targets
    from inferline.bench.report import knee_text, write_report
    from inferline.bench.runner import BenchSettings, run_bench, step_line
    from inferline.bench.targets import DEMO_ENTITY_IDS

    priorities = dict(DEFAULT_PRIORITIES)
    if config.is_file():  # Triton priority of each class, as the router would send it
        priorities = {name: c.priority for name, c in _load(config).traffic_classes.items()}
    keys = tuple(tenant_key or (os.environ.get("INFERLINE_API_KEY") or DEMO_API_KEY,))
    try:
        low, _, high = entity_ids.partition("-")
        ids = (int(low), int(high)) if entity_ids else DEMO_ENTITY_IDS
        specs = make_targets(
            target, route=route, model=model, api_keys=keys, priorities=priorities,
            entity_ids=ids, entities=entities, zipf_s=zipf_s, metrics=metrics, connections=connections,
        )  # fmt: skip
        settings = BenchSettings(
            targets=specs, mix=TrafficMix.parse(mix), mode=mode, rate=rate, start_rate=start, factor=factor,
            max_rate=max_rate, duration_s=duration, warmup_s=warmup, deadline_s=deadline_ms / 1000.0,
            generators=generators, seed=seed,
        )  # fmt: skip
        settings.rates()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    out = out or Path(f"benchmarks/results/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    with Generators(settings.generator_count()) as gens:
        try:
            result = _run(run_bench(settings, gens, lambda t, s: typer.echo(step_line(t, s))))
        except RuntimeError as err:
            typer.echo(f"bench failed: {err}", err=True)
            raise typer.Exit(1) from err
    for entry in result["targets"]:
        if entry["knee"]:
            typer.echo(f"{entry['name']}: knee {knee_text(entry)} ({entry['knee']['stopped_reason']})")
    json_path, html_path = write_report(result, out)
    typer.echo(f"results: {json_path}\nreport:  {html_path}")


batch_cli = typer.Typer(no_args_is_help=True, help="Batch inference: score a file of entities through a route.")
cli.add_typer(batch_cli, name="batch")


@batch_cli.command("run")
def batch_run(
    route: Annotated[str, typer.Option(help="route whose features, models and post-processing score the rows")],
    input_path: Annotated[Path, typer.Option("--input", help="Parquet (.parquet, .pq) or CSV (.csv) file")],
    output_dir: Annotated[Path, typer.Option("--output", help="directory of part files, errors and job state")],
    config: ConfigOption = DEFAULT_CONFIG,
    shard: Annotated[str, typer.Option(help="I/N: this process does chunks with number % N == I")] = "0/1",
    resume: Annotated[bool, typer.Option(help="continue the job whose state is in --output")] = False,
    triton_url: Annotated[str | None, typer.Option(help="Triton host:port (default triton.url, else bundled)")] = None,
    traffic_class: Annotated[str, typer.Option("--class", help="traffic class of the Triton calls")] = "batch",
    features: Annotated[str, typer.Option(help="auto | online | offline (point in time)")] = "auto",
    timestamp_column: Annotated[str | None, typer.Option(help="event time column (default event_timestamp)")] = None,
    chunk_rows: Annotated[int, typer.Option(help="rows per chunk and part file")] = 8192,
    request_rows: Annotated[int, typer.Option(help="rows per Triton request (0: max_batch_size)")] = 0,
    concurrency: Annotated[int, typer.Option(help="Triton requests in flight")] = 4,
    max_rows_per_s: Annotated[float | None, typer.Option(help="cap on the scoring rate")] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option(help="seconds to score the rows in: the cheapest variant whose measured rate keeps it"),
    ] = None,
    yield_queue_ms: Annotated[
        float | None,
        typer.Option(help="online queue wait to yield above (0: never; default 2 when the class has a model copy)"),
    ] = None,
    yield_interval_s: Annotated[float, typer.Option(help="how often the online queue wait is sampled")] = 0.5,
    publish_cache: Annotated[bool, typer.Option(help="write the scores to the Redis score cache")] = False,
    tenant: Annotated[str | None, typer.Option(help="tenant whose cache gets the scores")] = None,
    metrics_port: Annotated[int, typer.Option(help="serve Prometheus metrics on this port while running (0: off)")] = 0,
    feature_processes: Annotated[
        int | None,
        typer.Option(help="processes for online feature reads (0 or 1: a thread of the job; default: CPUs, at most 4)"),
    ] = None,
    router_metrics: Annotated[
        list[str] | None,
        typer.Option(
            help="a router's metrics URL (http://host:9464/metrics) whose queue wait the job yields to; repeat"
        ),
    ] = None,
    view_scan: Annotated[
        str,
        typer.Option(help="read the feature views whole: auto (rows >= 2x the store's entities) | always | never"),
    ] = "auto",
) -> None:
    """Score every row of --input through --route into --output, exactly once; resumable and shardable.

    Exit 0: done (summary JSON on stdout). 2: bad options, input or output directory, found
    before any work. 1: stopped part-way (--resume continues). 130: cancelled (SIGINT/SIGTERM).
    """
    from inferline.batch import BatchCancelled, BatchInputError, BatchJobFailed, BatchJobSpec, Shard, run_until_signal

    cfg = _load(config)
    try:
        spec = BatchJobSpec.build(
            route=route, input_path=input_path, output_dir=output_dir, shard=Shard.parse(shard), resume=resume,
            traffic_class=traffic_class, features_from=features, timestamp_column=timestamp_column,
            chunk_rows=chunk_rows, request_rows=request_rows, concurrency=concurrency,
            max_rows_per_s=max_rows_per_s, yield_queue_ms=yield_queue_ms, yield_interval_s=yield_interval_s,
            publish_cache=publish_cache, tenant=tenant, feature_processes=feature_processes,
            router_metrics=router_metrics or [], deadline_s=deadline_s, view_scan=view_scan,
        )  # fmt: skip
        summary = _run(run_until_signal(cfg, spec, triton_url or cfg.triton.url, metrics_port=metrics_port))
    except BatchInputError as err:
        typer.echo(f"batch: {err}", err=True)
        raise typer.Exit(2) from err
    except BatchJobFailed as err:
        typer.echo(f"batch: {err}\ncommitted chunks are kept: rerun with --resume to continue", err=True)
        raise typer.Exit(1) from err
    except BatchCancelled as err:
        typer.echo(f"batch: {err}", err=True)
        raise typer.Exit(130) from err
    typer.echo(json.dumps(summary, indent=2))


stream_cli = typer.Typer(no_args_is_help=True, help="Stream inference: score events as they arrive, into a stream.")
cli.add_typer(stream_cli, name="stream")


@stream_cli.command("run")
def stream_run(
    route: Annotated[str, typer.Option(help="route whose features, models and post-processing score the events")],
    source: Annotated[str, typer.Option(help="redis://HOST:PORT/STREAM of the events")],
    group: Annotated[str, typer.Option(help="consumer group the worker reads in")],
    sink: Annotated[str, typer.Option(help="redis://HOST:PORT/STREAM of the outputs")],
    config: ConfigOption = DEFAULT_CONFIG,
    triton_url: Annotated[str | None, typer.Option(help="Triton host:port (default triton.url, else bundled)")] = None,
    traffic_class: Annotated[str, typer.Option("--class", help="traffic class of the Triton calls")] = "standard",
    tenant: Annotated[str | None, typer.Option(help="tenant whose score cache the scores refresh")] = None,
    consumer: Annotated[str | None, typer.Option(help="consumer name (default host-pid)")] = None,
    dead_letter: Annotated[str | None, typer.Option(help="dead-letter stream (default <source>:dead)")] = None,
    read_count: Annotated[int, typer.Option(help="events per XREADGROUP")] = 64,
    max_in_flight: Annotated[int, typer.Option(help="events read and not yet acknowledged, at most")] = 256,
    claim_idle_ms: Annotated[int, typer.Option(help="claim pending events idle this long")] = 30_000,
    max_attempts: Annotated[int, typer.Option(help="failed attempts before the dead-letter stream")] = 3,
    budget_ms: Annotated[
        float | None,
        typer.Option(help="event time + budget: older events get the ladder (default routes.<r>.budgets.stream_ms)"),
    ] = None,
    lag_high: Annotated[int, typer.Option(help="lag above which the light model scores")] = 10_000,
    lag_low: Annotated[int, typer.Option(help="lag below which the primary scores again")] = 1_000,
    lag_interval_s: Annotated[float, typer.Option(help="seconds between lag readings")] = 1.0,
    metrics_port: Annotated[int, typer.Option(help="serve Prometheus metrics on this port (0: off)")] = 0,
) -> None:
    """Score each event of --source through --route into --sink, exactly once per event id, until SIGTERM.

    Exit 0: stopped by SIGINT/SIGTERM after finishing the events in flight (summary JSON on
    stdout). 2: bad options, found before any event is read. 1: Triton or the model is missing.
    """
    from inferline.stream import StreamError, StreamInputError, StreamSpec
    from inferline.stream.runner import run_until_signal as run_stream_until_signal

    cfg = _load(config)
    options = {"consumer": consumer} if consumer else {}
    try:
        spec = StreamSpec.build(
            route=route, source=source, group=group, sink=sink, traffic_class=traffic_class, tenant=tenant,
            dead_letter=dead_letter, read_count=read_count, max_in_flight=max_in_flight,
            claim_idle_ms=claim_idle_ms, max_attempts=max_attempts, budget_ms=budget_ms, lag_high=lag_high,
            lag_low=lag_low, lag_interval_s=lag_interval_s, **options,
        )  # fmt: skip
        summary = _run(run_stream_until_signal(cfg, spec, triton_url or cfg.triton.url, metrics_port=metrics_port))
    except StreamInputError as err:
        typer.echo(f"stream: {err}", err=True)
        raise typer.Exit(2) from err
    except StreamError as err:
        typer.echo(f"stream: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(json.dumps(summary))


@cli.command()
def stats(
    url: Annotated[str, typer.Option(help="the router's metrics endpoint")] = "http://127.0.0.1:9464/metrics",
    interval_s: Annotated[float, typer.Option("--interval", help="seconds between refreshes")] = 2.0,
    window_s: Annotated[float, typer.Option("--window", help="seconds every rate is computed over")] = 60.0,
    once: Annotated[bool, typer.Option(help="measure one window, print it, and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per refresh, for scripts")] = False,
) -> None:
    """Per route over a sliding window: latency per layer, served_by shares, fallback / shed / quota / timeout
    rates, cost per 1K; per Triton model: batch efficiency, queue and compute per request. Fits the terminal."""
    import urllib.error

    from inferline.stats import run

    if window_s <= 0 or interval_s <= 0:
        typer.echo("--window and --interval must be positive", err=True)
        raise typer.Exit(2)
    try:
        run(url, interval_s=interval_s, window_s=window_s, once=once, json_lines=as_json)
    except (urllib.error.URLError, OSError) as err:
        typer.echo(f"cannot read {url}: {err}", err=True)
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        return


def main() -> None:
    configure_logging(os.environ.get("INFERLINE_LOG_LEVEL", "INFO"))
    # A broken pipe on stdout (e.g. `| head`) is not an error worth a traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cli()


if __name__ == "__main__":
    main()
    sys.exit(0)
