"""PyTorch on the GPU: the engine that needs no TensorRT, so the lanes run on any CUDA machine.

The prepared ONNX graph (uint8 NHWC input, preprocessing inside) is converted in memory with
onnx2torch and runs on the lane's own CUDA stream (`torch.cuda.ExternalStream`), reading and
writing the lane's device buffers in place (wrapped through `__cuda_array_interface__`).
Options: fp16 (autocast) and CUDA graphs (one captured graph per lane, batch bucket and input
shape; batches are padded up to the next power of two so a handful of graphs cover every size).
With rectangle letterboxing each camera shape is its own input shape: the shapes of the configured
cameras (`warm_shapes`) are captured at start, any other (a stream whose resolution changed) on
its first batch.
"""

from __future__ import annotations

import logging


import numpy as np

from engines.base import DeviceEngine, TensorSpec
from pipeline.errors import ConfigError, ModelError
from pipeline.model import PreparedModel

log = logging.getLogger("pipeline")


class _DeviceArray:
    """Lets torch view memory it did not allocate (a lane's cudaMalloc buffer) without a copy."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
                                         "strides": None}


class _LaneState:
    def __init__(self):
        self.views: dict = {}
        self.graphs: dict[tuple[int, tuple[int, int]], object] = {}  # (batch bucket, input hw) -> CUDAGraph


# onnx2torch modules that read some inputs as Python values (shapes, axes, scales) on every call
_HOST_ARGUMENT_MODULES = {"OnnxSlice", "OnnxReshape", "OnnxResize", "OnnxPadDynamic", "OnnxSplit13", "OnnxRange",
                          "OnnxUnsqueezeDynamicAxes", "OnnxReduceStaticAxes", "OnnxReduceSumDynamicAxes",
                          "OnnxConstantOfShape", "OnnxCumSum"}


def _keep_shape_constants_on_host(module) -> None:
    """Move the constant shape/axes/scale inputs of such modules back to the host.

    Left on the GPU, each read is a device-to-host sync: that serialises the lanes (the
    submitting thread waits on every call) and makes CUDA graph capture impossible.
    """
    import torch

    for node in module.graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)).__name__ not in _HOST_ARGUMENT_MODULES:
            continue
        for arg in list(node.args[1:]) + list(node.kwargs.values()):
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                owner, _, name = arg.target.rpartition(".")
                parent = module.get_submodule(owner) if owner else module
                setattr(parent, name, getattr(parent, name).cpu())


def _inline_identity_initializers(proto) -> int:
    """Replace `Identity(initializer)` nodes by a copy of the initializer under the output's name.

    PyTorch's ONNX exporter stores identical tensors once and names the others through Identity
    nodes (YOLOv8 from Ultralytics does this for equal biases); onnx2torch needs every
    convolution's weights as initializers. Returns how many nodes were inlined.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    inlined = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = type(initializers[node.input[0]])()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inlined.append(node)
    for node in inlined:
        graph.node.remove(node)
    return len(inlined)


def fp32_layers(module, first: int, last: int) -> None:
    """Run the first `first` and the last `last` convolutions (in graph order) in fp32 under autocast."""
    import torch

    class Fp32(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autocast("cuda", enabled=False):
                return self.inner(x.float())

    convs = [n.target for n in module.graph.nodes
             if n.op == "call_module" and isinstance(module.get_submodule(n.target), torch.nn.Conv2d)]
    chosen = convs[:first] + (convs[-last:] if last else [])
    for target in chosen:
        owner, _, name = target.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        setattr(parent, name, Fp32(getattr(parent, name)))


def _bucket(n: int, max_batch: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


def import_torch():
    """PyTorch and onnx2torch, or the one line that says to install them."""
    try:
        import torch
        from onnx2torch import convert
    except ImportError as exc:
        raise ConfigError(f"engine.kind is torch but {exc.name or 'torch'} is not installed: pip install torch "
                          "onnx2torch (see requirements-gpu.txt), or use engine.kind onnxruntime") from None
    return torch, convert


class TorchEngine(DeviceEngine):
    name = "torch"

    def __init__(self, model: PreparedModel, max_batch: int, fp16: bool = False, cuda_graphs: bool = False, device: int = 0,
                 fp32_first_convs: int = 16):
        torch, convert = import_torch()
        import onnx

        from pipeline import cuda

        if cuda.available():  # first, before PyTorch touches CUDA: the primary context's flags must suit NVDEC too
            cuda.set_device(device)
        if not torch.cuda.is_available():
            raise ModelError("engine.kind torch: no CUDA device is visible to PyTorch")
        self.torch = torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        try:
            proto = onnx.load_model_from_string(model.onnx_bytes)
            _inline_identity_initializers(proto)
            self.module = convert(proto).to(self.device).eval()
        except Exception as exc:
            raise ModelError(f"model.path: onnx2torch cannot convert the model: {str(exc).splitlines()[0][:200]}") from None
        _keep_shape_constants_on_host(self.module)
        self.fp16, self.cuda_graphs = fp16, cuda_graphs
        if fp16 and fp32_first_convs:
            # the first layers see raw 0-255 pixels: in fp16 their error moves scores by up to 0.1
            # (bench/fp16_precision.py); in fp32 they cost little and keep scores within ~0.02
            fp32_layers(self.module, fp32_first_convs, 0)
        if not fp16:  # fp32 means fp32: PyTorch would otherwise run convolutions in TF32 (~1e-3 error)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.max_batch = max_batch if model.batch_dynamic else 1
        self.model = model
        self.warm_shapes = [tuple(model.input_hw)]
        h, w = model.input_hw
        self.inputs = [TensorSpec(model.input_name, np.dtype(np.uint8), (None, h, w, 3))]
        with torch.inference_mode():
            probe = self.module(torch.zeros((1, h, w, 3), dtype=torch.uint8, device=self.device))
        probe = probe if isinstance(probe, (list, tuple)) else [probe]
        self.outputs = [TensorSpec(name, np.dtype(np.float32), (None, *t.shape[1:]))
                        for name, t in zip(model.output_names, probe)]

    def create_context(self, lane: int):
        return _LaneState()

    def _views(self, state: _LaneState, input_ptr: int, output_ptrs: list[int], hw: tuple[int, int]):
        """The lane's buffers as tensors of one input shape (a smaller shape uses their start)."""
        key = (input_ptr, tuple(output_ptrs), hw)
        if key not in state.views:
            torch = self.torch
            x = torch.as_tensor(_DeviceArray(input_ptr, (self.max_batch, *hw, 3), "|u1"), device=self.device)
            ys = [torch.as_tensor(_DeviceArray(p, (self.max_batch, *shape), "<f4"), device=self.device)
                  for p, shape in zip(output_ptrs, self.output_shapes(hw))]
            state.views[key] = (x, ys)
        return state.views[key]

    def _forward(self, x, ys, n: int) -> None:
        torch = self.torch
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            result = self.module(x[:n])
        result = result if isinstance(result, (list, tuple)) else [result]
        for y, r in zip(ys, result):
            y[:n].copy_(r)

    def warmup(self, context: _LaneState, stream_ptr: int, input_ptr: int, output_ptrs: list[int]) -> None:
        # capture every batch bucket of every camera shape now, not on the first batches of a running pipeline
        for hw in self.warm_shapes or [self.square()]:
            self._warmup_shape(context, stream_ptr, input_ptr, output_ptrs, tuple(hw))

    def _warmup_shape(self, context: _LaneState, stream_ptr: int, input_ptr: int, output_ptrs: list[int],
                      hw: tuple[int, int]) -> None:
        size = 1
        while True:
            try:
                self.enqueue(context, stream_ptr, input_ptr, output_ptrs, size, hw=hw)
            except RuntimeError as exc:
                if not self.cuda_graphs:
                    raise
                # a model whose forward copies host data (run-time shape arithmetic) cannot be captured
                log.warning("engine torch: CUDA graphs unavailable for this model (%s); running without them",
                            str(exc).splitlines()[0][:160])
                self.cuda_graphs = False
                context.graphs.clear()
                self.torch.cuda.synchronize(self.device)
                continue
            if size >= self.max_batch or not self.cuda_graphs:
                break
            size = min(size * 2, self.max_batch)

    def enqueue(self, context: _LaneState, stream_ptr: int, input_ptr: int, output_ptrs: list[int], batch: int,
                hw: tuple[int, int] | None = None) -> None:
        torch = self.torch
        stream = torch.cuda.ExternalStream(stream_ptr, device=self.device)
        hw = tuple(hw) if hw is not None else self.square()
        x, ys = self._views(context, input_ptr, output_ptrs, hw)
        with torch.cuda.stream(stream), torch.inference_mode():
            if not self.cuda_graphs:
                self._forward(x, ys, batch)
                return
            size = _bucket(batch, self.max_batch)  # rows past `batch` hold stale data; their outputs are ignored
            graph = context.graphs.get((size, hw))
            if graph is None:
                for _ in range(2):  # warm-up on this stream before capture, as CUDA graphs require
                    self._forward(x, ys, size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self._forward(x, ys, size)
                context.graphs[(size, hw)] = graph
            graph.replay()
