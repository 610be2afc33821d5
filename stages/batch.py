"""Batch stage: groups frames from all cameras into batches of up to `max_batch`.

A batch is sent when it is full or when `timeout` has passed since its first frame, so a camera
that stalls never holds the others back. Frames of one camera keep their order. With `credits`
(live cameras) a batch is only started once fewer than `credits.count` batches are in flight, so
frames wait where the newest are kept: in the camera queues.
"""

from __future__ import annotations

import time

from pipeline.queues import CLOSED, Aborted, BoundedQueue, Credits, FanIn
from pipeline.record import Frame, FrameBatch
from pipeline.stage import Stage


class BatchStage(Stage):
    name = "batch"

    def __init__(self, inbox: FanIn, outbox: BoundedQueue, max_batch: int, timeout_s: float, credits: Credits | None = None):
        super().__init__(inbox, outbox)
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.credits = credits
        self._holding_credit = False
        self._pending: list[Frame] = []
        self._deadline = 0.0

    def loop(self) -> None:
        try:
            self._loop()
        finally:
            if self._holding_credit and not self._pending:
                self._holding_credit = False
                self.credits.release()

    def _loop(self) -> None:
        while True:
            if self.credits is not None and not self._holding_credit:
                if not self.credits.acquire(timeout=0.5):
                    if self.credits.closed:  # torn down (shutdown deadline passed): nothing will give one back
                        self.metrics.drop("stopped", len(self._pending))
                        self._pending = []
                        raise Aborted("batch credits closed")
                    continue  # every batch in flight is still being inferred; frames wait upstream
                self._holding_credit = True
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
        if self._holding_credit:
            batch.credit, self._holding_credit = self.credits, False
        waited = time.monotonic() - batch.frames[0].marks["batch"]
        self.metrics.record_latency(waited)
        self.emit(batch)

    def flush(self) -> None:
        if self._pending:
            self._send()

    def discard(self, batch) -> None:
        if isinstance(batch, FrameBatch):
            batch.release_credit()
