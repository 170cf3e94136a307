"""Free-port picks: below the kernel's ephemeral range, distinct, free, never repeated soon."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from inferline.core import ports
from inferline.core.ports import LOOPBACK, ephemeral_range, free_port, free_ports, port_in_use


def test_picks_lie_below_the_range_outgoing_connections_use() -> None:
    low, _ = ephemeral_range()
    picked = free_ports(20)
    assert len(set(picked)) == 20
    assert all(ports._LOWEST <= port < low for port in picked), picked


def test_a_picked_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((LOOPBACK, port))
        server.listen(1)
        with socket.create_connection((LOOPBACK, port), timeout=2):
            pass


def test_a_port_is_not_handed_out_twice_while_its_server_may_still_be_starting() -> None:
    picked = [free_port() for _ in range(300)] + free_ports(50)
    assert len(set(picked)) == len(picked)


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        spare = free_port()  # free now; handed out again below only because the draw is scripted
        ports._given.pop(spare, None)
        draws: Iterator[int] = iter([busy, busy, spare])
        monkeypatch.setattr(ports, "_pick_range", lambda: (1024, 65536))
        monkeypatch.setattr(ports._draw, "randrange", lambda low, high: next(draws))
        assert free_port() == spare


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernels_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_low, kernel_high = ephemeral_range()
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports._LOWEST + 10, kernel_high))
    picked = free_ports(3)
    assert len(set(picked)) == 3
    assert all(kernel_low <= port <= kernel_high for port in picked), picked


def test_a_range_with_every_port_taken_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_pick_range", lambda: (busy, busy + 1))
        with pytest.raises(OSError, match="no free port"):
            free_port()


def test_a_listener_makes_a_port_in_use_even_one_that_shares_it_and_a_closed_one_does_not() -> None:
    port = free_port()
    assert not port_in_use(LOOPBACK, port)
    with socket.socket() as listener:
        # As gRPC and Envoy bind: a second server with SO_REUSEPORT would share the port unawares.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((LOOPBACK, port))
        listener.listen()
        assert port_in_use(LOOPBACK, port)
        assert port_in_use("0.0.0.0", port)  # every interface includes the loopback one
        with socket.create_connection((LOOPBACK, port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's end closes first: its side of the port waits in TIME_WAIT
            client.recv(1)
    assert not port_in_use(LOOPBACK, port)  # stopped: a server may bind it again at once
