"""The committed demo ONNX models: shape contract with Triton's configs, quality, and reproducible training."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from inferline.demo.driver_data import LIGHT_FEATURES, PRIMARY_FEATURES, training_set

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "triton_models"
LIGHT_COLUMNS = [PRIMARY_FEATURES.index(name) for name in LIGHT_FEATURES]

# model name → (feature columns, minimum accuracy on held-out data)
MODELS = {
    "driver_ranker": (list(range(len(PRIMARY_FEATURES))), 0.68),
    "driver_ranker_light": (LIGHT_COLUMNS, 0.62),
}


def session(source: str | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def score(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    scores: np.ndarray = sess.run(["score"], {"features": np.ascontiguousarray(x, dtype=np.float32)})[0]
    return scores


def load_trainer() -> ModuleType:
    """Import ``triton_models/train_driver_models.py`` by path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("train_driver_models", MODELS_DIR / "train_driver_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    return training_set(seed=99, n=5000)


@pytest.mark.parametrize("model", MODELS)
def test_committed_model_matches_triton_config(model: str) -> None:
    sess = session(str(MODELS_DIR / model / "1" / "model.onnx"))
    [inp], [out] = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape[1], inp.type) == ("features", len(MODELS[model][0]), "tensor(float)")
    assert (out.name, out.shape[1], out.type) == ("score", 1, "tensor(float)")


@pytest.mark.parametrize("model", MODELS)
def test_committed_model_scores_are_probabilities_that_beat_the_floor(
    model: str, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    columns, min_accuracy = MODELS[model]
    x, y = held_out
    scores = score(session(str(MODELS_DIR / model / "1" / "model.onnx")), x[:, columns])
    assert scores.shape == (len(x), 1)
    assert ((scores >= 0) & (scores <= 1)).all()
    accuracy = float(((scores[:, 0] > 0.5) == (y > 0.5)).mean())
    assert accuracy > min_accuracy


def test_retraining_reproduces_committed_models(held_out: tuple[np.ndarray, np.ndarray]) -> None:
    trainer = load_trainer()
    x, y = training_set()  # what train_driver_models.main() trains on
    retrained = {
        "driver_ranker": trainer.to_onnx(trainer.train_mlp(x, y), len(PRIMARY_FEATURES), "driver_ranker"),
        "driver_ranker_light": trainer.to_onnx(
            trainer.train_logistic(x[:, LIGHT_COLUMNS], y), len(LIGHT_FEATURES), "driver_ranker_light"
        ),
    }
    x_eval, _ = held_out
    for model, proto in retrained.items():
        columns = MODELS[model][0]
        committed = score(session(str(MODELS_DIR / model / "1" / "model.onnx")), x_eval[:, columns])
        fresh = score(session(proto.SerializeToString()), x_eval[:, columns])
        np.testing.assert_allclose(fresh, committed, rtol=0, atol=1e-5, err_msg=model)
