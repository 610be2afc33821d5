"""Batch stage: groups frames from all cameras into batches of up to `max_batch`.

A batch is sent when it is full or when `timeout` has passed since its first frame, so a camera
that stalls never holds the others back. Frames of one camera keep their order. With `credits`
(live cameras) a batch is only started once fewer than `credits.count` batches are in flight, so
frames wait where the newest are kept: in the camera queues.

A batch has one input shape. With rectangle letterboxing (`shape_of` gives each frame the
model input it is letterboxed to) frames are grouped by shape: one pending batch per shape, each
with its own timeout, so a camera of another shape (portrait, another aspect ratio, a stream whose
resolution changed) neither waits for nor splits the others' batches.
"""

from __future__ import annotations

import time
from typing import Callable

from pipeline.queues import CLOSED, Aborted, BoundedQueue, Credits, FanIn
from pipeline.record import Frame, FrameBatch
from pipeline.stage import Stage


class BatchStage(Stage):
    name = "batch"

    def __init__(self, inbox: FanIn, outbox: BoundedQueue, max_batch: int, timeout_s: float, credits: Credits | None = None,
                 shape_of: Callable[[Frame], tuple[int, int]] | None = None):
        super().__init__(inbox, outbox)
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.credits = credits
        self.shape_of = shape_of or (lambda frame: None)
        self._holding_credit = False
        self._pending: dict[tuple[int, int] | None, list[Frame]] = {}  # per input shape, oldest group first
        self._deadlines: dict[tuple[int, int] | None, float] = {}
        self.batches_by_shape: dict[tuple[int, int] | None, int] = {}

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
                        self.metrics.drop("stopped", sum(map(len, self._pending.values())))
                        self._pending, self._deadlines = {}, {}
                        raise Aborted("batch credits closed")
                    continue  # every batch in flight is still being inferred; frames wait upstream
                self._holding_credit = True
            wait = None if not self._pending else max(0.0, min(self._deadlines.values()) - time.monotonic())
            item = self.inbox.get(timeout=wait if wait is not None else 0.5)
            if item is CLOSED:
                return
            if item is not None:
                self.metrics.items_in += 1
                shape = self.shape_of(item)
                group = self._pending.get(shape)
                if group is None:
                    group = self._pending[shape] = []
                    self._deadlines[shape] = time.monotonic() + self.timeout_s
                item.mark("batch")
                group.append(item)
                if len(group) >= self.max_batch:
                    self._send(shape)
            self._send_due()

    def _send_due(self) -> None:
        """Send the groups whose timeout passed, oldest first; with credits, one per credit held."""
        now = time.monotonic()
        for shape in [s for s, deadline in sorted(self._deadlines.items(), key=lambda kv: kv[1]) if deadline <= now]:
            if self.credits is not None and not self._holding_credit:
                return  # the loop waits for the next credit first
            self._send(shape)

    def _send(self, shape) -> None:
        batch = FrameBatch(self._pending.pop(shape), input_hw=shape)
        del self._deadlines[shape]
        self.batches_by_shape[shape] = self.batches_by_shape.get(shape, 0) + 1
        if self._holding_credit:
            batch.credit, self._holding_credit = self.credits, False
        waited = time.monotonic() - batch.frames[0].marks["batch"]
        self.metrics.record_latency(waited)
        self.emit(batch)

    def flush(self) -> None:
        for shape in sorted(self._deadlines, key=self._deadlines.get):
            self._send(shape)

    def discard(self, batch) -> None:
        if isinstance(batch, FrameBatch):
            batch.release_credit()
