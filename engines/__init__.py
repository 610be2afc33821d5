"""Inference back ends behind one interface (`engines.base.Engine`); `create_engine` picks one."""

from __future__ import annotations

from engines.base import Engine, TensorSpec
from pipeline.config import EngineConfig
from pipeline.model import PreparedModel

__all__ = ["Engine", "TensorSpec", "create_engine"]


def create_engine(config: EngineConfig, model: PreparedModel) -> Engine:
    if config.kind == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model, config.max_batch, config.intra_op_threads, config.inter_op_threads,
                                 config.spin)
    raise ValueError(f"unknown engine kind {config.kind!r}")
