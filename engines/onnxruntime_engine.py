"""ONNX Runtime on the CPU: the embedded default that runs on any machine."""

from __future__ import annotations

import numpy as np

from engines.base import Engine, TensorSpec
from pipeline.errors import ModelError
from pipeline.model import PreparedModel, ort_message

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), shape)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, model: PreparedModel, max_batch: int, intra_op_threads: int = 0, inter_op_threads: int = 1,
                 spin: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ONNX Runtime's pool threads busy-wait after each run by default; in a pipeline that steals
        # the cores the decoder and letterbox threads need, so spinning is off unless asked for
        spin_flag = "1" if spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin_flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin_flag)
        try:
            self.session = ort.InferenceSession(model.onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"model.path: ONNX Runtime cannot load the model: {ort_message(exc)}") from None
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self._input_name = model.input_name
        self.max_batch = max_batch if model.batch_dynamic else 1

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self._input_name: images})
