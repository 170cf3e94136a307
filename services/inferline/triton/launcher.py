"""Runs the bundled Triton server (from nvidia-pytriton) as a supervised subprocess.

Why a subprocess from its own virtual environment: Triton's python backend answers with
empty tensors when numpy >= 2 is importable, while Feast needs numpy >= 2. So the server
runs from ``TritonConfig.server_env`` (nvidia-pytriton, numpy < 2, onnxruntime), the
services from theirs, and they only talk KServe v2 gRPC — as in production, where Triton
is its own container.

Why explicit model control, with each model loaded through the repository API once the
server is up (not ``--load-model``, with which one model that fails to load stops the
whole server): a model that fails is reported in one line (model, reason) and the others
serve; only the models asked for are loaded (the routes' models and their per-class
copies under ``inferline up``; every model directory under ``inferline triton``); models
whose name ends in ``_gpu`` are loaded only where a GPU exists; and a model can later be
loaded again, with its new versions, without restarting the server (``inferline models
load``, ``inferline.triton.versions``: the launcher publishes where the server runs).

The server runs on a derived repository when it must: a temporary directory linking
every entry of ``model_repository``, with onnxruntime models adapted to the python ONNX
runner (``inferline.triton.model_repository``; the owner's directory is never edited) and
the generated per-class copies (``inferline.triton.class_copies``); ``stop`` removes it.
A model directory the bundled server cannot serve (no config, a missing version, a
TensorRT or PyTorch model, ...) is reported in one line and not loaded.

With ``triton.server_tls`` the server serves gRPC over TLS only (``--grpc-use-ssl``, and
``--grpc-use-ssl-mutual`` with a client CA), and the readiness probe connects as the router
does, with ``triton.tls``; the HTTP and metrics ports stay plain text on loopback.

The server runs in its own session (process group): a Ctrl-C aimed at the router does
not reach it, and ``stop`` can kill the python-backend stubs it leaves behind. The API
is synchronous; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Literal

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from inferline.core.config import TlsServerConfig, TritonConfig
from inferline.core.ports import free_ports
from inferline.core.processes import spawn_tethered
from inferline.core.tls import channel_options, tritonclient_kwargs
from inferline.triton.class_copies import ClassModelMap, write_class_copies
from inferline.triton.executor import CHANNEL_OPTIONS
from inferline.triton.model_repository import ModelDirectory, ModelDirectoryError, ModelKind, adapt_onnx, inspect_model
from inferline.triton.versions import BundledServer, publish_bundled, withdraw_bundled

logger = logging.getLogger(__name__)

BACKENDS_DIRNAME = "inferline-backends"
"""Folder under the server environment that holds the prepared backend directory."""
HOST = "127.0.0.1"
"""The bundled server listens on loopback only; it serves the router on the same host."""
_EXIT_TIMEOUT_S = 5
_POLL_INTERVAL_S = 0.2
_PROBE_TIMEOUT_S = 2.0
_LOG_TAIL_BYTES = 4000
_LOAD_THREADS = 8
_REASON_CHARS = 400


START_ATTEMPTS = 2
"""Starts of the server in one ``start`` when it dies during startup. Triton 2.51's python
backend now and then aborts while loading its models (``boost::interprocess::lock_exception``,
seen once in ~30 starts on a loaded 2-core machine); the next start loads them. A server that
is not ready in time, or a model that fails to load, is not tried again."""


class TritonStartError(RuntimeError):
    """The bundled server exited or was not ready in time; ``log_tail`` holds its last output,
    ``exited`` whether the server process died during startup."""

    def __init__(self, message: str, log_tail: str = "", *, exited: bool = False) -> None:
        super().__init__(f"{message}\n--- tritonserver log tail ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail
        self.exited = exited


@dataclass(frozen=True)
class _ServerInstall:
    """Where nvidia-pytriton put the server inside a virtual environment."""

    env: pathlib.Path
    site_packages: pathlib.Path

    @property
    def root(self) -> pathlib.Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> pathlib.Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_version(self) -> str:
        return self.site_packages.parent.name.removeprefix("python")  # lib/python3.11/site-packages


def find_tritonserver(server_env: pathlib.Path) -> pathlib.Path | None:
    """Path of the ``tritonserver`` binary bundled in ``server_env``, or None if it is not installed."""
    install = _find_install(server_env)
    return install.binary if install is not None else None


def _find_install(server_env: pathlib.Path) -> _ServerInstall | None:
    env = server_env.resolve()
    for site in sorted(env.glob("lib/python3*/site-packages")):
        install = _ServerInstall(env, site)
        if install.binary.is_file():
            return install
    return None


def gpu_available() -> bool:
    """True when ``nvidia-smi -L`` runs and lists at least one GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def discover_models(repository: pathlib.Path, load_gpu_variants: bool | Literal["auto"] = "auto") -> list[str]:
    """Names of the model directories (those with a ``config.pbtxt``) the server should load.

    Directories named ``*_gpu`` are included when ``load_gpu_variants`` is True, or is
    "auto" and a GPU is present.
    """
    names = sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").is_file())
    return without_gpu_variants(names, load_gpu_variants)


def without_gpu_variants(names: Sequence[str], load_gpu_variants: bool | Literal["auto"] = "auto") -> list[str]:
    """``names`` less those ending in ``_gpu``, unless ``load_gpu_variants`` (or "auto" and a GPU is present)."""
    gpu_names = [n for n in names if n.endswith("_gpu")]
    if not gpu_names:
        return list(names)
    load_gpu = gpu_available() if load_gpu_variants == "auto" else bool(load_gpu_variants)
    return list(names) if load_gpu else [n for n in names if n not in gpu_names]


def one_line(message: str, limit: int = _REASON_CHARS) -> str:
    """Triton's (often multi-line, traceback-bearing) error as one line: its first line and,
    for a Python traceback, the exception at its end."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    text = lines[0] if len(lines) == 1 or "Traceback" not in message else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _copy_if_changed(src: pathlib.Path, dst: pathlib.Path) -> None:
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns:
            return
    # Copy then rename, so a server already running from dst keeps its (old) file intact.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _prepare_backends(install: _ServerInstall) -> pathlib.Path:
    """Assemble ``<env>/inferline-backends/python`` (backend library + stub); idempotent."""
    backends = install.env / BACKENDS_DIRNAME
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    files = [p for p in (install.root / "backends" / "python").iterdir() if p.is_file()]
    stub = install.root / "python_backend_stubs" / install.python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no python backend stub for Python {install.python_version} at {stub}")
    for src in [*files, stub]:
        _copy_if_changed(src, python_dir / src.name)
    return backends


def _server_environ(install: _ServerInstall) -> dict[str, str]:
    """Our environment with the server venv's bin first on PATH: the stub must find numpy < 2."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    environ["PATH"] = os.pathsep.join(filter(None, [str(install.env / "bin"), environ.get("PATH")]))
    libs = str(install.site_packages / "nvidia_pytriton.libs")
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, environ.get("LD_LIBRARY_PATH")]))
    environ["VIRTUAL_ENV"] = str(install.env)
    return environ


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in the server's process group (e.g. orphaned backend stubs)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _ssl_flags(tls: TlsServerConfig | None) -> list[str]:
    """Triton's flags for gRPC over TLS (``triton.server_tls``); mutual TLS with ``client_ca_file``.

    ``--grpc-use-ssl-mutual`` makes Triton require and verify a client certificate against
    ``--grpc-root-cert`` (GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY).
    """
    if tls is None:
        return []
    flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={tls.cert_file}", f"--grpc-server-key={tls.key_file}"]
    if tls.client_ca_file is not None:
        flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tls.client_ca_file}"]
    return flags


def _log_tail(path: pathlib.Path | None) -> str:
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


class TritonLauncher:
    """Starts, supervises and stops one bundled ``tritonserver`` process.

    Ports configured as 0 are picked on the first ``start`` and kept for later restarts,
    so the URLs stay valid for clients across a restart. Usable as a context manager.

    ``models``: the models to load (their per-class copies are added); None loads every
    model directory of the repository. A model that cannot be loaded is left out of
    ``models`` and named in ``failed`` with its one-line reason; the others serve.
    """

    def __init__(
        self, config: TritonConfig, log_path: pathlib.Path | None = None, models: Sequence[str] | None = None
    ) -> None:
        self._config = config
        self._wanted = tuple(dict.fromkeys(models)) if models is not None else None
        self._log_path = log_path
        self._owns_log = False
        """The log is a temporary file of ours: removed on stop unless the server ever failed."""
        self._failed_run = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_returncode: int | None = None
        self._ports: dict[str, int] = {}
        self._models: tuple[str, ...] = ()
        self._to_load: tuple[str, ...] = ()
        self._failed: dict[str, str] = {}
        self._repository: pathlib.Path | None = None
        self._workdir: pathlib.Path | None = None  # holds a derived repository; removed on stop
        self._lock = threading.RLock()

    def __enter__(self) -> TritonLauncher:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:PORT`` of the KServe v2 gRPC endpoint."""
        return f"{HOST}:{self._port('grpc')}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self._port('http')}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint of the server."""
        return f"http://{HOST}:{self._port('metrics')}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, None when it is not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last server process, None while it runs or before the first start."""
        return self._proc.poll() if self._proc is not None else self._last_returncode

    @property
    def models(self) -> tuple[str, ...]:
        """Models loaded and ready after the last ``start``."""
        return self._models

    @property
    def failed(self) -> dict[str, str]:
        """Models of the last ``start`` that could not be loaded → why (one line)."""
        return dict(self._failed)

    @property
    def repository(self) -> pathlib.Path | None:
        """Repository of the last ``start``: ``model_repository``, or the derived one with class copies."""
        return self._repository

    @property
    def log_path(self) -> pathlib.Path | None:
        """The server's log file (a temporary file is created on first start when none was given)."""
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it and all its models are ready; no-op if running.
        A server that dies before it is ready is started again, ``START_ATTEMPTS`` starts in all.

        Raises:
            TritonStartError: the server is not installed, exited during startup, or was not
                ready within ``startup_timeout_s`` (the process is then stopped).
        """
        with self._lock:
            if self.is_running():
                return
            self.stop()  # reap a server that died on its own, and its stubs
            install = _find_install(self._config.server_env)
            if install is None:
                raise TritonStartError(f"tritonserver not found in {self._config.server_env} (install nvidia-pytriton)")
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    command = self._command(install, _prepare_backends(install))
                    self._spawn(command, _server_environ(install))
                    deadline = time.monotonic() + self._config.startup_timeout_s
                    self._wait_ready(deadline)
                    self._load_models(deadline)
                    break
                except BaseException as err:
                    self._failed_run = True
                    self.stop()
                    if not (isinstance(err, TritonStartError) and err.exited and attempt < START_ATTEMPTS):
                        raise
                    logger.warning(
                        "tritonserver died during startup (%s; log kept at %s): starting it again",
                        str(err).partition("\n")[0],
                        self._log_path,
                    )
            self._publish()
            logger.info("tritonserver ready (pid %s, grpc %s, models %s)", self.pid, self.grpc_url, self._models)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server, SIGKILL its process group after ``timeout_s``; always reaps. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                self._remove_workdir()
                return
            withdraw_bundled(self._config.model_repository, proc.pid)
            try:
                if proc.poll() is None:
                    self._terminate(proc, timeout_s)
                else:
                    self._failed_run = True  # it died on its own: keep its log
            finally:
                _kill_group(proc.pid)
                proc.wait()
                self._proc = None
                self._last_returncode = proc.returncode
                self._remove_workdir()
                if self._owns_log and not self._failed_run and self._log_path is not None:
                    self._log_path.unlink(missing_ok=True)

    def _publish(self) -> None:
        """Say where this server runs, for ``inferline models load`` (``inferline.triton.versions``)."""
        assert self._proc is not None and self._repository is not None
        server = BundledServer(
            self._config.model_repository.resolve(),
            self._repository,
            self.grpc_url,
            self._proc.pid,
            self._config.server_tls is not None,
        )
        try:
            publish_bundled(server)
        except OSError as err:  # inferline models load then needs --triton-url; serving is not affected
            logger.warning("could not publish the bundled Triton for inferline models load: %s", err)

    def restart(self) -> None:
        """Stop (if needed) and start again on the same ports."""
        with self._lock:
            self.stop()
            self.start()

    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            raise RuntimeError("TritonLauncher has not been started; its ports are not chosen yet") from None

    def _choose_ports(self) -> None:
        if self._ports:
            return
        wanted = {
            "grpc": self._config.grpc_port,
            "http": self._config.http_port,
            "metrics": self._config.metrics_port,
        }
        free = iter(free_ports(sum(1 for port in wanted.values() if port == 0), HOST))
        self._ports = {name: port or next(free) for name, port in wanted.items()}

    def _command(self, install: _ServerInstall, backends: pathlib.Path) -> list[str]:
        self._choose_ports()
        repository = self._config.model_repository.resolve()
        self._failed = {}
        if self._wanted is None:
            wanted = discover_models(repository, self._config.load_gpu_variants)
        else:
            wanted = without_gpu_variants(self._wanted, self._config.load_gpu_variants)
        if not wanted:
            logger.warning("no models to load (directories with config.pbtxt) in %s", repository)
        inspected = {}
        for name in wanted:
            if not (repository / name).is_dir():
                self._fail(name, f"no model directory {name!r} in the model repository {repository}")
                continue
            try:
                inspected[name] = inspect_model(repository / name)
            except ModelDirectoryError as err:
                self._fail(name, str(err))
        models = list(inspected)
        onnx = [m for m in inspected.values() if m.kind is ModelKind.ONNX]
        if onnx or self._config.class_copies.models:
            self._workdir = pathlib.Path(tempfile.mkdtemp(prefix="inferline-triton-repo-"))
            repository, copies = self._derive(repository, self._workdir / "models", onnx, models)
            models += [c for c in copies if c not in models]  # copies already in the repository are regenerated
        self._repository = repository
        self._to_load = tuple(models)
        self._models = ()
        return [
            str(install.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--{kind}-address={HOST}" for kind in ("grpc", "http", "metrics")),
            *(f"--{kind}-port={self._ports[kind]}" for kind in ("grpc", "http", "metrics")),
            f"--exit-timeout-secs={_EXIT_TIMEOUT_S}",
            "--log-verbose=0",
            *_ssl_flags(self._config.server_tls),
        ]

    def _fail(self, model: str, reason: str) -> None:
        self._failed[model] = reason
        logger.error("model %s not loaded: %s", model, reason)

    def _derive(
        self, original: pathlib.Path, repository: pathlib.Path, onnx: Sequence[ModelDirectory], models: Sequence[str]
    ) -> tuple[pathlib.Path, list[str]]:
        """The repository the bundled server runs on: links to ``original``'s entries, onnxruntime
        models adapted to the python runner, and the per-class copies of ``models``."""
        repository.mkdir(parents=True)
        copies_config = self._config.class_copies
        wanted = copies_config.model_copy(update={"models": [m for m in copies_config.models if m in models]})
        copies = set(ClassModelMap(wanted).copies)
        adapted = {m.name: m for m in onnx}
        for entry in sorted(original.iterdir()):
            if entry.name in adapted:
                adapt_onnx(adapted[entry.name], repository / entry.name)
            elif entry.name not in copies:
                (repository / entry.name).symlink_to(entry)
        try:
            return repository, write_class_copies(repository, repository, wanted)
        except ValueError as err:
            raise TritonStartError(str(err)) from err

    def _load_models(self, deadline: float) -> None:
        """Load every model through the repository API, in parallel; record and log each failure
        in one line. Triton answers a load when the model is ready (warm-up included) or failed."""
        if not self._to_load:
            return
        client = self._client()
        try:
            with ThreadPoolExecutor(min(_LOAD_THREADS, len(self._to_load)), "triton-load") as pool:
                outcomes = list(pool.map(lambda name: self._load(client, name, deadline), self._to_load))
        finally:
            client.close()
        for name, reason in zip(self._to_load, outcomes, strict=True):
            if reason is not None:
                self._fail(name, reason)
        self._models = tuple(name for name, reason in zip(self._to_load, outcomes, strict=True) if reason is None)

    def _load(self, client: grpcclient.InferenceServerClient, name: str, deadline: float) -> str | None:
        """Load ``name``; None when it is ready, else why not (one line)."""
        timeout_s = max(1.0, deadline - time.monotonic())
        try:
            client.load_model(name, client_timeout=timeout_s)
        except InferenceServerException as err:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {self._proc.returncode} while loading {name}",
                    self._tail(),
                    exited=True,
                ) from err
            return one_line(err.message() or str(err))
        return None

    def _client(self) -> grpcclient.InferenceServerClient:
        # The executor's short reconnect backoff: with gRPC's default (1 s growing x1.6) a
        # restarted Triton was seen ready ~3 s late, and callers degraded for nothing.
        # Over TLS with triton.tls when the server serves it (triton.server_tls).
        tls = self._config.tls if self._config.server_tls is not None else None
        options = [*CHANNEL_OPTIONS, *channel_options(tls)]
        return grpcclient.InferenceServerClient(self.grpc_url, channel_args=options, **tritonclient_kwargs(tls))

    def _spawn(self, command: list[str], environ: dict[str, str]) -> None:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="inferline-tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = pathlib.Path(name)
            self._owns_log = True
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log:
            log.write(f"=== inferline: starting {' '.join(command)}\n".encode())
            log.flush()
            # Own session: signals aimed at our process group (Ctrl-C) do not reach the server.
            # At the router's own priority, also when its boosted event loop restarts it; and
            # stopped by the kernel should this process be killed outright (spawn_tethered).
            self._proc = spawn_tethered(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                start_new_session=True,
            )
        logger.info("started tritonserver pid %s, log %s", self._proc.pid, self._log_path)

    def _wait_ready(self, deadline: float) -> None:
        client = self._client()
        try:
            while not self._probe(client):
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {code} during startup", self._tail(), exited=True
                    )
                if time.monotonic() >= deadline:
                    timeout = self._config.startup_timeout_s
                    raise TritonStartError(f"tritonserver not ready within {timeout:g} s", self._tail())
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    def _probe(self, client: grpcclient.InferenceServerClient) -> bool:
        try:
            return bool(client.is_server_ready(client_timeout=_PROBE_TIMEOUT_S))
        except InferenceServerException:
            return False

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)  # links only: the originals stay
            self._workdir = None

    def _terminate(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("tritonserver pid %s ignored SIGTERM for %g s; killing it", proc.pid, timeout_s)
            _kill_group(proc.pid)
            proc.wait()

    def _tail(self) -> str:
        return _log_tail(self._log_path)


def run_triton_forever(config: TritonConfig) -> int:
    """Run the bundled server until SIGINT/SIGTERM (``inferline triton``).

    Returns:
        0 after a requested stop; 1 if the server failed to start or died on its own.
    """
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, stopping tritonserver", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    launcher = TritonLauncher(config)
    try:
        launcher.start()
        logger.info(
            "tritonserver serving %s: grpc %s, http %s, metrics %s, log %s",
            ", ".join(launcher.models),
            launcher.grpc_url,
            launcher.http_url,
            launcher.metrics_url,
            launcher.log_path,
        )
        return _block_until_stopped(launcher, stop_requested)
    except TritonStartError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _block_until_stopped(launcher: TritonLauncher, stop_requested: threading.Event) -> int:
    while not stop_requested.wait(0.5):
        if not launcher.is_running():
            logger.error(
                "tritonserver exited on its own with code %s; log %s\n%s",
                launcher.returncode,
                launcher.log_path,
                _log_tail(launcher.log_path),
            )
            return 1
    return 0
