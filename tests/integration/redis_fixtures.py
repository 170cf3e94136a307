"""Session fixture ``redis_server``: a real ``redis-server`` of the tests' own, on a free port.

Started with ``--save "" --appendonly no`` (nothing on disk), ready when it answers
PING, always terminated at teardown. Fault tests pause it (SIGSTOP/SIGCONT) or stop and
restart it on the same port; each such test must leave it running. A missing binary
skips with ``requires_redis: ...`` outside CI and fails under CI (``CI=true``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from inferline.core.ports import LOOPBACK, free_port

MARKER = "requires_redis"
READY_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    """A running ``redis-server``: its address, its process and the controls fault tests need."""

    host: str
    port: int
    url: str
    pid: int
    log_path: pathlib.Path
    process: subprocess.Popen[bytes]
    binary: str

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a stalled Redis)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process (resuming it first, so a paused one can act on SIGTERM)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def start(self) -> None:
        """(Re)start on the same port and wait for PING; a no-op while it runs."""
        if self.process.poll() is None:
            return
        self.process = _spawn(self.binary, self.port, self.log_path)
        self.pid = self.process.pid
        _wait_ready(self)

    def ping(self, timeout_s: float = 0.5) -> bool:
        """True when the server answers PING within ``timeout_s``."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _spawn(binary: str, port: int, log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    command = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    command += ["--dir", str(log_path.parent)]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_ready(server: RedisServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {server.process.returncode}: see {server.log_path}")
        if server.ping():
            return
        time.sleep(0.02)
    server.stop()
    raise AssertionError(f"redis-server not ready within {READY_TIMEOUT_S} s: see {server.log_path}")


def _require_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = f"{MARKER}: no redis-server binary on PATH (make test installs Debian's redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server`` on a free loopback port, terminated at the end of the session."""
    binary = _require_binary()
    port = free_port()
    log_path = tmp_path_factory.mktemp("redis") / "redis-server.log"
    process = _spawn(binary, port, log_path)
    server = RedisServer(LOOPBACK, port, f"redis://{LOOPBACK}:{port}/0", process.pid, log_path, process, binary)
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_left_running(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session server, left running (resumed, restarted) whatever the test did to it (pause, stop)."""
    yield redis_server
    if redis_server.process.poll() is None:
        redis_server.resume()
    redis_server.start()
