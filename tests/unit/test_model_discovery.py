import pathlib

from inferline.triton.launcher import discover_models

REPO = pathlib.Path(__file__).resolve().parents[2] / "triton_models"


def test_gpu_variants_are_skipped_without_a_gpu() -> None:
    assert discover_models(REPO, load_gpu_variants=False) == ["driver_ranker", "driver_ranker_light"]


def test_gpu_variants_are_loaded_when_asked() -> None:
    assert "driver_ranker_gpu" in discover_models(REPO, load_gpu_variants=True)


def test_gpu_variant_shares_the_primary_weights() -> None:
    gpu = (REPO / "driver_ranker_gpu/1/model.onnx").resolve()
    assert gpu == (REPO / "driver_ranker/1/model.onnx").resolve()
    assert "KIND_GPU" in (REPO / "driver_ranker_gpu/config.pbtxt").read_text()
