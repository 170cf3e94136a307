"""Who answered a request: the primary path or one of the degradation steps."""

from __future__ import annotations

import enum


class ServedBy(enum.Enum):
    PRIMARY = "PRIMARY"
    LIGHT = "LIGHT"
    CACHE = "CACHE"
    BASELINE = "BASELINE"


class Reason(enum.Enum):
    """Why an answer did not come from the primary path (``DegradationReason`` without prefix)."""

    DEADLINE = "DEADLINE"
    MODEL_ERROR = "MODEL_ERROR"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    INVALID_OUTPUT = "INVALID_OUTPUT"
    FEATURES_DEGRADED = "FEATURES_DEGRADED"
    OVERLOAD = "OVERLOAD"
