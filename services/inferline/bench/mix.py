"""Traffic mix of a load run: the share of each traffic class, drawn per request with a seeded RNG."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PRIORITIES: Mapping[str, int] = {"critical": 1, "standard": 2, "batch": 3}
"""Triton priority level of each class in deploy/local/inferline.yaml (used when no config says otherwise)."""


@dataclass(frozen=True)
class TrafficMix:
    """Traffic classes and their shares of the requests (shares need not sum to 1: they are weights)."""

    shares: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.shares:
            raise ValueError("a mix needs at least one class")
        names = [name for name, _ in self.shares]
        if len(set(names)) != len(names):
            raise ValueError(f"a class appears twice in the mix: {names}")
        if any(share < 0 for _, share in self.shares) or not any(share > 0 for _, share in self.shares):
            raise ValueError("shares must be >= 0 and at least one > 0")

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shares)

    @classmethod
    def parse(cls, spec: str) -> TrafficMix:
        """``critical=0.3,standard=0.35,batch=0.35`` → a mix (raises ValueError on a malformed spec)."""
        shares: list[tuple[str, float]] = []
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not name.strip():
                raise ValueError(f"mix entries look like class=share, got {part.strip()!r}")
            try:
                shares.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"share of {name.strip()!r} is not a number: {value!r}") from None
        return cls(tuple(shares))

    def draw(self, n: int, seed: int) -> list[int]:
        """The class (index into ``classes``) of each of ``n`` requests, drawn by the shares.

        The same seed gives the same classes, so runs that share a seed (two targets, two
        configurations) see the same mix request by request.
        """
        rng = random.Random(seed * 7919 + 17)
        return rng.choices(range(len(self.shares)), weights=[share for _, share in self.shares], k=n)

    def to_dict(self) -> dict[str, float]:
        return dict(self.shares)


DEFAULT_MIX = TrafficMix((("critical", 0.30), ("standard", 0.35), ("batch", 0.35)))
"""The issue #4 overload mix: 30 % critical, 35 % standard, 35 % batch."""
