"""Free-port helpers for processes started on ephemeral ports (tests, demo, benchmarks)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Distinct TCP ports the kernel reports free on ``host`` right now.

    Every socket stays bound until all ports are picked, so the ports differ.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port the kernel reports free on ``host`` right now (bind to port 0, then release)."""
    return free_ports(1, host)[0]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could listen on ``port`` now.

    SO_REUSEADDR, as servers set it, so connections lingering in TIME_WAIT after a
    server stopped do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
        return True
