"""Train the two demo models of route ``driver_ranking`` and write them as ONNX.

Run from the repository root with the services environment:
``.venv/bin/python triton_models/train_driver_models.py``. Deterministic: the same
seed gives the same weights, so the committed ``.onnx`` files can be regenerated.

The models are tiny, so they are trained with plain numpy (full-batch Adam) and the
graph is written with ``onnx.helper``: a training framework would be a large
dependency for a 4→16→1 MLP, and writing the graph by hand lets us bake the input
normalisation into it and fix the tensor names and shapes Triton's config declares.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inferline.demo.driver_data import LIGHT_FEATURES, PRIMARY_FEATURES, training_set

HERE = pathlib.Path(__file__).resolve().parent
HIDDEN = 16


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _adam_fit(params: list[np.ndarray], grad_fn, steps: int, lr: float = 0.03) -> None:  # type: ignore[no-untyped-def]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = grad_fn()
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            p -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean, std = x.mean(0), x.std(0)
    xn = (x - mean) / std
    w1 = rng.normal(0, 0.5, (x.shape[1], HIDDEN)).astype(np.float64)
    b1 = np.zeros(HIDDEN)
    w2 = rng.normal(0, 0.5, (HIDDEN, 1))
    b2 = np.zeros(1)
    yy = y[:, None]

    def grads() -> list[np.ndarray]:
        h = np.maximum(xn @ w1 + b1, 0.0)
        p = _sigmoid(h @ w2 + b2)
        d2 = (p - yy) / len(xn)
        dh = (d2 @ w2.T) * (h > 0)
        return [xn.T @ dh, dh.sum(0), h.T @ d2, d2.sum(0)]

    _adam_fit([w1, b1, w2, b2], grads, steps=400)
    return {"mean": mean, "std": std, "w1": w1, "b1": b1, "w2": w2, "b2": b2}


def train_logistic(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    mean, std = x.mean(0), x.std(0)
    xn = (x - mean) / std
    w = np.zeros((x.shape[1], 1))
    b = np.zeros(1)
    yy = y[:, None]

    def grads() -> list[np.ndarray]:
        d = (_sigmoid(xn @ w + b) - yy) / len(xn)
        return [xn.T @ d, d.sum(0)]

    _adam_fit([w, b], grads, steps=300)
    return {"mean": mean, "std": std, "w1": w, "b1": b}


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def to_onnx(params: dict[str, np.ndarray], num_features: int, name: str) -> onnx.ModelProto:
    """Graph: score = sigmoid(mlp((features - mean) / std)), input [N, F] → output [N, 1]."""
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("MatMul", ["normed", "w1"], ["z1"]),
        helper.make_node("Add", ["z1", "b1"], ["a1"]),
    ]
    inits = [_init(k, params[k]) for k in ("mean", "std", "w1", "b1")]
    last = "a1"
    if "w2" in params:
        nodes += [
            helper.make_node("Relu", ["a1"], ["h1"]),
            helper.make_node("MatMul", ["h1", "w2"], ["z2"]),
            helper.make_node("Add", ["z2", "b2"], ["a2"]),
        ]
        inits += [_init("w2", params["w2"]), _init("b2", params["b2"])]
        last = "a2"
    nodes.append(helper.make_node("Sigmoid", [last], ["score"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", num_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we pin, old and new
    onnx.checker.check_model(model)
    return model


def main() -> None:
    x, y = training_set()
    light_cols = [PRIMARY_FEATURES.index(f) for f in LIGHT_FEATURES]
    primary = to_onnx(train_mlp(x, y), len(PRIMARY_FEATURES), "driver_ranker")
    light = to_onnx(train_logistic(x[:, light_cols], y), len(LIGHT_FEATURES), "driver_ranker_light")
    onnx.save(primary, HERE / "driver_ranker" / "1" / "model.onnx")
    onnx.save(light, HERE / "driver_ranker_light" / "1" / "model.onnx")


if __name__ == "__main__":
    main()
