"""A Triton model repository for the prepared model (`run.py export-triton`), so that a user's own
Triton serves exactly what the triton engine sends and expects: the uint8 NHWC input with the
preprocessing inside the graph, and the model's raw outputs.

    OUT/<name>/config.pbtxt      backend onnxruntime, max_batch_size, dynamic batching, instance group
    OUT/<name>/1/model.onnx      the prepared graph (pipeline.model.prepare_model)

and with `--tensorrt`, where TensorRT is installed, OUT/<name>_tensorrt/ with a plan built by the
tensorrt engine (one optimization profile, the config's precision) for Triton's tensorrt backend,
on the GPU. A plan only loads in the TensorRT version that built it: the server's must match.

`config.pbtxt` is built as Triton's own `ModelConfig` protobuf (from tritonclient) and written in
its text format, so every field name is one Triton knows.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.model import PreparedModel

# ONNX TensorProto element types -> Triton data types
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                 10: "TYPE_FP16", 11: "TYPE_FP64"}


def default_model_name(model_path: Path) -> str:
    """The name a model has on the server unless `engine.triton.model_name` says otherwise."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model_path).stem) or "model"


def model_config(model: PreparedModel, name: str, max_batch: int, instances: int, queue_delay_us: int, kind: str = "KIND_CPU",
                 backend: str = "onnxruntime"):
    """Triton's ModelConfig message for the prepared model (served by `backend`: onnxruntime or tensorrt)."""
    import onnx
    from tritonclient.grpc import model_config_pb2 as pb

    graph = onnx.load_from_string(model.onnx_bytes).graph
    batching = model.batch_dynamic and max_batch > 1

    def dims(value) -> list[int]:
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        return shape[1:] if batching else [1, *shape[1:]]  # without batching the batch dim is part of the shape

    config = pb.ModelConfig(name=name, backend=backend, max_batch_size=max_batch if batching else 0)
    for value in graph.input:
        if value.name == model.input_name:
            config.input.add(name=value.name, data_type=pb.DataType.Value(_TRITON_TYPES[value.type.tensor_type.elem_type]),
                             dims=dims(value))
    for value in graph.output:
        elem = value.type.tensor_type.elem_type
        if elem not in _TRITON_TYPES:
            raise UsageError(f"export-triton: output {value.name!r} has ONNX type {elem}, which Triton's onnxruntime backend does not serve")
        config.output.add(name=value.name, data_type=pb.DataType.Value(_TRITON_TYPES[elem]), dims=dims(value))
    if batching:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    return config


def write_repository(model: PreparedModel, out: Path, name: str, max_batch: int, instances: int,
                     queue_delay_us: int = 1000, kind: str = "KIND_CPU", plan: bytes | None = None) -> Path:
    """Write the repository; returns the model's folder. An existing model folder is refused, not mixed.
    With `plan` (a serialized TensorRT engine of the prepared model) the model is `model.plan` for
    Triton's tensorrt backend instead of `model.onnx` for its onnxruntime backend."""
    from google.protobuf import text_format

    folder = Path(out) / name
    if (folder / "config.pbtxt").exists():
        raise UsageError(f"export-triton --out {out}: {folder} already holds a model; remove it or choose another --out")
    try:
        (folder / "1").mkdir(parents=True, exist_ok=True)
        if plan is None:
            (folder / "1" / "model.onnx").write_bytes(model.onnx_bytes)
        else:
            (folder / "1" / "model.plan").write_bytes(plan)
        config = model_config(model, name, max_batch, instances, queue_delay_us, kind,
                              "onnxruntime" if plan is None else "tensorrt")
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"export-triton --out {out}: cannot write the repository ({exc.strerror or exc})") from None
    return folder
