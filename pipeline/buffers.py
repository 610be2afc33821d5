"""A fixed pool of host slots, each one batch of letterboxed uint8 images [max_batch, H, W, 3].

The letterbox stage writes straight into a slot (cv2.resize with `dst=` a view of it), so a frame
is copied once on the host; the engine reads the slot as its input. The allocator is pluggable:
plain numpy memory for CPU engines, page-locked (pinned) memory when a GPU engine copies from it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def numpy_allocator(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


@dataclass(eq=False)
class HostSlot:
    index: int
    array: np.ndarray  # [max_batch, H, W, 3] uint8


def batch_view(array, n: int, hw: tuple[int, int]):
    """The first `n` images of a slot seen as a contiguous [n, h, w, 3] batch of a smaller shape.

    A slot is sized for the model's largest input; a batch of rectangle-letterboxed frames uses its
    first n*h*w*3 bytes (what engines copy and read), never a strided window of it.
    """
    count = n * hw[0] * hw[1] * array.shape[3]
    if count > int(np.prod(array.shape)):
        raise ValueError(f"a batch of {n} x {hw[0]}x{hw[1]} does not fit a slot of {array.shape}")
    if isinstance(array, np.ndarray):
        if tuple(array.shape[1:3]) == tuple(hw):
            return array[:n]
        return array.reshape(-1)[:count].reshape(n, hw[0], hw[1], array.shape[3])
    # a DeviceArray (GPU letterbox): no slicing on the host, a view is the same pointer with a new shape
    return type(array)(array.ptr, (n, hw[0], hw[1], array.shape[3]), array.dtype)


class HostSlotPool:
    def __init__(self, count: int, batch_shape: tuple[int, ...], dtype=np.uint8, allocator: Allocator = numpy_allocator):
        self.slots = [HostSlot(i, allocator(batch_shape, np.dtype(dtype))) for i in range(count)]
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, timeout: float | None = None) -> HostSlot | None:
        """A free slot, or None after `timeout` seconds or once the pool is closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout):
                return None
            if self._closed and not self._free:
                return None
            return self._free.pop()

    def release(self, slot: HostSlot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def free(self) -> int:
        with self._cond:
            return len(self._free)
