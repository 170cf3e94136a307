"""The benchmarks' view of a process tree: children, descendants, and their summed memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from inferline.bench.process_tree import TreeMemory, children, descendants
from tests.waiting import WITHIN_S

# A child that starts a grandchild, prints the grandchild's pid, and waits on stdin.
_PARENT = (
    "import subprocess, sys; "
    "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE); "
    "print(g.pid, flush=True); sys.stdin.read(); g.stdin.close(); g.wait()"
)


def test_descendants_reach_the_grandchildren_and_memory_sums_over_them() -> None:
    child = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        grandchild = int(child.stdout.readline())
        assert children(os.getpid()) >= {child.pid}
        assert children(child.pid) == {grandchild}
        assert descendants(child.pid) == {child.pid, grandchild}
        memory = TreeMemory(child.pid, interval_s=0.01)
        memory.start()
        single = TreeMemory(grandchild, interval_s=0.01)
        single.start()
        deadline = time.monotonic() + WITHIN_S
        while not (memory.peak_rss and single.peak_rss):  # each has sampled the tree at least once
            assert time.monotonic() < deadline, "no sample within the wait"
            memory.join(0.01)
        memory.stop()
        single.stop()
        assert memory.peak_rss > single.peak_rss > 0  # two Pythons against one
        assert memory.peak_pss > 0
    finally:
        child.stdin.close()
        child.wait(timeout=WITHIN_S)
        child.stdout.close()
    assert descendants(child.pid) == {child.pid}  # gone: nothing below it
