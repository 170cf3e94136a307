"""Free-port helpers for processes started on ephemeral ports (tests, demo, benchmarks).

A port picked here is handed to a server that binds it a moment later (Triton, Envoy,
Redis, a router in another process). Two things can take it in between:

* **An outgoing connection.** Asking the kernel for port 0 returns a port of its ephemeral
  range (``/proc/sys/net/ipv4/ip_local_port_range``, 32768–60999 by default), the same range
  it draws every ``connect()``'s local port from; a test suite or a benchmark opens
  connections all the time, so now and then one took the port before its server bound it
  ("Address already in use"). So ports are drawn below that range, where the kernel never
  puts a connection on its own.
* **Another pick.** A port handed out is not handed out again by this process for
  ``_HELD_S``; picks are drawn at random (from the OS's entropy, so forked processes do not
  repeat each other's draws), and each is checked free by binding it.

Where the ephemeral range leaves no room below it, ports come from the kernel (port 0) as
before.
"""

from __future__ import annotations

import errno
import pathlib
import random
import socket
import threading
import time

LOOPBACK = "127.0.0.1"

_LOWEST = 20000
"""Ports below this are left to well-known services (databases, brokers: 1883–15672 here)."""
_MIN_SPAN = 1000
"""Below this many ports between ``_LOWEST`` and the ephemeral range, use the kernel's picks."""
_HELD_S = 120.0
"""A port handed out is not handed out again for this long: its server may not have bound it yet."""
_TRIES_PER_PORT = 64
_RANGE_FILE = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")

_draw = random.SystemRandom()
_given: dict[int, float] = {}
_given_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default elsewhere)."""
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _pick_range() -> tuple[int, int] | None:
    """[low, high) to draw from: below the ephemeral range; None when there is too little room."""
    ephemeral_low, _ = ephemeral_range()
    if ephemeral_low - _LOWEST < _MIN_SPAN:
        return None
    return _LOWEST, ephemeral_low


def _bindable(sock: socket.socket, host: str, port: int) -> bool:
    try:
        sock.bind((host, port))
    except OSError:
        return False
    return True


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Distinct TCP ports free on ``host`` right now, outside the kernel's ephemeral range.

    Every socket stays bound until all ports are picked, so the ports differ; none was handed
    out by this process in the last ``_HELD_S`` seconds.

    Raises:
        OSError: no free port found (the range below the ephemeral one is all taken).
    """
    span = _pick_range()
    sockets: list[socket.socket] = []
    try:
        with _given_lock:
            now = time.monotonic()
            for port, at in list(_given.items()):
                if now - at > _HELD_S:
                    del _given[port]
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                if span is None:
                    sock.bind((host, 0))
                else:
                    _bind_in(sock, host, span)
                _given[int(sock.getsockname()[1])] = now
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _bind_in(sock: socket.socket, host: str, span: tuple[int, int]) -> None:
    """Bind ``sock`` to a random port of ``span`` not handed out lately (the caller holds the lock)."""
    for _ in range(_TRIES_PER_PORT):
        port = _draw.randrange(*span)
        if port not in _given and _bindable(sock, host, port):
            return
    raise OSError(f"no free port found in {span[0]}-{span[1] - 1} after {_TRIES_PER_PORT} tries")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now, outside the kernel's ephemeral range (``free_ports``)."""
    return free_ports(1, host)[0]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could listen on ``port`` now (``_listen_error``)."""
    return _listen_error(host, port) is None


def port_in_use(host: str, port: int) -> bool:
    """Whether a process already listens on ``host:port``, so that a server of ours could not
    serve there (or, binding with ``SO_REUSEPORT`` as gRPC and Envoy do, would share it). Any
    other reason a server could not listen there (an address not on this host) is left to the
    server's own bind to report."""
    return _listen_error(host, port) == errno.EADDRINUSE


def _listen_error(host: str, port: int) -> int | None:
    """The errno of listening on ``host:port`` as a server would, or None if it could.

    With SO_REUSEADDR, as servers set it, so connections lingering in TIME_WAIT after a server
    stopped do not count as "in use"; without SO_REUSEPORT, so a listener that set it does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as err:
            return err.errno
        return None
