"""Whether a process is still there, by its pid; and the CPU priority of the event loop's
thread and of the processes a router starts.

**The event loop's priority** (``server.loop_priority_boost``). A router's event loop runs
every handler; gRPC's own threads (its event engine's and the completion-queue poller) only
move bytes and events to and from it. On cores shared with Envoy, Triton and other
processes, the loop waited for a CPU about as long as it ran (at 2× the KServe front door's
knee on 2 cores: 8.4–8.8 s run and 8.0–8.6 s runnable-but-waiting in 18 s, its threads'
``/proc/<pid>/task/<tid>/schedstat``), and calls waited in gRPC's transport meanwhile. So
once serving, the loop's thread alone takes a few steps of niceness up
(``boost_this_thread``): a thread's niceness is its own on Linux, so gRPC's threads, already
started, keep theirs.

**Children.** A process (and a thread) starts at the niceness of the thread that creates it,
so a process the router starts after the boost (a Triton its supervisor restarts, Envoy, a
BatchJobs child, ``--workers`` processes) would inherit the loop's. Each is started with
``nice_prefix`` before its command instead: ``nice -n K`` puts it back at the process's own
niceness (or ``gateway.priority_boost`` above it, for Envoy) at exec. Not a ``preexec_fn``:
one makes ``subprocess`` fork() instead of vfork(), which runs gRPC's fork handlers in a
process full of gRPC threads, and a child could die before exec (seen in CI: Envoy's
``epoll_wait error: Bad file descriptor``).

**Children end with the process** (``spawn_tethered``). ``inferline up`` stops what it started
when it stops, but a process killed outright (SIGKILL, the kernel's OOM killer) runs no code:
its Triton, Envoy and router processes went on running, Envoy holding the public port, so the
next ``inferline up`` could not serve there. So the kernel is asked to signal each child when
its parent dies (``PR_SET_PDEATHSIG``), set at exec by util-linux's ``setpriv --pdeathsig``
for the same reason ``nice`` is. The kernel sends it when the *thread* that started the child
ends, not the process: children are therefore started by one thread kept for the process's
life, never by a worker thread that may end first (asyncio's ``to_thread`` workers end with
their event loop: a Triton restarted from one would be stopped with that loop).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_base_niceness: int | None = None
"""The niceness the process ran at before ``boost_this_thread`` (None: no thread was boosted)."""
PARENT_DEATH_SIGNAL = "TERM"
"""What a tethered child gets when this process dies: SIGTERM, so Triton, Envoy and the
routers stop as they do on ``inferline up``'s own stop."""
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_pid = 0
"""The process ``_spawner`` was made in: a forked child inherits the object but not its thread."""
_spawner_lock = threading.Lock()
_tether: list[str] | None = None


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


def thread_niceness() -> int:
    """The calling thread's niceness (``getpriority`` of ``PRIO_PROCESS, 0`` is the thread's on Linux)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def base_niceness() -> int:
    """The process's own niceness: what it ran at before a thread of it was boosted."""
    return thread_niceness() if _base_niceness is None else _base_niceness


def may_raise_priority(niceness: int) -> bool:
    """Whether this process may give a thread or child the (lower, stronger) ``niceness``:
    RLIMIT_NICE allows it, or CAP_SYS_NICE, probed by raising this thread's priority and
    putting it back."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - soft <= niceness:
        return True
    current = thread_niceness()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        return False
    os.setpriority(os.PRIO_PROCESS, 0, current)
    return True


def boost_this_thread(steps: int) -> bool:
    """Lower the calling thread's niceness by ``steps`` (a stronger CPU priority; at most -20).

    Returns False, changing nothing, when ``steps`` is 0 or the process may not raise a
    priority (it needs CAP_SYS_NICE, or an RLIMIT_NICE that allows it)."""
    global _base_niceness
    if steps <= 0:
        return False
    base = thread_niceness()
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(-20, base - steps))
    except PermissionError:
        return False
    if _base_niceness is None:
        _base_niceness = base
    return True


def nice_prefix(above_base: int = 0) -> list[str]:
    """The command prefix that starts a child ``above_base`` steps of niceness above (stronger
    than) the process's own: ``["nice", "-n", str(K)]`` with K relative to the calling
    thread's niceness, which the child inherits; nothing when K is 0 (or no ``nice`` is on
    the PATH). The caller checks a stronger priority is permitted (``may_raise_priority``):
    GNU ``nice`` runs the command anyway when it is not."""
    adjustment = base_niceness() - above_base - thread_niceness()
    nice = shutil.which("nice")
    if adjustment == 0 or nice is None:
        return []
    return [nice, "-n", str(adjustment)]


class ChildBoost:
    """Starts children ``steps`` steps of niceness above the process's own (``nice_prefix``)
    where a priority that much stronger is permitted here; elsewhere at the process's own,
    saying so once (GNU ``nice`` would run the command anyway, silently at that priority).

    ``setting`` names the config key in the warning, ``fallback`` what then happens."""

    def __init__(self, steps: int, setting: str, fallback: str) -> None:
        self._steps = steps
        self._setting = setting
        self._fallback = fallback
        self._warned = False

    def prefix(self) -> list[str]:
        """The command prefix for the next child."""
        if self._steps and not may_raise_priority(base_niceness() - self._steps):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "%s %d: not permitted here (needs CAP_SYS_NICE); %s", self._setting, self._steps, self._fallback
                )
            return nice_prefix()
        return nice_prefix(self._steps)


def tether_prefix() -> list[str]:
    """The command prefix that makes the kernel send the child ``PARENT_DEATH_SIGNAL`` when its
    parent thread ends: ``setpriv --pdeathsig TERM --``; nothing where util-linux's ``setpriv``
    is missing or too old to set it (checked once, by running it)."""
    global _tether
    if _tether is None:
        setpriv = shutil.which("setpriv")
        probe = [setpriv, "--pdeathsig", PARENT_DEATH_SIGNAL, "--"] if setpriv else []
        if probe and subprocess.run([*probe, "true"], capture_output=True, check=False).returncode == 0:
            _tether = probe
        else:
            _tether = []
            logger.info("no setpriv --pdeathsig here: children may outlive a process killed outright")
    return _tether


def spawn_tethered(
    command: Sequence[str], *, priority: Callable[[], list[str]] = nice_prefix, **popen: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen([*prefixes, *command], **popen)`` for a child that ends when this
    process ends, however it ends (module docstring: "Children end with the process").

    Started on the one thread kept for it, which also calls ``priority`` for the child's
    niceness prefix (``nice_prefix``, ``ChildBoost.prefix``): a child inherits the niceness of
    the thread that starts it, so the prefix must be worked out on that thread. Blocking for
    the fork and exec, as ``Popen`` is."""
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid():  # none yet, or a forked child's copy (no thread)
            # One worker for the process's life: a ThreadPoolExecutor's threads end only at
            # its shutdown, which for this one is the interpreter's exit.
            _spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inferline-spawner")
            _spawner_pid = os.getpid()
        spawner = _spawner

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([*tether_prefix(), *priority(), *command], **popen)

    return spawner.submit(start).result()
