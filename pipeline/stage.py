"""The life cycle every stage shares: start, process one item at a time, stop.

A stage is a thread that takes items from its inbox, hands each to `process`, and sends results
on with `emit`. When its inbox is closed and drained it calls `flush` (for items it holds back,
such as a partly filled batch) and closes its outbox, so end of stream flows down the graph and
every stage drains what is in flight before it stops. An exception while processing one item is
logged, counted as a drop and never stops the stage; a `PipelineError` stops the whole run.

A stage that stops for good (a `PipelineError`, a bug, or `Aborted` because the stage after it
stopped) logs why at once and closes both ends: its outbox, so the stages after it drain what
they already have, and its inbox, so the stages before it are refused instead of blocking
forever on a full queue; what was left in its inbox is released and counted as `stopped`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pipeline.errors import PipelineError
from pipeline.metrics import StageMetrics
from pipeline.queues import CLOSED, Aborted, BoundedQueue
from pipeline.record import FrameBatch

log = logging.getLogger("pipeline")


def _injected_fault(stage: str) -> int | None:
    """Fault-injection point, for the shutdown tests only (tests/test_shutdown.py):
    `VAPIPE_FAULT=<stage>:<n>` makes that stage fail with a `PipelineError` on its n-th item, as a
    `CudaError` in the GPU letterbox or a lane would mid-run. Unset, it does nothing."""
    name, _, count = os.environ.get("VAPIPE_FAULT", "").partition(":")
    return int(count) if name == stage and count.isdigit() else None


def frame_count(item) -> int:
    return len(item) if isinstance(item, FrameBatch) else 1


class Stage:
    name = "stage"
    poll_s: float | None = 0.5  # how often `on_idle` runs while the inbox is empty
    times_process = True  # False: the stage records its own latency (work that finishes elsewhere)

    def __init__(self, inbox: BoundedQueue | None, outbox: BoundedQueue | None):
        self.inbox, self.outbox = inbox, outbox
        self.metrics = StageMetrics(self.name)
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._error_logged = 0
        self._waited = 0.0  # seconds spent blocked on a full outbox (or a pool) during this item
        self._fault_at = _injected_fault(self.name)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"stage-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        finished = False
        try:
            self.on_start()
            self.loop()
            self.flush()
            finished = True
        except Aborted:
            pass  # the stage after this one stopped for good and said why; this one stops quietly
        except PipelineError as exc:
            log.error("stage %s failed: %s; stopping the run", self.name, exc)  # now, not at exit
            self.failure = exc
        except BaseException as exc:  # a bug: keep the traceback for the log, stop the run
            log.exception("stage %s crashed; stopping the run", self.name)
            self.failure = exc
        finally:
            try:
                if not finished:
                    self._refuse_inbox()
                self.on_stop()
            finally:
                if self.outbox is not None:
                    self.outbox.close()

    def _refuse_inbox(self) -> None:
        """This stage stops early: producers before it must be refused, not left blocked on a full queue."""
        if self.inbox is None:
            return
        self.inbox.close()
        while (item := self.inbox.get(timeout=0)) is not None and item is not CLOSED:
            self.metrics.drop("stopped", frame_count(item))
            self.discard(item)

    def loop(self) -> None:
        while True:
            item = self.inbox.get(timeout=self.poll_s)
            if item is None:
                self.on_idle()
                continue
            if item is CLOSED:
                return
            self.metrics.items_in += 1
            self._waited = 0.0
            started = time.perf_counter()
            try:
                if self._fault_at is not None and self.metrics.items_in == self._fault_at:
                    raise PipelineError(f"{self.name}: fault injected on item {self._fault_at} (VAPIPE_FAULT)")
                self.process(item)
            except PipelineError:
                self.metrics.drop("error", frame_count(item))
                self.discard(item)
                raise
            except Aborted:  # whoever raised it counted the item
                self.discard(item)
                raise
            except Exception as exc:  # one bad item is skipped and counted, never fatal
                self.metrics.drop("error", frame_count(item))
                self._log_item_error(exc)
                self.discard(item)
            # latency is the stage's own work: waits for downstream room are back-pressure, not cost
            if self.times_process:
                self.metrics.record_latency(time.perf_counter() - started - self._waited)

    def _log_item_error(self, exc: Exception) -> None:
        self._error_logged += 1
        if self._error_logged <= 5 or self._error_logged % 1000 == 0:
            log.error("%s: item skipped (%s: %s) [%d so far]", self.name, type(exc).__name__, exc, self._error_logged)

    # -- what subclasses override -----------------------------------------------------------
    def on_start(self) -> None:
        pass

    def process(self, item) -> None:
        raise NotImplementedError

    def on_idle(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_stop(self) -> None:
        pass

    def discard(self, item) -> None:
        """Release what an item holds (a host slot, say) when it is dropped. May be called twice."""

    def emit(self, item) -> None:
        """Send an item on; raises `Aborted` (the item counted as `stopped`) once the outbox was closed
        by the stage after this one stopping for good."""
        started = time.perf_counter()
        added = self.outbox.put(item)
        self._waited += time.perf_counter() - started
        if added:
            self.metrics.items_out += 1
            self.metrics.frames_out += frame_count(item)
        elif self.outbox.closed:
            self.metrics.drop("stopped", frame_count(item))
            self.discard(item)
            raise Aborted(f"{self.name}: {self.outbox.name} closed")
