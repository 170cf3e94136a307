"""Generic Triton python-backend model that runs ``<version>/model.onnx`` with onnxruntime.

Every model directory in this repository links its ``<version>/model.py`` here, and the
bundled server runs a standard onnxruntime directory (``platform: "onnxruntime_onnx"`` or
``backend: "onnxruntime"``) through it too: the launcher's derived repository links this
file as the directory's ``model.py`` (see ``inferline.triton.model_repository``). The
config's inputs and outputs are matched to the ONNX graph's by name, as Triton's native
onnxruntime backend does; a single input or output whose name differs is matched by
position. All requests of a dynamic batch are concatenated and run in one
``session.run``: that is where batching pays off.

Optional config parameters:
  ``fault_injection``: "nan_on_negative" makes rows whose first feature is negative
  answer NaN and rows whose first feature is below -100 answer 7.0 (out of range);
  used by the test model that proves invalid outputs never reach a caller.
  ``delay_ms``: sleep this long per execute (a slow model for fault tests).
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _match(config_names, graph_names, kind):
    """Config tensor name → graph tensor name: by name, or by position for one tensor each."""
    if all(name in graph_names for name in config_names):
        return {name: name for name in config_names}
    if len(config_names) == 1 and len(graph_names) == 1:
        return {config_names[0]: graph_names[0]}
    raise pb_utils.TritonModelException(
        f"config {kind}s {config_names} do not match the ONNX graph's {kind}s {graph_names}"
    )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.batching = int(config.get("max_batch_size", 0)) > 0
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.fault_injection = params.get("fault_injection", "")
        self.delay_s = float(params.get("delay_ms", "0")) / 1000.0
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        # One thread per instance: Triton scales with instance_group count, and
        # intra-op threads would fight each other for the same cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        graph_inputs = {i.name: _ONNX_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        graph_outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = _match([i["name"] for i in config["input"]], list(graph_inputs), "input")
        self.outputs = _match([o["name"] for o in config["output"]], graph_outputs, "output")
        self.input_types = {name: graph_inputs[graph] for name, graph in self.inputs.items()}
        self.first_input = config["input"][0]["name"]

    def execute(self, requests):
        if not self.batching:
            return [self._run([request])[0] for request in requests]
        return self._run(requests)

    def _run(self, requests):
        arrays = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs
        }
        feeds = {
            self.inputs[name]: (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(
                self.input_types[name], copy=False
            )
            for name, parts in arrays.items()
        }
        names = list(self.outputs)
        results = self.session.run([self.outputs[n] for n in names], feeds)
        if self.fault_injection == "nan_on_negative":
            first = feeds[self.inputs[self.first_input]]
            scores = results[0].copy()
            scores[first[:, 0] < 0] = np.nan
            scores[first[:, 0] < -100] = 7.0
            results[0] = scores
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        offset = 0
        for array in arrays[self.first_input]:
            n = array.shape[0] if self.batching else None
            rows = slice(offset, offset + n) if n is not None else slice(None)
            pairs = zip(names, results, strict=True)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[rows])) for name, out in pairs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += n or 0
        return responses
