"""Whether a process is still there, by its pid; and the event-loop thread's CPU priority.

**The event loop's priority** (``server.loop_priority_boost``). A router's event loop runs
every handler; gRPC's own threads (its event engine's and the completion-queue poller) only
move bytes and events to and from it. On cores shared with Envoy, Triton and other
processes, the loop waited for a CPU about as long as it ran (at 2× the KServe front door's
knee on 2 cores: 8.4–8.8 s run and 8.0–8.6 s runnable-but-waiting in 18 s, its threads'
``/proc/<pid>/task/<tid>/schedstat``), and calls waited in gRPC's transport meanwhile. So
once serving, the loop's thread alone takes a few steps of niceness up
(``boost_this_thread``): a thread's niceness is its own on Linux, so gRPC's threads, already
started, keep theirs.

A child process starts at the niceness of the thread that forks it, so every process the
router starts after the boost (a Triton its supervisor restarts, Envoy, a BatchJobs child,
``--workers`` processes) is started through ``at_base_priority``: back at the process's own
niceness before it runs, as it would have been without the boost.
"""

from __future__ import annotations

import os
import threading

_base_niceness: int | None = None
"""The niceness the process ran at before ``boost_this_thread`` (None: no thread was boosted)."""


def pid_alive(pid: int) -> bool:
    """True while ``pid`` names a live process (or a zombie not yet reaped), also one owned
    by another user (signal 0 checks existence and permission, and sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boost_this_thread(steps: int) -> bool:
    """Lower the calling thread's niceness by ``steps`` (a stronger CPU priority; at most -20).

    Returns False, changing nothing, when ``steps`` is 0 or the process may not raise a
    priority (it needs CAP_SYS_NICE, or an RLIMIT_NICE that allows it)."""
    global _base_niceness
    if steps <= 0:
        return False
    thread = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, thread)
    try:
        os.setpriority(os.PRIO_PROCESS, thread, max(-20, base - steps))
    except PermissionError:
        return False
    if _base_niceness is None:
        _base_niceness = base
    return True


def at_base_priority() -> None:
    """``preexec_fn`` of a child process: start at the niceness the process had before a
    thread of it was boosted (lowering a priority needs no privilege). A no-op otherwise."""
    if _base_niceness is not None:
        os.setpriority(os.PRIO_PROCESS, 0, _base_niceness)
