"""A benchmarked process's children and their memory, read from /proc (Linux).

A router under ``inferline up`` has its Triton and Envoy as children, a batch job its
feature read processes and their fork server: what a benchmark reports for "the process"
must count them too.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import threading
import time


def children(pid: int) -> set[int]:
    """The live children of ``pid`` (of every thread of it); empty when it is gone."""
    out: set[int] = set()
    for path in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            out.update(int(x) for x in path.read_text().split())
    return out


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it."""
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {child for parent in frontier for child in children(parent)} - tree
        tree |= frontier
    return tree


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class TreeMemory(threading.Thread):
    """Peak of the summed RSS, and of the summed PSS, of a process and all its descendants,
    sampled until ``stop``.

    ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is the largest single process, not the sum, and misses
    descendants nobody waited for. RSS counts the pages forked workers share with their fork
    server once per process; PSS splits each shared page between its sharers.

    RSS is read every ``interval_s`` from ``/proc/<pid>/statm`` (a counter). PSS needs
    ``smaps_rollup``, for which the kernel walks every page of the process under its memory
    map lock: ~3.5 ms for a 600 MB process here, so reading it every 50 ms for a batch job and
    its two read processes took 16 % off the job's rate (three pairs, 1M rows). It is read
    every ``pss_interval_s``, and whenever the tree's RSS is ``pss_on_growth`` above what it
    was at the last PSS reading — where a new peak of PSS can be (a process's PSS is at most
    its RSS). The tree itself is walked again as often as PSS is read: a child started
    meanwhile counts from then on."""

    def __init__(
        self, pid: int, interval_s: float = 0.05, pss_interval_s: float = 0.5, pss_on_growth: float = 0.02
    ) -> None:
        super().__init__(daemon=True)
        self._root = pid
        self._interval_s = interval_s
        self._pss_interval_s = pss_interval_s
        self._pss_on_growth = pss_on_growth
        self._stopped = threading.Event()
        self.peak_rss = 0
        """Bytes."""
        self.peak_pss = 0
        """Bytes."""

    def run(self) -> None:
        pss_at, pss_rss = -math.inf, 0
        tree: set[int] = set()
        while not self._stopped.wait(self._interval_s):
            now = time.monotonic()
            pss_due = now - pss_at >= self._pss_interval_s
            if pss_due or not tree:
                tree = descendants(self._root)  # a walk of every thread's children: as seldom as PSS
            rss = sum(_rss(pid) for pid in tree)
            self.peak_rss = max(self.peak_rss, rss)
            if pss_due or rss > pss_rss * (1 + self._pss_on_growth):
                pss_at, pss_rss = now, rss
                self.peak_pss = max(self.peak_pss, sum(_pss(pid) for pid in tree))

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _rss(pid: int) -> int:
    """Bytes resident (0: gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return 0


def _pss(pid: int) -> int:
    """Bytes of proportional set size (0: gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0
