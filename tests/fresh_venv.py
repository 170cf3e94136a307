"""A fresh virtual environment holding one wheel and exactly its declared dependencies.

The dependencies are links to the files of those distributions (and of theirs) in the
test's own environment: the same bytes pip would install, without a registry round-trip
per run, and nothing else. Code run there that imports an undeclared package fails.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import sysconfig
import zipfile

from packaging.requirements import Requirement


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requires_of(wheel: pathlib.Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def closure(requirements: list[str]) -> set[str]:
    """Distribution names needed by ``requirements``, recursively (markers evaluated here, no extras)."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        req = pending.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = normalise(req.name)
        if name in seen:
            continue
        seen.add(name)
        pending.extend(Requirement(r) for r in importlib.metadata.requires(req.name) or ())
    return seen


def _link_distribution(name: str, site_packages: pathlib.Path) -> None:
    dist = importlib.metadata.distribution(name)
    for file in dist.files or ():
        source = pathlib.Path(str(dist.locate_file(file))).resolve()
        if file.parts[0] == ".." or not source.is_file():
            continue  # scripts outside site-packages, and RECORD entries never written
        target = site_packages / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)


def build_wheel(source: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """``pip wheel`` of the project at ``source`` (no isolation: setuptools of this environment)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(out_dir),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out_dir.glob("*.whl")
    return wheel


def make_venv(wheel: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """A venv at ``directory`` with ``wheel`` installed and its dependency closure linked; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert pathlib.Path(purelib) != pathlib.Path(sysconfig.get_paths()["purelib"])
    for name in closure(requires_of(wheel)):
        _link_distribution(name, pathlib.Path(purelib))
    return python
