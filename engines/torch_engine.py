"""PyTorch on the GPU: the engine that needs no TensorRT, so the lanes run on any CUDA machine.

The prepared ONNX graph (uint8 NHWC input, preprocessing inside) is converted in memory with
onnx2torch and runs on the lane's own CUDA stream (`torch.cuda.ExternalStream`), reading and
writing the lane's device buffers in place (wrapped through `__cuda_array_interface__`).
Options: fp16 (autocast), CUDA graphs (one captured graph per lane, batch bucket and input shape;
batches are padded up to the next power of two so a handful of graphs cover every size) and
compile (`torch.compile`, inductor, channels_last weights): the compiled kernels are what the CUDA
graphs capture. Compiled artifacts are cached on disk (`torch.compiler.save_cache_artifacts`),
keyed like TensorRT plans; a file lock makes the worker processes of one machine compile once.
With rectangle letterboxing each camera shape is its own input shape: the shapes of the configured
cameras (`warm_shapes`) are captured (and compiled) at start, any other (a stream whose resolution
changed) on its first batch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

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


def _static_shape_modules(module) -> int:
    """Replace Slice, Reshape and Resize calls whose starts/ends/shape/scales are constants by
    modules holding Python numbers. onnx2torch reads those tensors on every call (`.item()`,
    `.tolist()`, `torch.any`), which
    torch.compile cannot trace: it breaks the graph there and recompiles each such call site, so
    most of the model would stay eager. Returns how many calls were replaced."""
    import torch

    class StaticSlice(torch.nn.Module):
        def __init__(self, index: tuple, flip: list[int]):
            super().__init__()
            self.index, self.flip = index, flip

        def forward(self, x):
            return (torch.flip(x, dims=self.flip) if self.flip else x)[self.index]

    class StaticReshape(torch.nn.Module):
        def __init__(self, shape: list[int]):
            super().__init__()
            self.shape = shape

        def forward(self, x):
            return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])

    class StaticResize(torch.nn.Module):
        def __init__(self, mode: str, align_corners, size, scale_factor):
            super().__init__()
            self.mode, self.align_corners, self.size, self.scale_factor = mode, align_corners, size, scale_factor

        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                                                   align_corners=self.align_corners)

    def constant(arg):
        if arg is None:
            return []
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            owner, _, name = arg.target.rpartition(".")
            value = getattr(module.get_submodule(owner) if owner else module, name)
            return value.detach().cpu().reshape(-1).tolist()
        return None

    replaced = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        kind = type(module.get_submodule(node.target)).__name__
        values = [constant(a) for a in node.args[1:]]
        if not values or any(v is None for v in values):
            continue
        if kind == "OnnxSlice":
            values = [[int(v) for v in vs] for vs in values]
            starts, ends = values[0], values[1]
            axes = values[2] if len(values) > 2 else list(range(len(starts)))
            steps = values[3] if len(values) > 3 else [1] * len(starts)
            if any(a < 0 for a in axes):
                continue
            index, flip = [slice(None)] * (max(axes) + 1), []
            for start, end, axis, step in zip(starts, ends, axes, steps):
                if step < 0:
                    flip.append(axis)
                    start, end, step = -start - 1, -end - 1, -step
                index[axis] = slice(start, end, step)
            replacement = StaticSlice(tuple(index), flip)
        elif kind == "OnnxReshape":
            replacement = StaticReshape([int(v) for v in values[0]])
        elif kind == "OnnxResize":
            from onnx2torch.node_converters.resize import _onnx_mode_to_torch_mode

            original = module.get_submodule(node.target)
            roi, scales, sizes = (values + [[], [], []])[:3]
            if roi and not original.ignore_roi or (scales and scales[:2] != [1, 1]) or (sizes and not original.ignore_bs_ch_size):
                continue
            replacement = StaticResize(_onnx_mode_to_torch_mode(original.onnx_mode, 2), original.align_corners,
                                       [int(v) for v in sizes[2:]] or None, [float(v) for v in scales[2:]] or None)
        else:
            continue
        name = f"static_{replaced}_{node.target.replace('.', '_')}"
        module.add_submodule(name, replacement)
        node.target, node.args = name, (node.args[0],)
        replaced += 1
    module.graph.eliminate_dead_code()
    module.recompile()
    return replaced


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


def convolutions(module) -> list[tuple[str, object]]:
    """(target, Conv2d) of the converted module, in graph order."""
    import torch

    return [(n.target, module.get_submodule(n.target)) for n in module.graph.nodes
            if n.op == "call_module" and isinstance(module.get_submodule(n.target), torch.nn.Conv2d)]


def _replace(module, target: str, replacement) -> None:
    owner, _, name = target.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, name, replacement)


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

    convs = [target for target, _ in convolutions(module)]
    for target in convs[:first] + (convs[-last:] if last else []):
        _replace(module, target, Fp32(module.get_submodule(target)))


def _bucket(n: int, max_batch: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


def compile_key(model: PreparedModel, torch_version: str, gpu: str, capability: tuple[int, int], fp16: bool,
                fp32_first_convs: int, buckets: list[int], fp16_exact: bool = False, device_index: int = 0) -> str:
    """Everything that makes compiled kernels valid for a run; a different key compiles anew.

    The device index too: the traced graph names its device (cuda:1), so inductor's own caches miss
    for another index, and artifacts saved on GPU 0 left every worker on GPUs 1-3 of a 4-GPU host
    compiling from scratch (all 18 on GPU 0 were ready in under 50 s, none of the 52 others after
    100-158 s). One file a GPU: its first worker compiles, the others on it load."""
    fields = {"onnx": model.sha256, "torch": torch_version, "gpu": gpu, "sm": f"{capability[0]}.{capability[1]}",
              "fp16": fp16, "fp32_first_convs": fp32_first_convs if fp16 else 0, "buckets": buckets,
              "memory_format": "channels_last"}
    # only when set, so the keys (and cached artifacts) of other runs stay as they were
    if fp16 and fp16_exact:
        fields["fp16_exact"] = True
    if device_index:
        fields["device_index"] = device_index
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def buckets(max_batch: int) -> list[int]:
    sizes, size = [], 1
    while True:
        sizes.append(size)
        if size >= max_batch:
            return sizes
        size = min(size * 2, max_batch)


class _CompileCache:
    """`<dir>/<key>.inductor` holds the compiled artifacts; `<key>.lock` makes one process compile
    while the others of the machine wait for its file (the OS drops the lock if it dies). A file
    that is there is loaded without the lock: it is only ever written whole (by rename), and on a
    4-GPU host 70 workers taking the lock in turn to load it spent a minute in line (one a second)."""

    def __init__(self, cache_dir: Path, key: str):
        self.path = Path(cache_dir) / f"{key}.inductor"
        self._lock = None

    def load(self, torch) -> bool:
        """True: the artifacts are loaded. False: this process compiles, and holds the lock until save()."""
        found = self._read(torch)
        if found:
            return True
        Path(self.path.parent).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_suffix(".lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits while another process compiles this key
        if found is False and self._read(torch):  # it was compiling: its artifacts are there now
            self.release()
            return True
        return False  # we compile (a bad file too: compiled anew, still holding the lock)

    def _read(self, torch) -> bool | None:
        """Load the artifacts file: True; no file: False; a stale or truncated one: None (warned)."""
        if not self.path.is_file():
            return False
        try:
            torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:
            log.warning("engine torch: cannot load compiled artifacts %s (%s); compiling", self.path.name,
                        str(exc).splitlines()[0][:120])
            return None
        return True

    def save(self, torch) -> None:
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_bytes(artifacts[0])
                tmp.replace(self.path)  # a crash mid-write never leaves a file that looks valid
        finally:
            self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def single_compile_thread(torch) -> None:
    """No pool of compile subprocesses in this process: with the artifacts cached there is nothing
    to compile, and inductor otherwise starts one pool a process when it is first used (on a 4-GPU
    host, 64 workers starting together with their pools left 176 of 576 cameras up after 240 s; with
    TORCHINDUCTOR_COMPILE_THREADS=1 all were up within 96 s; bench/results/load.md). Inductor
    decides it when its config is imported (the environment variable is read then) and reads it
    when the backend first runs, so it must be set before the first compiled call."""
    try:
        import torch._inductor.config as inductor_config  # not loaded until torch.compile first runs
    except ImportError:  # a torch without inductor: nothing to set
        return
    if hasattr(inductor_config, "compile_threads"):
        inductor_config.compile_threads = 1


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
                 fp32_first_convs: int = 16, compile: bool = False, cache_dir: Path = Path("cache/torch"),
                 fp16_exact: bool = False):
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
        self.fp16_exact = fp16 and fp16_exact
        if self.fp16_exact:
            # every layer fp16 through exact rewrites, on the fp32 module before autocast, compile
            # and capture (engines/torch_fp16.py); no convolution is left in fp32
            from engines.torch_fp16 import make_fp16_exact

            changed = make_fp16_exact(self.module, tuple(model.input_hw))
            log.info("engine torch: fp16_exact rewrites %s", changed)
            fp32_first_convs = 0
        if compile:
            _static_shape_modules(self.module)
        self.fp16, self.cuda_graphs = fp16, cuda_graphs
        h, w = model.input_hw
        if fp16 and fp32_first_convs:
            # YOLOX's third convolution (1x1, bias 76) cancels sums of up to 78 made from large, nearly
            # constant input channels; fp16's rounding of those inputs moves scores by up to 0.12
            # (bench/fp16_precision.py attributes it). The first 16 in fp32 keep scores within ~0.02.
            fp32_layers(self.module, fp32_first_convs, 0)
        if not fp16:  # fp32 means fp32: PyTorch would otherwise run convolutions in TF32 (~1e-3 error)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.max_batch = max_batch if model.batch_dynamic else 1
        self.model = model
        self.warm_shapes = [tuple(model.input_hw)]
        self.inputs = [TensorSpec(model.input_name, np.dtype(np.uint8), (None, h, w, 3))]
        with torch.inference_mode():
            probe = self.module(torch.zeros((1, h, w, 3), dtype=torch.uint8, device=self.device))
        probe = probe if isinstance(probe, (list, tuple)) else [probe]
        self.outputs = [TensorSpec(name, np.dtype(np.float32), (None, *t.shape[1:]))
                        for name, t in zip(model.output_names, probe)]
        self._run = self._eager
        self.compiled = False  # torch.compile is in use (it may fall back to eager in warmup)
        self._compile_cache: _CompileCache | None = None
        self.compile_seconds: float | None = None  # start-up cost of compiling (or loading the cache)
        if compile:
            self._compile(model, cache_dir, fp32_first_convs)

    def _eager(self, x):
        with self.torch.autocast("cuda", dtype=self.torch.float16, enabled=self.fp16):
            return self.module(x)

    def _compile(self, model: PreparedModel, cache_dir: Path, fp32_first_convs: int) -> None:
        """Compile lazily (dynamo traces on the first call of each batch bucket, in warmup)."""
        torch = self.torch
        from pipeline import cuda

        self.module = self.module.to(memory_format=torch.channels_last)
        sizes = buckets(self.max_batch)
        key = compile_key(model, torch.__version__, cuda.device_name(self.device.index),
                          cuda.compute_capability(self.device.index), self.fp16, fp32_first_convs, sizes,
                          self.fp16_exact, self.device.index or 0)
        self._compile_cache = _CompileCache(cache_dir, key)
        threads_chosen = "TORCHINDUCTOR_COMPILE_THREADS" in os.environ  # by the user: theirs to decide
        if self._compile_cache.path.is_file() and not threads_chosen:
            # set before inductor's config is first imported (torch._dynamo imports it), which reads it
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
            single_compile_thread(torch)
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one specialisation per bucket and shape
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 256))
        started = time.perf_counter()
        cached = self._compile_cache.load(torch)
        self._compile_started, self._compile_cached = started, cached
        if cached and not threads_chosen:
            single_compile_thread(torch)
        log.info("engine torch: compiling with inductor (%s)", "cached artifacts" if cached else
                 "no cached artifacts: about a minute, once per model, GPU and torch version")
        # static shapes: one specialisation per batch bucket (a dynamic batch makes the compiler add
        # guards such as batch < 16 from its convolution heuristics)
        self._run = torch.compile(self._eager, dynamic=False)
        self.compiled = True

    def _compile_failed(self, exc: BaseException) -> None:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])  # "backend raised:" + why
        log.warning("engine torch: torch.compile cannot compile this model (%s: %s); running it eagerly",
                    type(exc).__name__, reason[:300])
        log.debug("engine torch: the compile error in full", exc_info=exc)
        self._run, self.compiled = self._eager, False
        self.module = self.module.to(memory_format=self.torch.contiguous_format)
        if self._compile_cache is not None:
            self._compile_cache.release()
            self._compile_cache = None

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
        result = self._run(x[:n])
        result = result if isinstance(result, (list, tuple)) else [result]
        for y, r in zip(ys, result):
            y[:n].copy_(r)

    def warmup(self, context: _LaneState, stream_ptr: int, input_ptr: int, output_ptrs: list[int]) -> None:
        # compile and capture every batch bucket of every camera shape now, not on the first batches
        # of a running pipeline
        for hw in self.warm_shapes or [self.square()]:
            self._warmup_shape(context, stream_ptr, input_ptr, output_ptrs, tuple(hw))
        if self._compile_cache is not None:  # the first lane compiled every bucket: keep them on disk
            self.torch.cuda.synchronize(self.device)
            if not self._compile_cached:
                self._compile_cache.save(self.torch)
            self._compile_cache = None
            self.compile_seconds = time.perf_counter() - self._compile_started
            log.info("engine torch: compiled in %.1f s (%s)", self.compile_seconds,
                     "from cached artifacts" if self._compile_cached else "cached for the next start")

    def _warmup_shape(self, context: _LaneState, stream_ptr: int, input_ptr: int, output_ptrs: list[int],
                      hw: tuple[int, int]) -> None:
        size = 1
        while True:
            try:
                self.enqueue(context, stream_ptr, input_ptr, output_ptrs, size, hw=hw)
            except Exception as exc:
                if self.compiled:  # the compiler failed: eager, as without compile
                    self._compile_failed(exc)
                    context.graphs.clear()
                    self.torch.cuda.synchronize(self.device)
                    size = 1
                    continue
                if not self.cuda_graphs or not isinstance(exc, RuntimeError):
                    raise
                # a model whose forward copies host data (run-time shape arithmetic) cannot be captured
                log.warning("engine torch: CUDA graphs unavailable for this model (%s); running without them",
                            str(exc).splitlines()[0][:160])
                self.cuda_graphs = False
                context.graphs.clear()
                self.torch.cuda.synchronize(self.device)
                continue
            if size >= self.max_batch or (not self.cuda_graphs and self._compile_cache is None):
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
