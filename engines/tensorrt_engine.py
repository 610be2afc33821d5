"""TensorRT 10: the production engine.

ONNX (the prepared graph: uint8 NHWC input, preprocessing inside) -> OnnxParser -> builder config
(workspace limit, FP16, one optimization profile per lane over the batch range, timing cache) ->
`build_serialized_network` -> a plan cached on disk, keyed by everything that makes a plan valid:
the graph's hash, TensorRT's version, the GPU's name and compute capability, the precision and the
profile. A key that does not match is a stale plan: it is rebuilt, never loaded.

With dynamic shapes one optimization profile serves one execution context at a time, so the plan
holds K identical profiles and lane k's context uses profile k. Per batch: `set_input_shape`,
`set_tensor_address` and `execute_async_v3` on the lane's stream. With a shape-dynamic model
(rectangle letterboxing) each profile also ranges over the input's height and width: from one
stride to the square, optimised for the most common camera shape (`opt_hw`); the range is part of
the plan's key.

No TensorRT build could be installed where this project is developed or on its GPU machine: this
module is written to the TensorRT 10 Python API and its tests run only where `tensorrt` imports.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from engines.base import DeviceEngine, TensorSpec
from pipeline import cuda
from pipeline.errors import ConfigError, ModelError, PipelineError
from pipeline.model import PreparedModel

log = logging.getLogger("pipeline")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError("engine.kind is tensorrt but TensorRT is not installed: install NVIDIA's tensorrt "
                          "Python package for your CUDA version, or use engine.kind torch or onnxruntime") from None
    return trt


class _Logger:
    """TensorRT's messages go to the pipeline's log."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                level = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                         trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG}.get(severity, logging.DEBUG)
                log.log(level, "tensorrt: %s", msg)

        return Logger()


def plan_key(model: PreparedModel, trt_version: str, gpu: str, capability: tuple[int, int], fp16: bool,
             batch_range: tuple[int, int, int], lanes: int, hw_range=None) -> str:
    fields = {"onnx": model.sha256, "tensorrt": trt_version, "gpu": gpu, "sm": f"{capability[0]}.{capability[1]}",
              "precision": "fp16" if fp16 else "fp32", "batch": list(batch_range), "profiles": lanes}
    if hw_range is not None:  # (min hw, opt hw, max hw) of a shape-dynamic input
        fields["hw"] = [list(hw) for hw in hw_range]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _parser_errors(parser) -> str:
    messages = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node_name = getattr(error, "node_name", lambda: "")()
        node_op = getattr(error, "node_operator", lambda: "")()
        where = f"node {node_name or error.node()} ({node_op or '?'})"
        messages.append(f"{where}: {error.desc()}")
    return "; ".join(messages) or "unknown parser error"


class TensorRTEngine(DeviceEngine):
    name = "tensorrt"

    def __init__(self, model: PreparedModel, max_batch: int, lanes: int, fp16: bool = True, workspace_mb: int = 1024,
                 cache_dir: Path = Path("cache/tensorrt"), plugins: list[Path] = (), min_batch: int = 1,
                 opt_batch: int | None = None, device: int = 0, opt_hw: tuple[int, int] | None = None):
        trt = import_tensorrt()
        self.trt = trt
        cuda.set_device(device)
        for library in plugins:  # custom layers must be registered before the parser meets them
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                raise ModelError(f"engine.plugins: cannot load {library}: {exc}") from None
        self.logger = _Logger(trt)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.max_batch = max_batch if model.batch_dynamic else 1
        self.lanes = lanes
        batch_range = (min(min_batch, self.max_batch), min(opt_batch or self.max_batch, self.max_batch), self.max_batch)
        self.model = model
        h, w = model.input_hw
        self.warm_shapes = [(h, w)]
        # a shape-dynamic input: any multiple of the stride up to the square, tuned for the usual camera
        self.hw_range = (((model.stride, model.stride), tuple(opt_hw or (h, w)), (h, w))
                         if model.shape_dynamic else None)
        key = plan_key(model, trt.__version__, cuda.device_name(device), cuda.compute_capability(device), fp16,
                       batch_range, lanes, self.hw_range)
        cache_dir = Path(cache_dir)
        plan_path = cache_dir / f"{key}.plan"
        self.plan_path = plan_path  # run.py export-triton --tensorrt copies it into a Triton repository
        if plan_path.is_file():
            log.info("tensorrt: loading cached plan %s", plan_path.name)
            plan = plan_path.read_bytes()
        else:
            log.info("tensorrt: building a plan (%s, batch %s, %d profiles); this takes a while once",
                     "fp16" if fp16 else "fp32", batch_range, lanes)
            plan = self._build(model, fp16, workspace_mb, batch_range, lanes, cache_dir / "timing.cache")
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = plan_path.with_suffix(".tmp")
            tmp.write_bytes(plan)
            tmp.replace(plan_path)  # a crash mid-write never leaves a plan that looks valid
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelError(f"tensorrt: cannot deserialize {plan_path}; delete it to rebuild")
        self.input_name = model.input_name
        h, w = model.input_hw
        self.inputs = [TensorSpec(model.input_name, np.dtype(np.uint8), (None, h, w, 3))]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # a shape-dynamic plan reports -1 rows: buffers are sized for the square, the largest input
        self.outputs = [TensorSpec(n, np.dtype(np.float32), (None, *(model.output_shape((h, w)) if model.shape_dynamic
                                                                      else tuple(self.engine.get_tensor_shape(n))[1:])))
                        for n in self.output_names]
        for spec in self.outputs:
            if self.engine.get_tensor_dtype(spec.name) != trt.DataType.FLOAT:
                raise ModelError(f"tensorrt: output {spec.name} is not float32")

    def _build(self, model: PreparedModel, fp16: bool, workspace_mb: int, batch_range, lanes: int, timing_path: Path) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(model.onnx_bytes):
            raise ModelError(f"model.path: TensorRT cannot parse the model: {_parser_errors(parser)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if fp16:
            if not builder.platform_has_fast_fp16:
                log.warning("tensorrt: this GPU has no fast fp16; building fp16 anyway")
            config.set_flag(trt.BuilderFlag.FP16)
        lo, opt, hi = batch_range
        hw_min, hw_opt, hw_max = self.hw_range or (model.input_hw,) * 3
        for _ in range(lanes):  # one profile per lane: a profile serves one context at a time
            profile = builder.create_optimization_profile()
            profile.set_shape(model.input_name, (lo, *hw_min, 3), (opt, *hw_opt, 3), (hi, *hw_max, 3))
            config.add_optimization_profile(profile)
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError("tensorrt: the engine build failed (see the log lines above)")
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        timing_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def create_context(self, lane: int):
        context = self.engine.create_execution_context()
        if context is None:
            raise ModelError("tensorrt: cannot create an execution context (out of GPU memory?)")
        stream = cuda.Stream()
        context.set_optimization_profile_async(lane % self.engine.num_optimization_profiles, stream.ptr)
        stream.synchronize()
        stream.destroy()
        return {"context": context, "shape": None}

    def enqueue(self, context, stream_ptr: int, input_ptr: int, output_ptrs: list[int], batch: int,
                hw: tuple[int, int] | None = None) -> None:
        ctx = context["context"]
        h, w = tuple(hw) if hw is not None else self.square()
        if context["shape"] != (batch, h, w):
            if not ctx.set_input_shape(self.input_name, (batch, h, w, 3)):
                raise PipelineError(f"tensorrt: input {batch}x{h}x{w} is outside the optimization profile")
            context["shape"] = (batch, h, w)
        ctx.set_tensor_address(self.input_name, input_ptr)
        for name, ptr in zip(self.output_names, output_ptrs):
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(stream_ptr):
            raise PipelineError("tensorrt: execute_async_v3 failed")
