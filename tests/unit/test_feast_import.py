"""Feast loaded after ``inferline`` skips typeguard's instrumentation of Feast's own classes, and
only of those (each case in a fresh interpreter: this one has imported both already)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

INSTRUMENTED = "'typeguard._functions' in feast.FeatureView.__init__.__code__.co_names"
"""typeguard's recompiled methods call its checks, named among the code's globals."""


def run(code: str, where: pathlib.Path) -> str:
    script = where / "script.py"  # a file: typeguard instruments from the source
    script.write_text(textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_feast_imported_after_inferline_is_not_instrumented(tmp_path: pathlib.Path) -> None:
    assert run(f"import inferline, feast; print({INSTRUMENTED})", tmp_path) == "False"
    # The same import with typeguard's decorator untouched is instrumented: what is skipped.
    assert run(f"import feast; print({INSTRUMENTED})", tmp_path) == "True"


def test_feast_still_raises_its_own_errors(tmp_path: pathlib.Path) -> None:
    code = """
        import inferline
        from feast import FeatureView
        try:
            FeatureView(name="v", source=42)
        except Exception as err:
            print(type(err).__name__, err)
    """
    assert run(code, tmp_path) == "TypeError source must be a DataSource, a FeatureView, or a list of FeatureView."


def test_everything_else_decorated_is_still_checked(tmp_path: pathlib.Path) -> None:
    code = """
        import inferline, feast
        from typeguard import TypeCheckError, typechecked

        @typechecked
        def half(x: int) -> int:
            return x // 2

        @typechecked(collection_check_strategy=None)
        def double(x: int) -> int:
            return x * 2

        failed = []
        for checked in (half, double):
            try:
                checked("4")
            except TypeCheckError:
                failed.append(checked.__name__)
        print(",".join(failed))
    """
    assert run(code, tmp_path) == "half,double"
