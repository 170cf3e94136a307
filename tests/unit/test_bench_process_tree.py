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


# A child that, told on stdin, takes 200 MB (touched, so resident), says so, and waits.
_GROWER = (
    "import sys; sys.stdin.readline(); block = bytearray(200 * 2**20); "
    "block[:: 4096] = b'x' * len(block[:: 4096]); print('grown', flush=True); sys.stdin.read()"
)


def test_pss_is_read_again_when_the_tree_grows_not_only_on_its_interval() -> None:
    child = subprocess.Popen([sys.executable, "-c", _GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    memory = TreeMemory(child.pid, interval_s=0.01, pss_interval_s=3600)  # by its interval: the first reading only
    try:
        memory.start()
        deadline = time.monotonic() + WITHIN_S
        while not memory.peak_pss:
            assert time.monotonic() < deadline, "no first PSS reading within the wait"
            memory.join(0.01)
        before = memory.peak_pss
        child.stdin.write("grow\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "grown"
        while memory.peak_pss < before + 150 * 2**20:
            assert time.monotonic() < deadline, f"PSS {memory.peak_pss} never read again after 200 MB more"
            memory.join(0.01)
        # RSS saw the growth too (not compared with PSS: statm's counters lag the page walk's
        # by up to a few pages per thread, so a reading of one may pass the other's).
        assert memory.peak_rss >= before + 150 * 2**20
    finally:
        memory.stop()
        child.stdin.close()
        child.wait(timeout=WITHIN_S)
        child.stdout.close()
