"""Infer stage: runs batches on K lanes at once and hands results on in submission order.

A lane is one concurrent inference: on the CPU a worker thread calling the engine (ONNX Runtime
runs two single-threaded calls side by side much faster than one two-threaded call on a small
model), on the GPU a CUDA stream with its own engine context (`pipeline.lanes`). The stage's
thread submits each batch to a free lane; a completion thread waits for batches in the order
they were submitted, frees their host slot and sends them on, so several batches are in flight
and frame order is kept. When the stage stops, for good or not, the completion thread first
finishes and sends on every batch in flight, so none vanishes uncounted.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engines.base import Engine
from pipeline.buffers import HostSlotPool
from pipeline.queues import Aborted, BoundedQueue
from pipeline.record import FrameBatch
from pipeline.stage import Stage


class InferStage(Stage):
    """Host engines (ONNX Runtime): `lanes` worker threads share one engine."""

    name = "infer"
    times_process = False  # latency is each batch's own inference time, recorded on completion

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, engine: Engine, pool: HostSlotPool, lanes: int = 1,
                 device: int | None = None):
        super().__init__(inbox, outbox)
        self.device = device  # GPU engines: the CUDA device every thread of this stage makes current
        self.engine = engine
        self.pool = pool
        self._free_lanes = threading.Semaphore(lanes)
        self.lanes_total = lanes
        self._workers = ThreadPoolExecutor(lanes, thread_name_prefix="infer-lane")
        self._submitted: queue.Queue = queue.Queue()
        self._completer = threading.Thread(target=self._complete_loop, name="stage-infer-complete", daemon=True)
        self._downstream_stopped = False  # set by the completion thread when postprocess refuses batches

    def on_start(self) -> None:
        self._completer.start()

    @property
    def lanes_busy(self) -> int:
        """Lanes with a batch in flight (for metrics; a Semaphore's count has no public reader)."""
        return self.lanes_total - self._free_lanes._value

    def process(self, batch: FrameBatch) -> None:
        started = time.perf_counter()
        # waiting for a lane is back-pressure, not work; it ends if the completion thread cannot free one
        while self._downstream_stopped or not self._free_lanes.acquire(timeout=0.5):
            if self._downstream_stopped or not self._completer.is_alive():
                self.metrics.drop("stopped", len(batch))
                raise Aborted("infer: results can no longer be handed on")
        self._waited += time.perf_counter() - started
        try:
            pending = self._submit(batch)
        except BaseException:
            self._free_lanes.release()
            raise
        self._submitted.put((batch, pending))

    def _submit(self, batch: FrameBatch):
        return self._workers.submit(self._infer_on_host, batch.images())

    def _infer_on_host(self, images: np.ndarray) -> tuple[list[np.ndarray], float]:
        started = time.perf_counter()
        if len(images) <= self.engine.max_batch:
            outputs = self.engine.infer(images)
        else:  # a model fixed at batch 1: one call per image
            parts = [self.engine.infer(images[i : i + 1]) for i in range(len(images))]
            outputs = [np.concatenate(chunks) for chunks in zip(*parts)]
        return outputs, time.perf_counter() - started

    def _wait(self, batch: FrameBatch, pending):
        """(outputs, release callback or None, seconds the inference took)."""
        outputs, seconds = pending.result()
        return outputs, None, seconds

    def _complete_loop(self) -> None:
        if self.device is not None:
            from pipeline.cuda import set_device

            set_device(self.device)  # this thread polls the lanes' events: the device's context, not GPU 0's
        while True:
            item = self._submitted.get()
            if item is None:
                return
            batch, pending = item
            try:
                outputs, release, seconds = self._wait(batch, pending)
            except Exception as exc:  # one failed batch is dropped and counted, like any bad item
                # an engine may name the reason (triton: engine_unavailable, a batch the server never answered)
                self.metrics.drop(getattr(exc, "drop_reason", "error"), len(batch))
                self._log_item_error(exc)
                self.discard(batch)
                continue
            finally:
                self._free_lanes.release()
            self.discard(batch)
            batch.outputs, batch.release = outputs, release
            for frame in batch.frames:
                frame.mark("infer")
            self.metrics.record_latency(seconds)
            try:
                self.emit(batch)  # a refused batch is counted and its outputs released by emit
            except Aborted:
                self._downstream_stopped = True  # the stage thread stops at its next batch

    def flush(self) -> None:
        self._finish_in_flight()

    def _finish_in_flight(self) -> None:
        """Let the completion thread hand on every batch already submitted, then end it."""
        if self._completer.is_alive():
            self._submitted.put(None)
            self._completer.join()

    def discard(self, batch: FrameBatch) -> None:
        """The batch no longer needs its input: free the host slot and its in-flight credit (and, once
        refused downstream, its pinned outputs)."""
        batch.release_credit()
        if batch.slot is not None:
            self.pool.release(batch.slot)
            batch.slot = None
        if batch.release is not None:
            batch.release()
            batch.release = None

    def on_stop(self) -> None:
        self._finish_in_flight()  # also after a failure: what is in flight is finished, not lost
        self._workers.shutdown(wait=True)
        self.engine.close()


class LaneInferStage(InferStage):
    """The GPU data path: each lane copies in, enqueues and copies out on its own CUDA stream.

    Its latency is each batch's GPU wall time (H2D start to D2H end, from CUDA events). The lanes'
    pinned memory is freed by `Pipeline.close`, after postprocess has read the last outputs.
    """

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, lanes, pool: HostSlotPool, timeline=None,
                 device: int = 0):
        super().__init__(inbox, outbox, lanes.engine, pool, lanes=len(lanes.lanes), device=device)
        self.lanes = lanes
        self.timeline = timeline  # recent BatchTiming records, for the overlap picture

    def on_start(self) -> None:
        from pipeline.cuda import set_device

        set_device(self.device)  # submit copies and enqueues from this thread: on the engine's device
        super().on_start()

    def _submit(self, batch: FrameBatch):
        self.lanes.submit(batch.images(), tag=batch, n=len(batch))
        return None

    def _wait(self, batch: FrameBatch, pending):
        tag, outputs, timing, release = self.lanes.complete()
        assert tag is batch, "lanes complete in submission order"
        if self.timeline is not None:
            self.timeline.append(timing)
        return outputs, release, timing.wall / 1000.0

    def on_stop(self) -> None:
        self._finish_in_flight()
        # postprocess may still read the lanes' pinned outputs: Pipeline.close frees them
