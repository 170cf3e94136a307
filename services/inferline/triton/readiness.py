"""``ModelReadiness``: which models Triton says are ready, refreshed in the background.

Route selection must not pick a variant Triton has not loaded (a GPU variant on a machine
without a GPU, a model an operator unloaded). Asking Triton on every request would add a
round trip to the hot path, so a background task asks every ``interval_s`` and the hot
path reads a set.

Only Triton's explicit answer "not ready" marks a model unready. When Triton does not
answer at all, nothing changes: an unreachable server is the supervisor's and the circuit
breakers' business, and a slow readiness answer under overload must not take every
variant out of selection.

Models are named by variant ref (``VariantConfig.ref``): ``ranker`` asks Triton about the
model (any version), ``ranker:2`` about its version 2. A ref that turns ready after being
unready (a pinned version ``inferline models load`` has just loaded, a model that failed
to load and now has) is handed to ``on_ready`` (the router's warm-up) before it is
reported ready: route selection sends it traffic only once it is warm.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from inferline.core.background import BackgroundTask, every
from inferline.core.config import split_ref
from inferline.core.errors import DependencyUnavailable, InferlineError

logger = logging.getLogger(__name__)


class ReadinessSource(Protocol):
    async def model_ready(self, name: str, version: str = "") -> bool: ...


class ModelReadiness:
    """``models`` are ready until Triton says otherwise; ``optional_models`` (per-class copies,
    which a Triton run elsewhere may not have) only once Triton has said they are.

    ``on_ready(ref)`` runs (awaited, its failures logged) before a ref that was unready is
    reported ready."""

    def __init__(
        self,
        source: ReadinessSource,
        models: Iterable[str],
        interval_s: float = 2.0,
        optional_models: Iterable[str] = (),
        on_ready: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._source = source
        self._optional = frozenset(optional_models)
        self._models = tuple(dict.fromkeys([*models, *self._optional]))
        self._interval_s = interval_s
        self._on_ready = on_ready
        self._unready: frozenset[str] = self._optional
        self._task = BackgroundTask("model-readiness", every(interval_s, self.refresh, "model readiness refresh"))

    def is_ready(self, model: str) -> bool:
        """False after Triton said the model is not ready (or, for an optional model, until it said it is)."""
        return model not in self._unready

    async def refresh(self) -> None:
        """Ask Triton about every model once."""
        unready = set(self._unready)
        for model in self._models:
            try:
                ready = await self._source.model_ready(*split_ref(model))
            except InferlineError as err:
                if not isinstance(err, DependencyUnavailable) or model in self._optional:
                    unready.add(model)  # Triton does not know it, or an optional model it did not confirm
                continue  # no answer: keep what we knew
            if ready:
                if model in unready and self._on_ready is not None:
                    await self._warm(model)
                unready.discard(model)
            else:
                unready.add(model)
        if unready != self._unready:
            logger.info("models not ready on Triton: %s", sorted(unready) or "none")
        self._unready = frozenset(unready)

    def mark_unready(self, model: str) -> None:
        """Triton answered a call of ``model`` that it is not loaded: out of selection now, not
        at the next refresh (which brings it back, warmed up, once Triton says it is ready)."""
        if model in self._models and model not in self._unready:
            self._unready = self._unready | {model}
            logger.info("%s is not loaded on Triton any more: out of route selection", model)

    async def _warm(self, model: str) -> None:
        assert self._on_ready is not None
        try:
            await self._on_ready(model)
        except Exception:  # a failed warm-up must not keep a loaded model out of selection
            logger.exception("warm-up of %s before its first call failed", model)

    async def start(self) -> None:
        """Refresh once now, then every ``interval_s`` in the background."""
        await self.refresh()
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
