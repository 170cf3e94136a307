"""``ModelReadiness`` alone, with a fake Triton readiness source."""

from __future__ import annotations

from inferline.core.errors import DependencyUnavailable
from inferline.triton.readiness import ModelReadiness


class FakeTriton:
    def __init__(self) -> None:
        self.ready: dict[str, bool] = {}
        self.reachable = True

    async def model_ready(self, name: str, version: str = "") -> bool:
        if not self.reachable:
            raise DependencyUnavailable("Triton unreachable")
        return self.ready.get(name, False)


async def test_models_are_ready_until_triton_says_otherwise() -> None:
    triton = FakeTriton()
    readiness = ModelReadiness(triton, ["cpu", "gpu"])
    assert readiness.is_ready("gpu"), "optimistic before the first answer"
    triton.ready = {"cpu": True, "gpu": False}
    await readiness.refresh()
    assert readiness.is_ready("cpu") and not readiness.is_ready("gpu")
    triton.ready["gpu"] = True
    await readiness.refresh()
    assert readiness.is_ready("gpu")


async def test_an_unreachable_triton_changes_nothing() -> None:
    triton = FakeTriton()
    triton.ready = {"cpu": True, "gpu": False}
    readiness = ModelReadiness(triton, ["cpu", "gpu"])
    await readiness.refresh()
    triton.reachable = False
    await readiness.refresh()
    assert readiness.is_ready("cpu") and not readiness.is_ready("gpu")


async def test_start_refreshes_at_once_and_stop_ends_the_task() -> None:
    triton = FakeTriton()
    readiness = ModelReadiness(triton, ["gpu"], interval_s=60)
    await readiness.start()
    assert not readiness.is_ready("gpu")
    await readiness.stop()
    await readiness.stop()  # idempotent


async def test_optional_models_are_ready_only_once_triton_says_so() -> None:
    triton = FakeTriton()
    readiness = ModelReadiness(triton, ["cpu"], optional_models=["cpu__batch"])
    assert readiness.is_ready("cpu") and not readiness.is_ready("cpu__batch")
    triton.reachable = False
    await readiness.refresh()
    assert not readiness.is_ready("cpu__batch")
    triton.reachable = True
    triton.ready = {"cpu": True, "cpu__batch": True}
    await readiness.refresh()
    assert readiness.is_ready("cpu__batch")
