"""The committed generated code must equal what the .proto files generate now."""

import filecmp
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", ["inferline/v1", "inferline/internal/v1"])
def test_generated_code_is_fresh(tmp_path: pathlib.Path, package: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True, capture_output=True
    )
    fresh = tmp_path / package
    committed = ROOT / "services" / package
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code, run `make proto`: {mismatch + errors}"
