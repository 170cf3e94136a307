"""Generic Triton python-backend model that runs ``<version>/model.onnx`` with onnxruntime.

Every model directory in this repository links its ``<version>/model.py`` here. The
tensor names come from the model's ``config.pbtxt`` (first input, first output), so a
new ONNX model needs only a config and the file. All requests of a dynamic batch are
concatenated and run in one ``session.run``: that is where batching pays off.

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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
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
        self.onnx_input = self.session.get_inputs()[0].name
        self.onnx_output = self.session.get_outputs()[0].name

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        scores = self.session.run([self.onnx_output], {self.onnx_input: batch.astype(np.float32, copy=False)})[0]
        if self.fault_injection == "nan_on_negative":
            scores = scores.copy()
            scores[batch[:, 0] < 0] = np.nan
            scores[batch[:, 0] < -100] = 7.0
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        offset = 0
        for array in arrays:
            n = array.shape[0]
            out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(scores[offset : offset + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            offset += n
        return responses
