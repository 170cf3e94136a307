"""The event loop's CPU priority (``server.loop_priority_boost``): the loop's thread alone is
boosted, and the processes started afterwards run at the process's own priority."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from inferline.core import processes
from inferline.gateway.embedded import may_raise_priority

# In a fresh interpreter: the boost is for the life of a thread, not to be left on the test's.
SCRIPT = textwrap.dedent(
    """
    import os, subprocess, threading
    from inferline.core import processes

    def nice(command_prefix=()):
        return int(subprocess.run(["sh", "-c", "cut -d' ' -f19 /proc/self/stat"], capture_output=True,
                                  text=True, **dict(command_prefix)).stdout)

    waiting = threading.Event()  # a thread started before the boost keeps its priority
    other = threading.Thread(target=waiting.wait)
    other.start()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    boosted = processes.boost_this_thread(5)
    print(base, boosted, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
          os.getpriority(os.PRIO_PROCESS, other.native_id),
          nice([("preexec_fn", processes.at_base_priority)]), nice())
    waiting.set()
    """
)


def test_only_the_loops_thread_is_boosted_and_children_start_at_the_process_priority() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    base, boosted, loop, other, child, inherited = done.stdout.split()
    base_nice = int(base)
    if not may_raise_priority(max(-20, base_nice - 5)):  # no CAP_SYS_NICE here: the boost is off
        assert (boosted, int(loop), int(child)) == ("False", base_nice, base_nice)
        return
    assert boosted == "True"
    assert int(loop) == max(-20, base_nice - 5)
    assert int(other) == base_nice  # gRPC's threads, started before, keep the process's priority
    assert int(child) == base_nice  # started through at_base_priority
    assert int(inherited) == int(loop)  # what a child would get without it


def test_without_the_privilege_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(processes, "_base_niceness", None)
    monkeypatch.setattr(processes.os, "setpriority", refused)
    assert not processes.boost_this_thread(5)
    processes.at_base_priority()  # nothing was boosted: nothing to undo, and no call made
    assert processes._base_niceness is None


def test_a_boost_of_zero_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(processes.os, "setpriority", lambda *args: calls.append(args))
    assert not processes.boost_this_thread(0)
    assert calls == []
