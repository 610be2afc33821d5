"""Wires the stages into a graph from a `Config`, runs it and stops it.

    source (one per camera) ─► batch ─► letterbox ─► infer ─► postprocess ─► (track) ─► publish

(track only when some camera has `tracking.enabled`.)

Every arrow is a `BoundedQueue`. Camera queues block for files (nothing lost) and drop the
oldest frame for live sources (latency stays bounded); the others block, so back-pressure reaches
the decoders. Stopping sets the stop event: sources end, and end of stream flows down the graph
while every stage drains what is in flight. A stage that fails stops the run the same way, within
`runtime.shutdown_deadline_s`; past that deadline every wait is ended (`abort`) so no thread stays
blocked. The publisher's ZeroMQ context is the pipeline's own and is terminated at `close`, so
its queued messages (the last detections, the `end` messages) get their linger.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import cv2
import zmq

from engines import DeviceEngine, create_engine, require_engine
from pipeline.buffers import HostSlotPool
from pipeline.config import Config
from pipeline.metrics import StatusReporter
from pipeline.model import check_classes, labels_for, prepare_model, read_labels
from pipeline.queues import BoundedQueue, Credits, FanIn
from stages.batch import BatchStage
from stages.infer import InferStage, LaneInferStage
from stages.letterbox import GpuLetterboxStage, LetterboxStage
from stages.postprocess import PostprocessStage
from stages.publish import PreviewGate, PublishStage, bind_publisher, bound_endpoint, wait_for_subscribers
from stages.source import SourceStage, probe_files
from stages.track import TrackStage, tracked_cameras

log = logging.getLogger("pipeline")


class Pipeline:
    def __init__(self, config: Config, publish_connect: str | None = None):
        self.config = config
        self.stop_event = threading.Event()
        cv2.setNumThreads(config.runtime.opencv_threads)
        probe_files(config.cameras)  # an unreadable file is a config mistake: fail before loading anything
        require_engine(config.engine.kind)
        names = read_labels(config.model.labels)
        model = prepare_model(config.model.path, config.model.preset, config.engine.max_batch)
        self.labels = labels_for(names, model.num_classes, config.model.labels)
        check_classes(config.model.classes, model.num_classes)
        self.engine = create_engine(config.engine, model, config.model.path)
        self.model = model
        size = config.runtime.queue_size
        h, w = model.input_hw
        # every lane holds a slot while its batch is in flight; letterbox needs one more to fill
        slots = max(config.runtime.host_slots, config.engine.lanes + 2)
        self.pinned = self.device_slots = None
        if isinstance(self.engine, DeviceEngine):
            from pipeline.cuda import DeviceAllocator, PinnedAllocator, set_device
            from pipeline.lanes import LaneSet

            set_device(config.engine.device)  # this thread allocates pinned and device memory: on that device
            self.pinned = PinnedAllocator()
            if config.letterbox_on_gpu:  # letterboxed on the GPU: the batch buffers live there too
                self.device_slots = DeviceAllocator()
                self.pool = HostSlotPool(slots, (self.engine.max_batch, h, w, 3), allocator=self.device_slots)
            else:  # pinned slots, so H2D copies are DMA and overlap
                self.pool = HostSlotPool(slots, (self.engine.max_batch, h, w, 3), allocator=self.pinned)
            self.lanes = LaneSet(self.engine, config.engine.lanes)
        else:
            # an engine may bring its own host memory (triton: shared memory its server reads in place)
            allocator = getattr(self.engine, "host_allocator", None)
            self.pool = HostSlotPool(slots, (self.engine.max_batch, h, w, 3), **({"allocator": allocator} if allocator else {}))
        self.context = zmq.Context()  # the pipeline's own: `close` terminates it, which is what applies the linger
        self.socket = bind_publisher(config.publish, context=self.context, connect=publish_connect,
                                     linger_s=config.runtime.shutdown_deadline_s)
        self.endpoint = publish_connect or bound_endpoint(self.socket)

        self.sources: list[SourceStage] = []
        for camera in config.cameras:
            policy = "drop_oldest" if camera.is_live else "block"
            queue = BoundedQueue(2 if camera.is_live else size, policy, name=f"camera.{camera.id}")
            source = SourceStage(camera, queue, self.stop_event, keep_video=config.letterbox_on_gpu,
                                 device=config.engine.device)
            queue._on_drop = lambda _item, s=source: s.metrics.drop("queue_full")
            self.sources.append(source)

        batched = BoundedQueue(size, name="batched")
        boxed = BoundedQueue(size, name="letterboxed")
        inferred = BoundedQueue(size, name="inferred")
        detected = BoundedQueue(size * max(1, self.engine.max_batch), name="detected")
        # live frames must not queue between stages: they wait in the camera queues (newest kept)
        credits = Credits(config.runtime.live_batches_in_flight) if any(c.is_live for c in config.cameras) else None
        self.credits = credits
        self.queues = [batched, boxed, inferred, detected]
        self.batch = BatchStage(FanIn([s.outbox for s in self.sources]), batched, self.engine.max_batch,
                                config.engine.batch_timeout_ms / 1000.0, credits)
        previews = config.publish.preview.enabled  # previews need the decoded image until publish
        preview_gate = PreviewGate(config.publish.preview.max_fps) if previews else None
        if config.letterbox_on_gpu:
            self.letterbox = GpuLetterboxStage(batched, boxed, self.pool, model.preset, config.engine.device, preview_gate)
            preview_gate_at_publish = None  # the letterbox brings back only the frames the gate picked
        else:
            self.letterbox = LetterboxStage(batched, boxed, self.pool, model.preset, keep_images=previews,
                                            threads=config.runtime.letterbox_threads)
            preview_gate_at_publish = preview_gate
        if self.pinned is not None:
            self.timeline = collections.deque(maxlen=4096)  # recent batches' CUDA-event timings
            self.infer = LaneInferStage(boxed, inferred, self.lanes, self.pool, self.timeline, device=config.engine.device)
        else:
            self.infer = InferStage(boxed, inferred, self.engine, self.pool, lanes=config.engine.lanes)
        self.postprocess = PostprocessStage(inferred, detected, model.preset.layout, model.input_hw, model.preset.strides,
                                            config.model.conf_threshold, config.model.nms_iou, config.model.max_detections,
                                            config.model.classes)
        tracked = tracked_cameras(config, self.labels)
        self.track = None
        if tracked:  # cameras without tracking pass through it; no camera tracking: no stage at all
            self.track = TrackStage(detected, BoundedQueue(size * max(1, self.engine.max_batch), name="tracked"), tracked)
        self.publish = PublishStage(self.track.outbox if self.track else detected, self.socket, self.labels,
                                    config.publish.topic_prefix, [c.id for c in config.cameras], config.publish.preview,
                                    preview_gate_at_publish, self.end_reason,
                                    events_prefix=config.publish.events_topic_prefix,
                                    event_cameras=[c.id for c in config.cameras if c.zones or c.lines])
        self.stages = [*self.sources, self.batch, self.letterbox, self.infer, self.postprocess,
                       *([self.track] if self.track else []), self.publish]
        self.status = StatusReporter([s.metrics for s in self.stages], self.publish.metrics)

    def start(self, stop_requested: threading.Event | None = None, subscribers: int | None = None) -> None:
        """Start every stage, after waiting for `subscribers` (default `publish.wait_subscribers`).

        A stop during that wait ends it: the stages then start already stopped, so each camera
        still gets its `end` message.
        """
        publish = self.config.publish
        wanted = publish.wait_subscribers if subscribers is None else subscribers
        if stop_requested is not None and stop_requested.is_set():
            wanted = 0  # stopped before the start (while the model loaded)
            self.stop()
        if wanted:
            log.info("publish: waiting for %d subscriber(s), up to %.1f s", wanted, publish.wait_timeout_s)
            got = wait_for_subscribers(self.socket, wanted, publish.wait_timeout_s, stop_requested)
            self.publish.subscriptions = got
            if stop_requested is not None and stop_requested.is_set():
                log.info("stopped while waiting for subscribers")
                self.stop()
            elif got < wanted:
                log.warning("publish: %d of %d subscribers after %.1f s; starting anyway", got, wanted,
                            publish.wait_timeout_s)
        for stage in reversed(self.stages):  # consumers first
            stage.start()

    def stop(self) -> None:
        """Stop the sources and let the rest drain what they already accepted.

        Closing the camera queues here (not only in each source thread) means a reader blocked in
        a network read, for up to its read timeout, never holds back the drain.
        """
        self.stop_event.set()
        for source in self.sources:
            source.outbox.close()

    def abort(self) -> None:
        """The shutdown deadline passed: end every wait (slots, credits, queues) so that no stage
        thread stays blocked; what is still in flight is lost, and the run exits non-zero."""
        self.stop()
        if hasattr(self.engine, "interrupt"):  # triton: a batch still waiting for its server is lost now
            self.engine.interrupt()
        self.pool.close()
        if self.credits is not None:
            self.credits.close()
        for queue in self.queues:
            queue.close()

    @property
    def finished(self) -> bool:
        # the sources are not waited for: once their queues are closed and drained, the graph is done
        return not any(stage.alive for stage in self.stages[len(self.sources):])

    def join_sources(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for the source threads; return the cameras whose reader is still blocked."""
        deadline = time.monotonic() + timeout
        for source in self.sources:
            source.join(max(0.0, deadline - time.monotonic()))
        return [s.camera.id for s in self.sources if s.alive]

    def status_line(self) -> str:
        cameras = " ".join(
            f"{s.camera.id}={s.state.value}/f{s.next_index}/r{s.reconnects}/d{sum(s.metrics.drops.values())}"
            for s in self.sources
        )
        return (f"{self.status.line()} subscriptions={self.publish.subscriptions} "
                f"cameras[state/frames/reconnects/drops]: {cameras}")

    def end_reason(self, camera: str) -> str:
        """Why a camera's stream ended, for its end message: "eof" only when its file was read to
        the end and every frame went through; "failed" when the run failed (a camera cut off by
        another's failure is not complete); else "stopped" (a signal)."""
        source = next(s for s in self.sources if s.camera.id == camera)
        if source.failure is not None or any(stage.failure is not None for stage in self.stages[len(self.sources):]):
            return "failed"
        if source.end_reason == "eof":
            return "eof"
        return "failed" if self.failure() is not None else "stopped"

    def failure(self) -> BaseException | None:
        for stage in self.stages:
            if stage.failure is not None:
                return stage.failure
        return None

    def wait(self, stop_requested: threading.Event | None = None) -> bool:
        """Run until every stage has finished, printing status; True when all stopped in time.

        Once `stop_requested` is set (a signal) or a stage has failed, sources stop and the rest
        has `runtime.shutdown_deadline_s` to drain; past it every wait is ended and False returned.
        """
        interval = self.config.runtime.status_interval_s
        next_status = time.monotonic() + interval
        stop_deadline = None
        while not self.finished:
            time.sleep(0.05)
            now = time.monotonic()
            failed = self.failure() is not None  # a stage failed for good (it logged why): wind the rest down
            if stop_deadline is None and (failed or stop_requested is not None and stop_requested.is_set()):
                self.stop()
                stop_deadline = now + self.config.runtime.shutdown_deadline_s
            if stop_deadline is not None and now > stop_deadline:
                log.error("shutdown deadline (%.1f s) passed with stage(s) %s still running; what they hold is lost",
                          self.config.runtime.shutdown_deadline_s,
                          ", ".join(s.name for s in self.stages[len(self.sources):] if s.alive))
                self.abort()
                return False
            if now >= next_status:
                log.info("%s", self.status_line())
                next_status = now + interval
        return True

    def close(self) -> None:
        """Release GPU memory once every stage has finished (postprocess reads pinned outputs until then),
        and terminate the ZeroMQ context: that is what lets the publisher's queued messages leave,
        for up to `runtime.shutdown_deadline_s` (the socket's linger) if a subscriber is behind."""
        if not self.finished:
            return  # a stage is still running (shutdown deadline passed): leave its memory and socket alone
        if not self.socket.closed:  # never started: the publish stage did not close it
            self.socket.close()
        self.context.term()
        if self.pinned is not None:
            from pipeline.cuda import set_device

            set_device(self.config.engine.device)  # freed from this thread: its device, not GPU 0
            self.lanes.close()
            self.engine.close()
            self.pinned.free()
            self.pinned = None
            if self.device_slots is not None:
                self.device_slots.free()
        else:
            self.engine.close()  # also when the run never started (--check); engines close idempotently

    def snapshot(self) -> dict:
        summary = self.status.summary()
        summary["cameras"] = {s.camera.id: s.snapshot() for s in self.sources}
        summary["subscriptions"] = self.publish.subscriptions
        if self.publish.preview is not None:
            summary["previews_sent"] = self.publish.previews_sent
        if self.publish.event_topics:
            summary["events_sent"] = self.publish.events_sent
        return summary
