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
