"""The services image, tested where no container engine runs: hadolint on the Dockerfile,
the build context .dockerignore leaves holds every file the Dockerfile copies, and the
package built from exactly that context installs into a fresh venv with only its declared
dependencies and runs the image's entry point (what the Dockerfile's two pip steps do).
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.fresh_venv import build_wheel, make_venv

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BIN = pathlib.Path(sys.executable).parent


def _ignore_rules() -> list[tuple[bool, str]]:
    """(.dockerignore) (exclude?, pattern) in order; the last matching rule decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((not negated, line.lstrip("!").rstrip("/")))
    return rules


def _in_context(path: str) -> bool:
    """Whether the build context keeps ``path`` (relative to the repository root).

    Docker's rules, as far as this file uses them: a pattern matches the path or any folder
    above it, ``*`` and ``**`` as in fnmatch, and the last matching pattern wins.
    """
    included = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for exclude, pattern in _ignore_rules():
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            included = not exclude
    return included


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from a stage)."""
    copies = []
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words[1:] if not w.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def _copied(source: str) -> list[str]:
    """The files ``COPY source`` takes: those it names (glob or folder) that the context keeps."""
    matched = [p for p in ROOT.glob(source) if not p.is_dir()] or [
        p for p in (ROOT / source).rglob("*") if p.is_file() or p.is_symlink()
    ]
    return [path for p in matched if _in_context(path := str(p.relative_to(ROOT)))]


def _context_files() -> list[str]:
    return [path for sources, _ in _copies() for source in sources for path in _copied(source)]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_pinned_and_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    final = stages[-1]
    users = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    assert users and users[-1] == "10001:10001"
    assert "latest" not in text
    assert re.search(r'^ENTRYPOINT \["inferline"\]$', final, re.MULTILINE)
    # Nothing is fetched at start: the runtime stage installs nothing itself.
    assert "pip install" not in final and "apt-get" not in final


def test_every_copied_file_is_in_the_build_context() -> None:
    for sources, _ in _copies():
        for source in sources:
            assert _copied(source), f"COPY {source}: nothing of it is in the build context"
    files = _context_files()
    for path in files:  # a link into a folder the context leaves out would be dangling in the image
        full = ROOT / path
        if full.is_symlink():
            target = os.path.relpath(full.resolve(), ROOT)
            assert target in files, f"{path} links to {target}, which the Dockerfile does not copy"


def test_context_rules_exclude_what_they_should() -> None:
    assert not _in_context(".venv/bin/python")
    assert not _in_context("tests/unit/test_k8s_dockerfile.py")
    assert not _in_context("deploy/feast/feature_repo/data/registry.db")
    assert not _in_context("services/inferline/__pycache__/cli.cpython-311.pyc")
    assert not _in_context("services/inferline.egg-info/PKG-INFO")
    assert _in_context("services/inferline/cli.py")


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The image's environment, built the Dockerfile's way from its build context only."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for path in _context_files():
        target = context / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, target)  # links become files, as COPY makes them
    return make_venv(build_wheel(context, work / "dist"), work / "venv")


def test_image_environment_runs_the_entry_point(image_python: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for args in (["--help"], ["serve", "--help"], ["gateway", "render", "--help"]):
        result = subprocess.run(
            [str(image_python.parent / "inferline"), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 0, f"inferline {' '.join(args)}: {result.stderr[-2000:]}"
    imports = "import inferline.app, inferline.cli, inferline.gateway, inferline.triton.executor"
    result = subprocess.run([str(image_python), "-I", "-c", imports], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
