"""New model versions without a restart: what ``inferline models load NAME`` does.

A model owner adds ``N+1/`` to a model directory and runs ``inferline models load NAME``.
Triton runs with ``--model-control-mode=explicit`` (the bundled server always; a Triton of
your own must too), so its repository API loads the model again: Triton loads the
versions its ``version_policy`` now selects, runs the config's ``model_warmup`` on them,
marks them READY and only then moves calls over; versions the policy drops are unloaded
once their calls in flight have finished (Triton's reload keeps the model available
throughout: no call fails). The load answers when the new versions are ready, so its
duration is the switch time.

Which calls go where:

* A route variant without ``version`` sends none: Triton serves it from the
  highest-numbered READY version, so it moves to ``N+1`` when ``N+1`` is ready. Triton's
  ``model_warmup`` is what warms ``N+1`` before those calls arrive (the load warns when
  the config has none).
* A variant with a pinned ``version`` (``ranker:1``) stays on it while Triton serves it.
  A variant pinned to a version still to come (``ranker:2``, e.g. a tenant's canary) is
  left out of route selection until Triton has loaded it; the router then runs its
  warm-up on it (``TritonExecutor.warm_up``, every route shape) and only then selects it
  (``ModelReadiness``'s ``on_ready``), within the readiness period (2 s).

The bundled Triton serves a *derived* repository when it adapts onnxruntime models or
generates class copies (``inferline.triton.launcher``): the new version must appear there
too. The process that runs it publishes where it is (``publish_bundled``: a small JSON
file in a per-user runtime folder, keyed by the model repository's path), and the load
rebuilds the model's entry there (``refresh_derived``) before calling Triton. The owner's
directory is never written to.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from inferline.core.config import ClassCopiesConfig, InferlineConfig, TlsClientConfig
from inferline.core.processes import pid_alive
from inferline.core.tls import channel_options, tritonclient_kwargs
from inferline.triton.class_copies import ClassModelMap, write_class_copies
from inferline.triton.executor import CHANNEL_OPTIONS
from inferline.triton.model_repository import (
    ModelDirectory,
    ModelDirectoryError,
    ModelKind,
    adapt_onnx,
    discover,
    inspect_model,
)

STATE_PREFIX = "triton-"
_CONTROL_TIMEOUT_S = 5.0


class LoadError(Exception):
    """A load that cannot be done: one line; ``exit_code`` 2 for bad input, 1 for a failure."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- where the bundled server is -------------------------------------------------------


@dataclass(frozen=True)
class BundledServer:
    """A running bundled Triton, as the process that started it published it."""

    model_repository: pathlib.Path
    """The owner's repository (``triton.model_repository``)."""
    repository: pathlib.Path
    """The repository Triton runs on: the derived one, or ``model_repository`` itself."""
    grpc_url: str
    pid: int
    """The tritonserver process."""
    tls: bool
    """Triton serves gRPC over TLS (``triton.server_tls``)."""

    @property
    def derived(self) -> bool:
        return self.repository != self.model_repository


def state_dir() -> pathlib.Path:
    """The per-user folder of the published servers (``$XDG_RUNTIME_DIR/inferline`` or ``$TMPDIR/inferline-<uid>``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (
        pathlib.Path(runtime) / "inferline"
        if runtime
        else pathlib.Path(tempfile.gettempdir()) / f"inferline-{os.getuid()}"
    )


def state_path(model_repository: pathlib.Path) -> pathlib.Path:
    """Where the bundled Triton serving ``model_repository`` is published."""
    digest = hashlib.sha256(str(model_repository.resolve()).encode()).hexdigest()[:16]
    return state_dir() / f"{STATE_PREFIX}{digest}.json"


def publish_bundled(server: BundledServer) -> pathlib.Path:
    """Write ``server`` where ``find_bundled`` looks (the last server started on a repository wins)."""
    path = state_path(server.model_repository)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = json.dumps(
        {
            "model_repository": str(server.model_repository),
            "repository": str(server.repository),
            "grpc_url": server.grpc_url,
            "pid": server.pid,
            "tls": server.tls,
        }
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def withdraw_bundled(model_repository: pathlib.Path, pid: int) -> None:
    """Remove the published server of ``model_repository`` if it is still the one with ``pid``."""
    path = state_path(model_repository)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text())["pid"] == pid:
            path.unlink()


def find_bundled(model_repository: pathlib.Path) -> BundledServer | None:
    """The bundled Triton running on ``model_repository`` now, or None."""
    path = state_path(model_repository)
    try:
        raw = json.loads(path.read_text())
        server = BundledServer(
            pathlib.Path(raw["model_repository"]),
            pathlib.Path(raw["repository"]),
            str(raw["grpc_url"]),
            int(raw["pid"]),
            bool(raw["tls"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if server.model_repository != model_repository.resolve() or not pid_alive(server.pid):
        return None
    return server


# --- the model directory and the derived repository --------------------------------------


def inspect_for_load(repository: pathlib.Path, name: str) -> ModelDirectory:
    """The model directory ``repository/name``, checked as the launcher checks it.

    Raises:
        LoadError: (exit code 2) no such directory, or one the server cannot load (no config,
            a bad config, no version directory, a version without its file, ...): one line.
    """
    path = repository / name
    if not path.is_dir():
        names = discover(repository) if repository.is_dir() else []
        close = difflib.get_close_matches(name, names, n=1)
        known = f"did you mean {close[0]!r}?" if close else f"models: {', '.join(names[:10]) or 'none'}"
        raise LoadError(f"no model directory {name!r} in the model repository {repository} ({known})", 2)
    try:
        return inspect_model(path)
    except ModelDirectoryError as err:
        raise LoadError(str(err), 2) from err


def refresh_derived(derived: pathlib.Path, model: ModelDirectory, class_copies: ClassCopiesConfig) -> list[str]:
    """Rebuild ``model``'s entry in the derived repository the bundled server runs on, with its
    current versions, and its class copies; returns the names to load (the model, then its copies).

    An onnxruntime model's adapted directory is built beside the old one and swapped in (a
    version already loaded keeps its files: they are the owner's, linked); any other model
    is linked as it is. The owner's directory is not written to.
    """
    target = derived / model.name
    if model.kind is ModelKind.ONNX:
        staging = derived / f".{model.name}.{os.getpid()}.tmp"
        _remove(staging)
        adapt_onnx(model, staging)
        _swap(staging, target)
    elif not (target.is_symlink() and target.resolve() == model.path.resolve()):
        staging = derived / f".{model.name}.{os.getpid()}.tmp"
        _remove(staging)
        staging.symlink_to(model.path.resolve())
        _swap(staging, target)
    names = [model.name]
    if model.name in class_copies.models and class_copies.classes:
        wanted = class_copies.model_copy(update={"models": [model.name]})
        try:
            names += write_class_copies(derived, derived, wanted)
        except ValueError as err:
            raise LoadError(str(err), 2) from err
    return names


def _swap(staging: pathlib.Path, target: pathlib.Path) -> None:
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    _remove(old)
    if target.is_symlink() or target.exists():
        target.rename(old)
    staging.rename(target)
    _remove(old)


def _remove(path: pathlib.Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# --- the load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """One model loaded: its READY versions before and after, and how long Triton took."""

    model: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    seconds: float
    copies: tuple[str, ...] = ()

    @property
    def serving(self) -> str:
        """The version calls without a version go to: the highest-numbered READY one."""
        return max(self.after, key=int) if self.after else ""

    def line(self) -> str:
        new = [v for v in self.after if v not in self.before]
        dropped = [v for v in self.before if v not in self.after]
        what = f"version{'s' if len(new) > 1 else ''} {', '.join(new)} ready" if new else "reloaded, no new version"
        parts = [
            f"model {self.model}: {what} in {self.seconds:.2f} s",
            f"serving versions {', '.join(self.after) or 'none'} (was {', '.join(self.before) or 'none'})",
        ]
        if dropped:
            parts.append(f"unloaded {', '.join(dropped)} once their calls finished")
        if self.serving:
            parts.append(f"calls without a version go to version {self.serving}")
        if self.copies:
            parts.append(f"class copies {', '.join(self.copies)} reloaded")
        return "; ".join(parts)


def triton_client(url: str, tls: TlsClientConfig | None) -> grpcclient.InferenceServerClient:
    """A tritonclient to ``url`` (over TLS with ``tls``), with the executor's reconnect backoff."""
    options = [*CHANNEL_OPTIONS, *channel_options(tls)]
    return grpcclient.InferenceServerClient(url, channel_args=options, **tritonclient_kwargs(tls))


def ready_versions(client: grpcclient.InferenceServerClient, name: str) -> tuple[str, ...]:
    """The versions of ``name`` Triton has READY, in ascending order."""
    index = client.get_model_repository_index(client_timeout=_CONTROL_TIMEOUT_S)
    versions = {m.version for m in index.models if m.name == name and m.state == "READY" and m.version}
    return tuple(sorted(versions, key=int))


def load(
    client: grpcclient.InferenceServerClient, name: str, copies: Sequence[str] = (), timeout_s: float = 120.0
) -> LoadReport:
    """Ask Triton to load ``name`` (again), then its ``copies``; answers when they are READY.

    Raises:
        LoadError: Triton could not load it (one line, Triton's reason), or did not answer.
    """
    from inferline.triton.launcher import one_line

    try:
        before = ready_versions(client, name)
    except InferenceServerException as err:
        raise LoadError(f"Triton did not answer: {one_line(err.message() or str(err))}") from err
    try:
        started = time.monotonic()
        client.load_model(name, client_timeout=timeout_s)
        seconds = time.monotonic() - started
        for copy in copies:
            client.load_model(copy, client_timeout=timeout_s)
        after = ready_versions(client, name)
    except InferenceServerException as err:
        raise LoadError(f"model {name} not loaded: {one_line(err.message() or str(err))}") from err
    return LoadReport(name, before, after, seconds, tuple(copies))


# --- what the load means for the routes -----------------------------------------------------


def warnings(config: InferlineConfig, model: ModelDirectory | None, report: LoadReport) -> list[str]:
    """What the operator should know after a load: pinned versions no longer served, a model
    nothing calls, a version switch that no ``model_warmup`` warmed."""
    lines: list[str] = []
    variants = [
        (route, where, v)
        for route, r in config.routes.items()
        for where, v in [("primary", r.primary), *((f"alternates[{i}]", a) for i, a in enumerate(r.alternates))]
        + ([("light", r.light)] if r.light is not None else [])
        if v.model == report.model
    ]
    copies = set(ClassModelMap(config.triton.class_copies).bases)
    if not variants and report.model not in config.models and report.model not in copies:
        lines.append(
            f"model {report.model} is named by no route and no models: entry; nothing calls it through inferline"
        )
    for route, where, variant in variants:
        if variant.version and variant.version not in report.after:
            lines.append(
                f"routes.{route}.{where}.version: pins version {variant.version} of {report.model}, which Triton does "
                f"not serve (serves {', '.join(report.after) or 'none'}): its calls go to the route's other variants, "
                "or it degrades"
            )
    switched = report.serving and report.serving not in report.before
    follows = any(not v.version for _, _, v in variants)
    if model is not None and switched and follows and not model.config.model_warmup:
        lines.append(
            f"model {report.model} has no model_warmup in its config.pbtxt: variants without a version took their "
            f"first calls on version {report.serving} unwarmed (add model_warmup: docs/models.md, New versions)"
        )
    return lines
