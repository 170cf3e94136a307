"""Feast imported without typeguard's instrumentation of Feast's own classes.

Why: Feast decorates its classes (``FeatureView``, ``DataSource``, ``OnDemandFeatureView``, …)
with typeguard's ``@typechecked``, which recompiles every annotated method from its source
when the module is imported and type-checks each call afterwards. Measured here
(2026-12-04, ``python -c "import feast, feast.infra.online_stores.sqlite"``): 3.3 s with it,
1.15 s without — paid by every process that reads features: the router, each batch job and
its feature read processes, the feature server, every CLI command that loads a store. The
checks are a development aid of Feast's (typeguard's documentation: the decorator "is a
no-op" in optimised mode, "not meant to be run in production"); Feast never catches their
errors to decide anything.

``install`` (called when the ``inferline`` package is imported) puts a finder first on
``sys.meta_path`` that does nothing until ``feast`` is imported; then, before Feast's
modules bind ``from typeguard import typechecked``, it wraps that decorator so that it
returns Feast's own classes and functions as they are. Anything else decorated in the
process — the caller's own code, other libraries — is instrumented as before. Not running
the whole process with ``-O`` (which turns every ``@typechecked`` off): that would strip the
``assert`` statements too. A process that imported Feast before ``inferline`` keeps Feast
instrumented (only slower).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_FEAST = "feast"


def _is_feasts(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module == _FEAST or module.startswith(_FEAST + ".")


def _leave_feast_unchecked() -> None:
    try:
        import typeguard
    except ImportError:  # a Feast that no longer needs it: nothing to leave out
        return

    checked = typeguard.typechecked
    if getattr(checked, "_inferline_leaves_feast", False):
        return

    def typechecked(target: Any = None, **options: Any) -> Any:
        if target is None:  # @typechecked(...) with options: the decorator it returns
            return lambda decorated: typechecked(decorated, **options)
        return target if _is_feasts(target) else checked(target, **options)

    typechecked._inferline_leaves_feast = True  # type: ignore[attr-defined]
    typeguard.typechecked = typechecked


class _BeforeFeast(importlib.abc.MetaPathFinder):
    """Finds nothing; on an import of ``feast`` it wraps typeguard's decorator first.

    It stays on ``sys.meta_path`` (a string comparison per import): the import system walks
    that very list while it asks this finder, so taking it out there would skip the next one.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == _FEAST:
            _leave_feast_unchecked()
        return None  # the usual finders find Feast


_finder = _BeforeFeast()


def install() -> None:
    """Leave Feast's classes uninstrumented once it is imported (see the module docstring)."""
    if _FEAST in sys.modules or _finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _finder)
