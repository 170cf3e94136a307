"""A benchmarked process's children and their memory, read from /proc (Linux).

A router under ``inferline up`` has its Triton and Envoy as children, a batch job its
feature read processes and their fork server: what a benchmark reports for "the process"
must count them too.
"""

from __future__ import annotations

import contextlib
import pathlib
import threading


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


class TreeMemory(threading.Thread):
    """Peak of the summed RSS, and of the summed PSS, of a process and all its descendants,
    sampled every ``interval_s`` until ``stop``.

    ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is the largest single process, not the sum, and misses
    descendants nobody waited for. RSS counts the pages forked workers share with their fork
    server once per process; PSS splits each shared page between its sharers."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self._root = pid
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self.peak_rss = 0
        """Bytes."""
        self.peak_pss = 0
        """Bytes."""

    def run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            rss = pss = 0
            for pid in descendants(self._root):
                with contextlib.suppress(OSError, ValueError):
                    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1]) * 1024
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def stop(self) -> None:
        self._stopped.set()
        self.join()
