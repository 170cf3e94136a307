"""The load generators' processes: where they run and at which priority (real child processes)."""

from __future__ import annotations

import os
import pathlib

from inferline.bench.multiproc import Generators
from tests.waiting import wait_until


def test_generators_run_pinned_and_at_the_niceness_asked() -> None:
    cpu = min(os.sched_getaffinity(0))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lower = min(base + 3, 19)  # any process may lower its own priority
    with Generators(2, name="test-gen", cpus=frozenset({cpu}), nice=lower) as gens:
        pids = [proc.pid for proc in gens.procs]
        # Each sets its affinity and niceness first thing, before it waits for a job.
        wait_until(lambda: all(os.getpriority(os.PRIO_PROCESS, pid) == lower for pid in pids), "niceness set")
        assert all(os.sched_getaffinity(pid) == {cpu} for pid in pids)
        # A session of their own, whose autogroup (where the kernel has them) gets the niceness:
        # across sessions the kernel weighs autogroups, not processes.
        assert all(os.getsid(pid) == pid for pid in pids)
        autogroups = [pathlib.Path(f"/proc/{pid}/autogroup") for pid in pids]
        assert all(not path.exists() or path.read_text().split()[-1] == str(lower) for path in autogroups)
    with Generators(1, name="test-gen") as plain:  # by default they inherit this process's
        pid = plain.procs[0].pid
        wait_until(lambda: plain.procs[0].is_alive(), "generator started")
        assert os.getpriority(os.PRIO_PROCESS, pid) == base
        assert os.getsid(pid) == os.getsid(0)  # and this process's session
