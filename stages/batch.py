"""Batch stage: groups frames from all cameras into batches of up to `max_batch`.

A batch is sent when it is full or when `timeout` has passed since its first frame, so a camera
that stalls never holds the others back. Frames of one camera keep their order.
"""

from __future__ import annotations

import time

from pipeline.queues import CLOSED, BoundedQueue, FanIn
from pipeline.record import Frame, FrameBatch
from pipeline.stage import Stage


class BatchStage(Stage):
    name = "batch"

    def __init__(self, inbox: FanIn, outbox: BoundedQueue, max_batch: int, timeout_s: float):
        super().__init__(inbox, outbox)
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._pending: list[Frame] = []
        self._deadline = 0.0

    def loop(self) -> None:
        while True:
            wait = None if not self._pending else max(0.0, self._deadline - time.monotonic())
            item = self.inbox.get(timeout=wait if wait is not None else 0.5)
            if item is CLOSED:
                return
            if item is None:
                if self._pending and time.monotonic() >= self._deadline:
                    self._send()
                continue
            self.metrics.items_in += 1
            if not self._pending:
                self._deadline = time.monotonic() + self.timeout_s
            item.mark("batch")
            self._pending.append(item)
            if len(self._pending) >= self.max_batch:
                self._send()

    def _send(self) -> None:
        batch, self._pending = FrameBatch(self._pending), []
        waited = time.monotonic() - batch.frames[0].marks["batch"]
        self.metrics.record_latency(waited)
        self.emit(batch)

    def flush(self) -> None:
        if self._pending:
            self._send()
