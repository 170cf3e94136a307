"""Whether a process is still there, by its pid."""

from __future__ import annotations

import os


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
