"""Lanes: the GPU data path that overlaps copies and compute.

A lane owns a CUDA stream, an engine context, device input/output buffers and events. A batch
takes a free lane: host-to-device copy of the uint8 slot (pinned), `engine.enqueue`, device-to-host
copy of the outputs into a pinned output slot, and events around each part. `complete()` waits on
the oldest batch's last event, so results leave in submission order. With K >= 2 lanes the
copies of one batch overlap the compute of another (the GPU has separate copy engines).
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass

import numpy as np

from pipeline.buffers import HostSlotPool
from pipeline.cuda import (DeviceArray, DeviceBuffer, Event, PinnedAllocator, Stream, copy_device_to_device, copy_to_device,
                           copy_to_host)


@dataclass
class BatchTiming:
    """Milliseconds, all measured by CUDA events against one reference event."""

    lane: int
    batch: int
    h2d_start: float
    h2d_end: float
    compute_end: float
    d2h_end: float

    @property
    def parts(self) -> tuple[float, float, float]:
        return self.h2d_end - self.h2d_start, self.compute_end - self.h2d_end, self.d2h_end - self.compute_end

    @property
    def wall(self) -> float:
        return self.d2h_end - self.h2d_start


class Lane:
    def __init__(self, index: int, engine, input_bytes_per_image: int, output_bytes_per_image: list[int]):
        self.index = index
        self.stream = Stream()
        self.context = engine.create_context(index)
        self.d_input = DeviceBuffer(input_bytes_per_image * engine.max_batch)
        self.d_outputs = [DeviceBuffer(n * engine.max_batch) for n in output_bytes_per_image]
        self.events = [Event() for _ in range(4)]  # h2d start, h2d end, compute end, d2h end
        self.work = None  # (tag, n, output slot) while a batch is in flight

    def destroy(self) -> None:
        self.stream.synchronize()
        for buffer in (self.d_input, *self.d_outputs):
            buffer.free()
        for event in self.events:
            event.destroy()
        self.stream.destroy()


class LaneSet:
    def __init__(self, engine, lanes: int, pinned_outputs: int | None = None):
        self.engine = engine
        spec = engine.inputs[0]
        self.image_shape = tuple(d for d in spec.shape[1:])
        self.input_bytes = int(np.prod(self.image_shape))  # uint8
        self.output_shapes = [tuple(o.shape[1:]) for o in engine.outputs]
        self.output_bytes = [int(np.prod(s)) * 4 for s in self.output_shapes]
        self.allocator = PinnedAllocator()
        self.reference = Event()  # time zero for every batch's timing
        self._ref_stream = Stream()
        self.reference.record(self._ref_stream)
        self.lanes = [Lane(i, engine, self.input_bytes, self.output_bytes) for i in range(lanes)]
        for lane in self.lanes:  # autotuning and graph capture happen here, before any frame waits
            # the warm-up reads whatever the input buffer holds; its outputs are overwritten later
            engine.warmup(lane.context, lane.stream.ptr, lane.d_input.ptr, [b.ptr for b in lane.d_outputs])
            lane.stream.synchronize()
        self._free: queue.Queue[Lane] = queue.Queue()
        for lane in self.lanes:
            self._free.put(lane)
        self._in_flight: collections.deque[Lane] = collections.deque()
        self._order = threading.Lock()
        # pinned output slots: postprocess reads them, then releases (decoupled from the lanes)
        self.output_pools = [HostSlotPool(pinned_outputs or lanes + 2, (engine.max_batch, *shape), np.float32, self.allocator)
                             for shape in self.output_shapes]

    def submit(self, images: np.ndarray | DeviceArray, tag=None, timeout: float | None = None, n: int | None = None) -> bool:
        """Queue one batch of `n` images (uint8 [n, h, w, 3]): host memory (pinned, for real overlap) or
        a device batch the GPU letterbox filled. (h, w) is the engine's square or, for a shape-dynamic
        model, any rectangle inside it; the outputs then have that shape's rows. False if no lane
        freed in time."""
        try:
            lane = self._free.get(timeout=timeout)
        except queue.Empty:
            return False
        n = images.shape[0] if n is None else n
        hw = tuple(images.shape[1:3])
        input_bytes = int(np.prod(images.shape[1:]))  # uint8
        output_shapes = self.engine.output_shapes(hw)
        output_bytes = [int(np.prod(shape)) * 4 for shape in output_shapes]
        slots = [pool.acquire() for pool in self.output_pools]
        start, h2d, compute, d2h = lane.events
        try:
            start.record(lane.stream)
            if isinstance(images, DeviceArray):  # already letterboxed on the GPU: a device-to-device copy
                copy_device_to_device(lane.d_input.ptr, images.ptr, n * input_bytes, lane.stream)
            else:
                copy_to_device(lane.d_input.ptr, images, n * input_bytes, lane.stream)
            h2d.record(lane.stream)
            self.engine.enqueue(lane.context, lane.stream.ptr, lane.d_input.ptr, [b.ptr for b in lane.d_outputs], n, hw=hw)
            compute.record(lane.stream)
            for slot, buffer, nbytes in zip(slots, lane.d_outputs, output_bytes):
                copy_to_host(slot.array, buffer.ptr, n * nbytes, lane.stream)
            d2h.record(lane.stream)
        except BaseException:
            # a failed batch must not take its lane and output slots with it, or the next ones wait forever
            for pool, slot in zip(self.output_pools, slots):
                pool.release(slot)
            self._free.put(lane)
            raise
        lane.work = (tag, n, slots, output_shapes)
        with self._order:
            self._in_flight.append(lane)
        return True

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def complete(self):
        """Wait for the oldest batch: (tag, outputs [views of pinned slots], timing, release callback)."""
        with self._order:
            lane = self._in_flight.popleft()
        start, h2d, compute, d2h = lane.events
        d2h.wait()
        tag, n, slots, output_shapes = lane.work
        ref = self.reference
        timing = BatchTiming(lane.index, n, start.since(ref), h2d.since(ref), compute.since(ref), d2h.since(ref))
        lane.work = None
        self._free.put(lane)
        # a smaller input shape fills the start of each output slot: seen as [n, its rows, ...]
        outputs = [slot.array.reshape(-1)[: n * int(np.prod(shape))].reshape(n, *shape)
                   for slot, shape in zip(slots, output_shapes)]

        def release() -> None:
            for pool, slot in zip(self.output_pools, slots):
                pool.release(slot)

        return tag, outputs, timing, release

    def run_sync(self, images: np.ndarray) -> list[np.ndarray]:
        outputs = []
        if tuple(images.shape[1:3]) != self.image_shape[:2]:  # another shape: staged in a pinned buffer like a slot's
            staged = self.allocator(images.shape, np.uint8)
            staged[...] = images
            images = staged
        for i in range(0, len(images), self.engine.max_batch):
            chunk = np.ascontiguousarray(images[i : i + self.engine.max_batch])
            self.submit(chunk)
            _, out, _, release = self.complete()
            outputs.append([o.copy() for o in out])
            release()
        return [np.concatenate(parts) for parts in zip(*outputs)]

    def close(self) -> None:
        for lane in self.lanes:
            lane.destroy()
        self._ref_stream.destroy()
        self.reference.destroy()
        for pool in self.output_pools:
            pool.close()
        self.allocator.free()
