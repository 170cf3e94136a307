"""``FeatureVector``: the feature matrix of one request, as every model variant consumes it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inferline.core.entities import EntityId

__all__ = ["EntityId", "FeatureVector"]


@dataclass(frozen=True, slots=True)
class FeatureVector:
    """Row-major ``[N entities, F features]`` matrix with per-cell "defaulted" flags.

    ``values`` and ``defaulted`` are shared, not copied, between the features service and
    in-process callers (``LocalFeatureClient``), so the service hands them out read-only.

    Attributes:
        names: Column names, in column order.
        values: float32 ``[N, F]``; a missing value already holds its feature's default.
        defaulted: bool ``[N, F]``; True where ``values`` holds the default, not a fetched or
            request-given value. The response reports these per entity.
        degraded: True when the store failed or missed the deadline and defaults replaced
            values that might exist (as opposed to values known to be missing).
    """

    names: tuple[str, ...]
    values: npt.NDArray[np.float32]
    defaulted: npt.NDArray[np.bool_]
    degraded: bool

    def __post_init__(self) -> None:
        shape = (self.values.shape[0] if self.values.ndim == 2 else -1, len(self.names))
        if self.values.shape != shape or self.defaulted.shape != shape:
            got = f"values {self.values.shape} and defaulted {self.defaulted.shape}"
            raise ValueError(f"{got}: both must be [rows, {len(self.names)}]")

    @property
    def rows(self) -> int:
        """Number of entities (rows)."""
        return int(self.values.shape[0])

    def defaulted_names(self, row: int) -> list[str]:
        """Names of the features of entity ``row`` that hold their default (for the response)."""
        return [name for name, flag in zip(self.names, self.defaulted[row].tolist(), strict=True) if flag]

    def select(self, names: Sequence[str]) -> FeatureVector:
        """The columns ``names``, in that order (e.g. the light model's reduced feature set).

        Raises:
            ValueError: a name is not a column of this vector.
        """
        if tuple(names) == self.names:
            return self
        position = {name: i for i, name in enumerate(self.names)}
        try:
            index = [position[name] for name in names]
        except KeyError as err:
            raise ValueError(f"feature {err.args[0]!r} is not among {list(self.names)}") from None
        return FeatureVector(tuple(names), self.values[:, index], self.defaulted[:, index], self.degraded)
