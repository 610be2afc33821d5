"""Infer stage: runs the engine on the batch's host slot and frees the slot for the next batch."""

from __future__ import annotations

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
            self.pool.release(batch.slot)
            batch.slot = None
            batch.release_credit()
        for frame in batch.frames:
            frame.mark("infer")
        self.emit(batch)

    def discard(self, batch: FrameBatch) -> None:
        batch.release_credit()
        if batch.slot is not None:
            self.pool.release(batch.slot)
            batch.slot = None

    def on_stop(self) -> None:
        self.engine.close()
