"""The event loop's CPU priority (``server.loop_priority_boost``): the loop's thread alone is
boosted, and the processes it starts afterwards (through ``nice_prefix``) run at the
process's own priority, or the asked number of steps above it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from inferline.core import processes

# In a fresh interpreter: the boost is for the life of a thread, not to be left on the test's.
SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, threading
    from inferline.core import processes

    def child_nice(prefix):
        command = [*prefix, "sh", "-c", "cut -d' ' -f19 /proc/self/stat"]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    waiting = threading.Event()  # a thread started before the boost keeps its priority
    other = threading.Thread(target=waiting.wait)
    other.start()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = processes.nice_prefix()
    boosted = processes.boost_this_thread(5)
    print(json.dumps({
        "base": base, "boosted": boosted, "prefix_before": before,
        "loop": processes.thread_niceness(), "base_after": processes.base_niceness(),
        "other": os.getpriority(os.PRIO_PROCESS, other.native_id),
        "at_base": child_nice(processes.nice_prefix()),
        "above_base": child_nice(processes.nice_prefix(2)),
        "inherited": child_nice([]),
    }))
    waiting.set()
    """
)


def test_only_the_loops_thread_is_boosted_and_children_start_at_the_process_priority() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(done.stdout)
    base = seen["base"]
    assert seen["prefix_before"] == []  # nothing boosted yet: children need no prefix
    assert seen["base_after"] == base
    assert seen["other"] == base  # gRPC's threads, started before, keep the process's priority
    assert seen["at_base"] == base  # started through nice_prefix()
    if not processes.may_raise_priority(max(-20, base - 5)):  # no CAP_SYS_NICE here: the boost is off
        assert (seen["boosted"], seen["loop"], seen["inherited"]) == (False, base, base)
        return
    assert seen["boosted"] is True
    assert seen["loop"] == max(-20, base - 5)
    assert seen["above_base"] == max(-20, base - 2)  # Envoy's gateway.priority_boost, from the boosted thread
    assert seen["inherited"] == seen["loop"]  # what a child would get without the prefix


def test_without_the_privilege_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(processes, "_base_niceness", None)
    monkeypatch.setattr(processes.os, "setpriority", refused)
    assert not processes.boost_this_thread(5)
    assert processes._base_niceness is None
    assert processes.nice_prefix() == []  # nothing was boosted: nothing to undo


def test_a_boost_of_zero_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(processes.os, "setpriority", lambda *args: calls.append(args))
    assert not processes.boost_this_thread(0)
    assert calls == []


def test_a_child_below_the_calling_thread_gets_a_positive_adjustment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_base_niceness", 0)
    monkeypatch.setattr(processes, "thread_niceness", lambda: -5)
    prefix = processes.nice_prefix()
    assert prefix[1:] == ["-n", "5"] and prefix[0].endswith("nice")
    assert processes.nice_prefix(5) == []  # Envoy 5 steps above the base: the loop's own level
    assert processes.nice_prefix(7)[1:] == ["-n", "-2"]


def test_a_stronger_priority_is_only_prefixed_where_it_is_permitted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(processes, "_base_niceness", 0)
    monkeypatch.setattr(processes, "thread_niceness", lambda: 0)
    asked: list[int] = []

    def allowed_down_to(floor: int) -> Callable[[int], bool]:
        def may_raise(niceness: int) -> bool:
            asked.append(niceness)
            return niceness >= floor

        return may_raise

    monkeypatch.setattr(processes, "may_raise_priority", allowed_down_to(-5))
    assert processes.ChildBoost(5, "x.boost", "at its own").prefix()[1:] == ["-n", "-5"]
    refused = processes.ChildBoost(6, "x.boost", "it runs at its own priority")
    # Not permitted: the child starts at the process's own priority, and that is said once.
    assert refused.prefix() == refused.prefix() == processes.nice_prefix() == []
    assert asked == [-5, -6, -6]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["x.boost 6: not permitted here (needs CAP_SYS_NICE); it runs at its own priority"]
    assert processes.ChildBoost(0, "x.boost", "").prefix() == []  # no boost asked: nothing to check
    assert asked == [-5, -6, -6]
