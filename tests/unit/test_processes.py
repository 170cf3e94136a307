"""``pid_alive``: a live process, and one that has ended. ``spawn_tethered``: a child that ends with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from inferline.core.processes import pid_alive, tether_prefix
from tests.waiting import process_running, wait_until


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


# Starts a tethered ``sleep`` from a thread that ends at once, waits until that thread is gone
# from the process (not only joined), then says whether the child outlived it; then blocks.
_PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, threading, time
    from inferline.core.processes import spawn_tethered

    started = {}
    starter = threading.Thread(target=lambda: started.update(child=spawn_tethered(["sleep", "600"])))
    starter.start()
    starter.join()
    gone_by = time.monotonic() + 10
    while len(os.listdir("/proc/self/task")) > 2 and time.monotonic() < gone_by:
        time.sleep(0.001)  # this thread and the spawner's left: the starter's OS thread has exited
    child = started["child"]
    try:
        child.wait(timeout=0.5)  # a child tied to the starter thread got its signal as that thread exited
        print(child.pid, "ended", flush=True)
    except subprocess.TimeoutExpired:
        print(child.pid, "running", flush=True)
    sys.stdin.read()
    """
)


def test_a_tethered_child_outlives_the_thread_that_started_it_and_ends_with_its_process() -> None:
    assert tether_prefix(), "setpriv --pdeathsig is part of the set-up (util-linux)"
    with subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            pid_text, state = parent.stdout.readline().split()
            child = int(pid_text)
            # Linux sends a child its parent-death signal when the thread that started it ends
            # (prctl(2)); some kernels wait for the process (this VM's 6.18 did), where this
            # check cannot tell a child started on the starter thread itself.
            assert state == "running"  # the starter thread's end did not stop it
            assert process_running(child)
            os.kill(parent.pid, signal.SIGKILL)  # no code of the parent's runs after this
            parent.wait(timeout=30)
            wait_until(lambda: not process_running(child), "the tethered child to end after its parent was killed")
        finally:
            parent.kill()
