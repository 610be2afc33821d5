"""Inference back ends behind one interface (`engines.base.Engine`); `create_engine` picks one."""

from __future__ import annotations

from pathlib import Path

from engines.base import DeviceEngine, Engine, TensorSpec
from pipeline.config import EngineConfig
from pipeline.model import PreparedModel

__all__ = ["DeviceEngine", "Engine", "TensorSpec", "create_engine", "require_engine"]


def require_engine(kind: str) -> None:
    """Refuse an engine whose libraries are missing before the model is prepared (which takes
    seconds, minutes for a large model), with one line saying what to install."""
    if kind == "torch":
        from engines.torch_engine import import_torch

        import_torch()
    elif kind == "tensorrt":
        from engines.tensorrt_engine import import_tensorrt

        import_tensorrt()
    elif kind == "triton":
        from engines.triton_engine import import_tritonclient

        import_tritonclient()


def create_engine(config: EngineConfig, model: PreparedModel, shapes: list[tuple[int, int]] | None = None,
                  model_path: Path | None = None) -> Engine:
    """`shapes`: the input shapes the configured cameras need, most common first (GPU engines
    prepare them at start: CUDA graphs, TensorRT's optimisation profile). `model_path` (model.path)
    names the model on a Triton server unless engine.triton.model_name does."""
    engine = _create(config, model, shapes, model_path)
    if shapes and model.shape_dynamic and isinstance(engine, DeviceEngine):
        engine.warm_shapes = list(dict.fromkeys(tuple(s) for s in shapes))
    return engine


def _create(config: EngineConfig, model: PreparedModel, shapes, model_path: Path | None) -> Engine:
    if config.kind == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model, config.max_batch, config.intra_op_threads, config.inter_op_threads,
                                 config.spin)
    if config.kind == "torch":
        from engines.torch_engine import TorchEngine

        return TorchEngine(model, config.max_batch, fp16=config.fp16, cuda_graphs=config.cuda_graphs, device=config.device,
                           fp32_first_convs=config.fp32_first_convs, compile=config.compile,
                           cache_dir=config.compile_cache_dir, fp16_exact=config.fp16_exact)
    if config.kind == "tensorrt":
        from engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(model, config.max_batch, config.lanes, fp16=config.fp16, workspace_mb=config.workspace_mb,
                              cache_dir=config.plan_cache_dir, plugins=config.plugins, min_batch=config.min_batch,
                              opt_batch=config.opt_batch, device=config.device,
                              opt_hw=shapes[0] if shapes and model.shape_dynamic else None)
    if config.kind == "triton":
        from engines.triton_engine import TritonEngine
        from engines.triton_repository import default_model_name

        name = config.triton.model_name or default_model_name(model_path)
        return TritonEngine(config.triton, model, name, config.max_batch, config.lanes)
    raise ValueError(f"unknown engine kind {config.kind!r}")
