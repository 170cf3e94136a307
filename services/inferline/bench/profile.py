"""Where a router's CPU goes: py-spy's raw samples folded into self and inclusive shares per function.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;...;leaf N``
(outermost first, N samples). A sample is one look at one thread that was running Python or
native code on the CPU (py-spy leaves idle threads out), so the shares are of the process's
busy time. Frames that py-spy cannot see into (grpc's Cython core, the event loop's C parts)
show as their last Python caller's *self* time: a large self share of ``Runner.run`` or
``Thread.run`` is C code under the loop or in a native thread, not Python.
"""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    samples: int
    self_share: list[tuple[str, float]]
    """(function, share of samples with it as the leaf), largest first."""
    inclusive_share: list[tuple[str, float]]
    """(function, share of samples with it anywhere on the stack), largest first."""


def function_of(frame: str) -> str:
    """``name (path/to/file.py:LINE)`` → ``name (file.py)``: one entry per function, whatever the line."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    file = where.rstrip(")").rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


def fold(lines: Iterable[str], top: int = 30) -> Profile:
    """The ``top`` functions by self and by inclusive share, from py-spy's raw lines."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, sep, count = line.rstrip("\n").rpartition(" ")
        if not sep or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [function_of(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for function in set(frames):
            anywhere[function] += n
    if total == 0:
        return Profile(0, [], [])
    return Profile(
        total,
        [(f, n / total) for f, n in own.most_common(top)],
        [(f, n / total) for f, n in anywhere.most_common(top)],
    )


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used so far, its threads included."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
