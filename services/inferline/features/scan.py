"""``ScanPart``: a slice of a whole-view scan of the online store (``feast_direct.ReadPlan.scan``).

A module of its own, free of Feast: a batch job's read processes send these to the job's
process, which unpickles them, and importing Feast there for it (as importing
``feast_direct`` would) cost the job ~0.4 s at its first scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ScanPart:
    """A slice of a whole-view scan, one entry per stored value: its entity, its ref's column
    (the index in the scan's refs) and the value."""

    ids: npt.NDArray[Any]
    """int64 for int64 entities, else objects (str, int)."""
    columns: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]
