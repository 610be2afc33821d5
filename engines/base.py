"""The one small interface every inference back end implements.

An engine is built from a `PreparedModel` (uint8 NHWC input, preprocessing inside the graph),
describes its tensors with `TensorSpec`s (None marks a dynamic dimension), and runs a batch.
Host engines implement `infer(images) -> outputs`; GPU engines add a device-pointer path used
by the lanes of the GPU data path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None = dynamic (batch)


class Engine(ABC):
    name = "engine"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int  # the largest batch one call accepts

    @abstractmethod
    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        """Run uint8 images [n, H, W, 3] (n <= max_batch); returns the outputs, batch-major."""

    def close(self) -> None:
        pass


class DeviceEngine(Engine):
    """An engine that runs on device memory, on a caller's CUDA stream (the GPU data path).

    Each lane of `pipeline.lanes.LaneSet` owns one context from `create_context` (for TensorRT an
    execution context, for PyTorch its captured graphs) and calls `enqueue` with device pointers:
    the input is uint8 [n, H, W, 3], the outputs are float32, batch-major, `outputs` shapes.
    `enqueue` only queues work on `stream`; it must not synchronize.

    A shape-dynamic model (`PreparedModel.shape_dynamic`, rectangle letterboxing) also runs inputs
    [n, h, w, 3] smaller than the square (`hw=(h, w)`); its outputs then have `output_shapes(hw)`,
    packed at the start of the same buffers. `warm_shapes` (set before lanes are created) are the
    input shapes the configured cameras need: warm-up prepares each of them.
    """

    model = None  # the PreparedModel
    warm_shapes: list[tuple[int, int]] = []

    def create_context(self, lane: int):
        return None

    def square(self) -> tuple[int, int]:
        return tuple(self.inputs[0].shape[1:3])

    def output_shapes(self, hw: tuple[int, int]) -> list[tuple[int, ...]]:
        """Each output's shape for one image of input size `hw`."""
        if tuple(hw) == self.square():
            return [tuple(o.shape[1:]) for o in self.outputs]
        if self.model is None or not self.model.shape_dynamic:
            raise ValueError(f"engine {self.name}: the model's input is fixed at {self.square()}, not {tuple(hw)}")
        return [self.model.output_shape(tuple(hw))]

    def warmup(self, context, stream_ptr: int, input_ptr: int, output_ptrs: list[int]) -> None:
        """Do the one-off work (autotuning, graph capture) before the first real batch."""
        for hw in self.warm_shapes or [self.square()]:
            self.enqueue(context, stream_ptr, input_ptr, output_ptrs, self.max_batch, hw=hw)

    @abstractmethod
    def enqueue(self, context, stream_ptr: int, input_ptr: int, output_ptrs: list[int], batch: int,
                hw: tuple[int, int] | None = None) -> None:
        ...

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        """Host convenience path (tests, tools): one private lane, synchronous."""
        from pipeline.lanes import LaneSet

        if getattr(self, "_host_lanes", None) is None:
            self._host_lanes = LaneSet(self, 1, pinned_outputs=1)
        return self._host_lanes.run_sync(images)

    def close(self) -> None:
        lanes = getattr(self, "_host_lanes", None)
        if lanes is not None:
            lanes.close()
            self._host_lanes = None
