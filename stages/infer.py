"""Infer stage: runs the engine on the batch's host slot and frees the slot for the next batch."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from engines.base import Engine
from pipeline.buffers import HostSlotPool
from pipeline.queues import BoundedQueue
from pipeline.record import FrameBatch
from pipeline.stage import Stage


class InferStage(Stage):
    name = "infer"

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, engine: Engine, pool: HostSlotPool):
        super().__init__(inbox, outbox)
        self.engine = engine
        self.pool = pool

    def process(self, batch: FrameBatch) -> None:
        n = len(batch)
        images = batch.slot.array
        try:
            if n <= self.engine.max_batch:
                batch.outputs = self.engine.infer(images[:n])
            else:  # a model fixed at batch 1: one call per image
                parts = [self.engine.infer(images[i : i + 1]) for i in range(n)]
                batch.outputs = [np.concatenate(chunks) for chunks in zip(*parts)]
        finally:
            self.discard(batch)
        for frame in batch.frames:
            frame.mark("infer")
        self.emit(batch)

    def discard(self, batch: FrameBatch) -> None:
        """The batch no longer needs its input: free the host slot and its in-flight credit."""
        batch.release_credit()
        if batch.slot is not None:
            self.pool.release(batch.slot)
            batch.slot = None

    def on_stop(self) -> None:
        self.engine.close()


class LaneInferStage(InferStage):
    """The GPU data path: batches go to free lanes (copy in, enqueue, copy out) and a completion
    thread hands results on in submission order, so several batches are in flight at once.
    Its latency is each batch's GPU wall time (H2D start to D2H end, from CUDA events)."""

    name = "infer"
    times_process = False

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, lanes, pool: HostSlotPool, timeline: list | None = None):
        super().__init__(inbox, outbox, lanes.engine, pool)
        self.lanes = lanes
        self.timeline = timeline  # BatchTiming per batch, when the caller wants the overlap picture
        self._submitted: queue.Queue = queue.Queue()
        self._completer = threading.Thread(target=self._complete_loop, name="stage-infer-complete", daemon=True)

    def on_start(self) -> None:
        self._completer.start()

    def process(self, batch: FrameBatch) -> None:
        started = time.perf_counter()
        self.lanes.submit(batch.slot.array[: len(batch)], tag=batch)
        self._submitted.put(batch)
        self._waited += time.perf_counter() - started  # waiting for a free lane is back-pressure

    def _complete_loop(self) -> None:
        while True:
            batch = self._submitted.get()
            if batch is None:
                return
            try:
                tag, outputs, timing, release = self.lanes.complete()
                assert tag is batch, "lanes complete in submission order"
            except Exception as exc:
                self.failure = exc
                self.discard(batch)
                continue
            self.discard(batch)
            batch.outputs, batch.release = outputs, release
            if self.timeline is not None:
                self.timeline.append(timing)
            for frame in batch.frames:
                frame.mark("infer")
            self.metrics.record_latency(timing.wall / 1000.0)
            self.emit(batch)

    def flush(self) -> None:
        self._submitted.put(None)
        self._completer.join()

    def on_stop(self) -> None:
        # the lanes' pinned output slots may still be read by postprocess: Pipeline.close frees them
        pass
