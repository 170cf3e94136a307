"""``pid_alive``: a live process, and one that has ended."""

from __future__ import annotations

import os
import subprocess
import sys

from inferline.core.processes import pid_alive


def test_a_running_process_is_alive_and_an_ended_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert not pid_alive(child.pid)  # ended and reaped


def test_init_and_this_process_are_alive() -> None:
    # pid 1 exists on every Linux; a user other than root may not signal it (EPERM), and it still counts.
    assert pid_alive(1)
    assert pid_alive(os.getpid())
