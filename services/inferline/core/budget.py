"""Per-layer deadlines carved out of the caller's deadline, keeping the fallback reserve whole."""

from __future__ import annotations

from inferline.core.deadline import Deadline


def layer_deadline(deadline: Deadline, budget_s: float, reserved_after_s: float) -> Deadline:
    """The deadline of one layer: ``min(now + its budget, caller's deadline − what later layers reserve)``.

    ``reserved_after_s`` is the time the layers after this one (and the fallback reserve)
    must keep, so the main path never spends what a degraded answer needs.
    """
    return Deadline(min(deadline.clock() + budget_s, deadline.expires_at - reserved_after_s), deadline.clock)
