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

Cameras can join and leave a running graph (`add_camera`, `remove_camera`; pipeline/cameras.py
drives them from the HTTP API and SIGHUP): a new source and queue join the batch stage's fan-in;
a removed camera's source stops, its queued frames go through and are published, then its `end`
message ("removed"); the other cameras' queues are never touched.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time

import cv2
import zmq

from engines import DeviceEngine, create_engine, require_engine
from pipeline.buffers import HostSlotPool
from pipeline.config import CameraConfig, Config
from pipeline.errors import ConfigError
from pipeline.metrics import StatusReporter
from pipeline.model import check_classes, labels_for, prepare_model, read_labels, rect_shape
from pipeline.queues import BoundedQueue, Credits, FanIn
from stages.batch import BatchStage
from stages.infer import InferStage, LaneInferStage
from stages.letterbox import GpuLetterboxStage, LetterboxStage
from stages.postprocess import PostprocessStage
from stages.publish import PreviewGate, PublishStage, bind_publisher, bound_endpoint, wait_for_subscribers
from stages.source import SourceStage, probe_files
from stages.track import TrackStage, tracked_cameras
from sinks import create_sinks

log = logging.getLogger("pipeline")


class InputShapes:
    """Frame -> the model input (height, width) it is letterboxed to: the square, or with a
    shape-dynamic model the smallest stride-aligned rectangle that holds it (one per frame size)."""

    def __init__(self, model):
        self.model = model

    @functools.lru_cache(maxsize=64)
    def for_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if not self.model.shape_dynamic:
            return tuple(self.model.input_hw)
        return rect_shape(size, self.model.input_hw, self.model.stride)

    def __call__(self, frame) -> tuple[int, int]:
        return self.for_size(tuple(frame.source_size))


class Pipeline:
    def __init__(self, config: Config, publish_connect: str | None = None, ownership=None):
        """`ownership`: fleet mode's gate and stamp for each message (PublishStage, pipeline/fleet.py)."""
        self.config = config
        self.stop_event = threading.Event()
        cv2.setNumThreads(config.runtime.opencv_threads)
        sizes = probe_files(config.cameras)  # an unreadable file is a config mistake: fail before loading anything
        if config.publish.keys is not None and publish_connect is None:
            from pipeline.keys import CurveServer

            CurveServer.check(config.publish.keys)  # so are missing keys
        require_engine(config.engine.kind)
        names = read_labels(config.model.labels)
        letterbox = config.model.letterbox
        if config.engine.kind == "triton" and letterbox == "rect":
            # the served model is the one export-triton writes: a fixed square input
            log.info("engine triton: letterbox square (the model on the server has a fixed input size)")
            letterbox = "square"
        model = prepare_model(config.model.path, config.model.preset, config.engine.max_batch, letterbox)
        self.labels = labels_for(names, model.num_classes, config.model.labels)
        check_classes(config.model.classes, model.num_classes)
        self.shape_of = InputShapes(model)
        # the file cameras' shapes, most common first: GPU engines prepare them at start
        counts = collections.Counter(self.shape_of.for_size(size) for size in sizes.values())
        self.engine = create_engine(config.engine, model, [shape for shape, _ in counts.most_common()] or None,
                                    model_path=config.model.path)
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
        self.curve = None
        if config.publish.keys is not None and publish_connect is None:  # a worker's proxy holds the keys
            from pipeline.keys import CurveServer

            self.curve = CurveServer(self.context, config.publish.keys)
        try:
            self.socket = bind_publisher(config.publish, context=self.context, connect=publish_connect,
                                         linger_s=config.runtime.shutdown_deadline_s, curve=self.curve)
        except BaseException:
            if self.curve is not None:
                self.curve.stop()
            raise
        self.endpoint = publish_connect or bound_endpoint(self.socket)
        self.sinks = create_sinks(config.publish.sinks, client_name=f"vapipe-{os.getpid()}")
        # the run's start for the sources: open except from `preroll()` to `start()`, while each camera
        # holds its first frame
        self.gate = threading.Event()
        self.gate.set()

        self.sources: list[SourceStage] = [self._make_source(camera) for camera in config.cameras]

        batched = BoundedQueue(size, name="batched")
        boxed = BoundedQueue(size, name="letterboxed")
        inferred = BoundedQueue(size, name="inferred")
        detected = BoundedQueue(size * max(1, self.engine.max_batch), name="detected")
        # live frames must not queue between stages: they wait in the camera queues (newest kept)
        credits = Credits(config.runtime.live_batches_in_flight) if any(c.is_live for c in config.cameras) else None
        self.credits = credits
        self.queues = [batched, boxed, inferred, detected]
        self.batch = BatchStage(FanIn([s.outbox for s in self.sources]), batched, self.engine.max_batch,
                                config.engine.batch_timeout_ms / 1000.0, credits, shape_of=self.shape_of)
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
                                    event_cameras=[c.id for c in config.cameras if c.zones or c.lines],
                                    sinks=self.sinks, ownership=ownership)
        # the stages after the sources (the sources come and go: `add_camera`, `remove_camera`)
        self.core_stages = [self.batch, self.letterbox, self.infer, self.postprocess,
                            *([self.track] if self.track else []), self.publish]
        self.status = StatusReporter([s.metrics for s in self.stages], self.publish.metrics)
        self._changing = threading.Lock()  # one camera change at a time
        self.started = False  # start() has started the stages: a camera added before waits for it
        self.removed_cameras: dict[str, dict] = {}  # id -> final statistics, for the summary

    @property
    def stages(self) -> list:
        return [*self.sources, *self.core_stages]

    def _make_source(self, camera: CameraConfig) -> SourceStage:
        policy = "drop_oldest" if camera.is_live else "block"
        queue = BoundedQueue(2 if camera.is_live else self.config.runtime.queue_size, policy, name=f"camera.{camera.id}")
        # its own stop: a removed camera stops alone (`stop` sets every camera's)
        source = SourceStage(camera, queue, threading.Event(), keep_video=self.config.letterbox_on_gpu,
                             device=self.config.engine.device, gate=self.gate)
        queue._on_drop = lambda _item, s=source: s.metrics.drop("queue_full")
        return source

    def add_camera(self, camera: CameraConfig) -> SourceStage:
        """Start a camera in the running graph (validated by pipeline.config.parse_camera); raises
        ConfigError with one line when it cannot join (an unreadable file, a duplicate id, tracking
        this run's graph has no stage for, the run ending)."""
        with self._changing:
            where = f"camera {camera.id}"
            if any(s.camera.id == camera.id for s in self.sources):
                raise ConfigError(f"{where}: a camera with this id is running already")
            if self.track is None and self.config.tracking_for(camera).enabled:
                raise ConfigError(f"{where}: tracking: this run started without tracking (no track stage); "
                                  f"restart with tracking on to add tracked cameras")
            if camera.decoder == "nvdec" and not self.config.letterbox_on_gpu:
                raise ConfigError(f"{where}: decoder: nvdec needs the GPU letterbox, which this run did not start with")
            if camera.is_file:
                try:
                    probe_files([camera])
                except ConfigError as exc:  # named as the API names it: the body's keys
                    raise ConfigError(str(exc).replace("cameras[0].", "", 1)) from None
            source = self._make_source(camera)
            if camera.is_live and self.batch.credits is None:  # the first live camera: bound its latency
                self.credits = self.batch.credits = Credits(self.config.runtime.live_batches_in_flight)
            if self.track is not None and self.config.tracking_for(camera).enabled:
                from stages.track import tracked_cameras

                self.track.cameras.update(tracked_cameras(self.config.model_copy(update={"cameras": [camera]}), self.labels))
            if self.stop_event.is_set() or not self.batch.inbox.add(source.outbox):
                raise ConfigError(f"{where}: the run is stopping; no camera can join")
            self.publish.add_camera(camera.id, events=bool(camera.zones or camera.lines))  # before its first frame
            self.sources = [*self.sources, source]
            self.config = self.config.model_copy(update={"cameras": [*self.config.cameras, camera]})
            self.status.metrics = [s.metrics for s in self.stages]
            if self.started:  # running: start it now; added before (the run waiting for subscribers), start() starts it, once
                source.start()
            log.info("camera %s added: %s", camera.id, source.safe_url)
            return source

    def remove_camera(self, camera_id: str, timeout_s: float | None = None) -> dict:
        """Stop one camera; its queued frames are published, then its `end` message ("removed").
        Returns its final statistics. KeyError: no such camera; ConfigError: it is the last one
        still running (the run would end: stop it instead)."""
        with self._changing:
            source = next((s for s in self.sources if s.camera.id == camera_id), None)
            if source is None:
                raise KeyError(camera_id)
            if not any(s is not source and not s.outbox.closed for s in self.sources):
                raise ConfigError(f"camera {camera_id}: the last camera of this run cannot be removed "
                                  f"(the run would end); add another first, or stop the run")
            source.stop_event.set()
            source.outbox.close()  # refuses its reader's next frame; what is queued still goes through
            source.join(timeout=1.0)  # a reader in a network read stays there up to its read timeout
            # the last queued frame is waited for as long as the camera's frames keep coming out
            wait_s = max(5.0, self.config.runtime.shutdown_deadline_s) if timeout_s is None else timeout_s
            done = self.publish.retire(camera_id, source.last_queued, wait_s)
            while not done.wait(0.5) and not self.finished:
                pass
            self.batch.inbox.remove(source.outbox)
            self.sources = [s for s in self.sources if s is not source]
            self.config = self.config.model_copy(update={"cameras": [c for c in self.config.cameras if c.id != camera_id]})
            self.status.metrics = [s.metrics for s in self.stages]
            if self.track is not None:
                self.track.cameras.pop(camera_id, None)
            log.info("camera %s removed after %d frame(s)", camera_id, source.next_index)
            self.removed_cameras[camera_id] = source.snapshot()
            return self.removed_cameras[camera_id]

    def preroll(self, stop_requested: threading.Event | None = None) -> list[str]:
        """Open every camera and decode its first frame before the run starts, at most
        `runtime.preroll_timeout_s`; each holds that frame until `start()` (SourceStage._hold).

        Opening is slow when many cameras open at once (a hundred NVDEC decoders: tens of seconds), and
        a camera that started first would fall behind while the others open. A camera whose attempt
        failed (refused, not found, timed out: each open is bounded by its open_timeout_s) is down, not
        slow: it is not waited for, and starts when it connects. Returns the cameras not opened (each
        starts when it opens)."""
        timeout_s = self.config.runtime.preroll_timeout_s
        if not timeout_s or self.started:
            return []
        self.gate.clear()
        with self._changing:
            sources = list(self.sources)
        began = time.monotonic()
        for source in sources:
            source.start()
        opening = sources
        while True:
            opening = [s for s in opening if s.alive and not s.opened.is_set() and not s.open_failed]
            stopped = stop_requested is not None and stop_requested.is_set()
            if not opening or stopped or time.monotonic() - began >= timeout_s:
                break
            time.sleep(0.05)
        if stopped:
            return []
        down = [s.camera.id for s in sources if s.open_failed and not s.opened.is_set()]
        opened = sum(s.opened.is_set() for s in sources)
        log.info("preroll: %d camera(s) opened in %.1f s%s", opened, time.monotonic() - began,
                 f"; not waiting for {len(down)} that could not be opened ({', '.join(down)}): each starts when it "
                 f"connects" if down else "")
        if opening:
            log.warning("preroll: %d of %d camera(s) still opening after %.0f s (runtime.preroll_timeout_s): %s; "
                        "the run starts without them, each starts when it opens", len(opening), len(sources), timeout_s,
                        ", ".join(s.camera.id for s in opening))
        return [*down, *(s.camera.id for s in opening)]

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
        with self._changing:  # a camera added from here on starts itself
            self.started = True
            sources = list(reversed(self.sources))
        for stage in reversed(self.core_stages):  # consumers first
            stage.start()
        self.gate.set()  # the prerolled cameras send their first frames
        for source in sources:
            if not source.started:  # not prerolled
                source.start()

    def stop(self) -> None:
        """Stop the sources and let the rest drain what they already accepted.

        Closing the camera queues here (not only in each source thread) means a reader blocked in
        a network read, for up to its read timeout, never holds back the drain.
        """
        self.stop_event.set()
        for source in self.sources:
            source.stop_event.set()
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
        return not any(stage.alive for stage in self.core_stages)

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
        sinks = "".join(f" {sink.status()}" for sink in self.sinks)  # name=state/sent/dropped
        return (f"{self.status.line()} subscriptions={self.publish.subscriptions}{sinks} "
                f"cameras[state/frames/reconnects/drops]: {cameras}")

    def end_reason(self, camera: str) -> str:
        """Why a camera's stream ended, for its end message: "eof" only when its file was read to
        the end and every frame went through; "failed" when the run failed (a camera cut off by
        another's failure is not complete); else "stopped" (a signal)."""
        source = next((s for s in self.sources if s.camera.id == camera), None)
        if source is None:
            return "removed" if camera in self.removed_cameras else "stopped"
        if source.failure is not None or any(stage.failure is not None for stage in self.core_stages):
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
                          ", ".join(s.name for s in self.core_stages if s.alive))
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
        for sink in self.sinks:  # the brokers get the shutdown deadline for what they still buffer
            sink.close(self.config.runtime.shutdown_deadline_s)
        if not self.finished:
            return  # a stage is still running (shutdown deadline passed): leave its memory and socket alone
        if not self.socket.closed:  # never started: the publish stage did not close it
            self.socket.close()
        if self.curve is not None:
            self.curve.stop()
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
        if self.removed_cameras:
            summary["removed_cameras"] = dict(self.removed_cameras)
        summary["subscriptions"] = self.publish.subscriptions
        # batches per model input shape (HxW): one shape a batch, one rectangle per camera shape
        summary["batches_by_shape"] = {f"{h}x{w}": n for (h, w), n in sorted(self.batch.batches_by_shape.items())}
        if self.publish.preview is not None:
            summary["previews_sent"] = self.publish.previews_sent
        if self.publish.event_topics:
            summary["events_sent"] = self.publish.events_sent
        if self.sinks:
            summary["sinks"] = {sink.name: sink.snapshot() for sink in self.sinks}
        return summary
