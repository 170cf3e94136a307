"""``inferline.bench.profile``: py-spy's raw stacks folded into self and inclusive shares."""

from __future__ import annotations

import os

import pytest

from inferline.bench.profile import fold, function_of, process_cpu_s

RAW = [
    "run (asyncio/runners.py:118);handle (inferline/router/kserve.py:140);check (inferline/router/kserve.py:300) 3\n",
    "run (asyncio/runners.py:118);handle (inferline/router/kserve.py:150) 1\n",
    "run (asyncio/runners.py:120) 4\n",
    "not a sample line\n",
]


def test_frames_are_one_entry_per_function_whatever_the_line() -> None:
    assert function_of("handle (inferline/router/kserve.py:140)") == "handle (kserve.py)"
    assert function_of("<native>") == "<native>"


def test_self_and_inclusive_shares_of_the_samples() -> None:
    profile = fold(RAW)
    assert profile.samples == 8
    leaves = {"run (runners.py)": 0.5, "check (kserve.py)": 0.375, "handle (kserve.py)": 0.125}
    assert dict(profile.self_share) == leaves
    inclusive = dict(profile.inclusive_share)
    assert inclusive["run (runners.py)"] == 1.0 and inclusive["handle (kserve.py)"] == 0.5
    assert fold(RAW, top=1).self_share == [("run (runners.py)", 0.5)]


def test_no_samples_is_an_empty_profile() -> None:
    assert fold(["garbage\n"]).samples == 0


def test_process_cpu_grows_with_work() -> None:
    before = process_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert process_cpu_s(os.getpid()) > before
    with pytest.raises(FileNotFoundError):
        process_cpu_s(2**22 + 12345)
