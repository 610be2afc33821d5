"""Publish stage: one ZeroMQ message per frame on the camera's topic, never blocking the pipeline.

The socket is an XPUB (a PUB that also reports subscriptions, so a run can wait for its first
subscribers). Topics are `det/<camera>/`: the closing slash keeps camera `cam1`'s subscribers
from matching `cam10`. Messages are multipart `[topic, header]`, the header UTF-8 JSON in the
schema documented in README.md (`SCHEMA` below). Sends never block: an XPUB socket drops a
message, silently and per subscriber, when that subscriber's queue is at the high-water mark, so
a slow subscriber costs only its own messages. The publisher cannot see those drops (an XPUB never
refuses a send; `ZMQ_XPUB_NODROP` would make one slow subscriber cost every subscriber of the topic
its messages), so it does not pretend to count them: the per-topic `seq` lets each subscriber count
its own losses (`run.py subscribe` and the viewer report them).

With `publish.preview.enabled`, a camera's frame also goes out as a JPEG preview on
`preview/<camera>/` (`[topic, header, jpeg]`, schema `PREVIEW_SCHEMA`), scaled down and at most
`max_fps` a camera, right after that frame's detections. Encoding happens here, only for the
frames the rate limit lets through (a few milliseconds, a few times a second), so the hot path
stays cheap; the decoded image is dropped as soon as it has been looked at.

With `publish.sinks`, each detections message (and each camera's end) is also offered, encoded
once, to the broker sinks (sinks/: Redis Streams, MQTT), which buffer it and send it from their own
threads: offering never waits. In fleet mode (pipeline/fleet.py) `ownership` says, per frame,
whether this host still holds the camera's lease: if not, the frame is dropped (counted as
`not_owner`); if so, the message carries the host and its fencing number.

With tracking and zones or lines on a camera, each zone or line event goes out as its own message on
`events/<camera>/` (schema `EVENTS_SCHEMA`), after that frame's detections, sent like them
(non-blocking; a subscriber counts its own losses from the events' `seq`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Callable

import cv2
import zmq

from pipeline.config import PreviewConfig, PublishConfig
from pipeline.errors import PublishError
from pipeline.metrics import END_TO_END_BUCKETS_S, LatencyHistogram
from pipeline.queues import BoundedQueue
from pipeline.record import Frame
from pipeline.stage import Stage

log = logging.getLogger("pipeline")

# 1.1: `track_id` and `track_age_s` on tracked detections, `analytics` (zone and line counts); both
# only present when tracking is on, so a 1.0 reader reads 1.1 messages unchanged
SCHEMA = "vapipe.detections/1.2"
PREVIEW_SCHEMA = "vapipe.preview/1"
EVENTS_SCHEMA = "vapipe.events/1"


def topic_for(prefix: str, camera: str) -> bytes:
    return f"{prefix}/{camera}/".encode()


def to_message(frame: Frame, labels: list[str], seq: int) -> dict:
    dets = frame.detections
    detections = []
    if dets is not None:
        for box, score, class_id in zip(dets.xyxy.tolist(), dets.scores.tolist(), dets.class_ids.tolist()):
            detections.append({
                "class_id": class_id,
                "label": labels[class_id] if 0 <= class_id < len(labels) else str(class_id),
                "score": round(score, 4),
                "box": [round(v, 2) for v in box],
            })
        if dets.track_ids is not None:
            for detection, track, age in zip(detections, dets.track_ids.tolist(), dets.track_ages.tolist()):
                if track >= 0:
                    detection["track_id"] = track
                    detection["track_age_s"] = round(age, 3)
    now = time.time()
    message = {
        "schema": SCHEMA,
        "type": "detections",
        "camera": frame.camera,
        "seq": seq,
        "frame": frame.index,
        "pts": frame.pts,
        "capture_time": frame.capture_time,
        "publish_time": now,
        "width": frame.source_size[0],
        "height": frame.source_size[1],
        "detections": detections,
        "latency_ms": {**frame.stage_latency_ms(), "total": round((now - frame.capture_time) * 1000.0, 3)},
    }
    if frame.analytics is not None:
        message["analytics"] = frame.analytics
    return message


def to_events(frame: Frame, seq: int) -> list[dict]:
    """A frame's zone and line events, one message each, numbered from `seq` on the camera's events topic."""
    out = []
    for i, event in enumerate(frame.events or ()):
        out.append({"schema": EVENTS_SCHEMA, **event, "camera": frame.camera, "seq": seq + i, "frame": frame.index,
                    "pts": frame.pts, "capture_time": frame.capture_time, "publish_time": time.time()})
    return out


def encode_preview(frame: Frame, image, config: PreviewConfig, seq: int) -> tuple[dict, bytes]:
    """Scale the frame's image down to `config.width` and JPEG-encode it; returns (header, jpeg)."""
    src_h, src_w = image.shape[:2]
    if src_w > config.width:
        height = max(1, round(src_h * config.width / src_w))
        # bilinear is 5x cheaper than INTER_AREA and alias-free down to half size; beyond that, area
        shrink = cv2.INTER_LINEAR if config.width * 2 >= src_w else cv2.INTER_AREA
        image = cv2.resize(image, (config.width, height), interpolation=shrink)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    header = {
        "schema": PREVIEW_SCHEMA,
        "type": "preview",
        "camera": frame.camera,
        "seq": seq,
        "frame": frame.index,
        "pts": frame.pts,
        "capture_time": frame.capture_time,
        "publish_time": time.time(),
        "width": image.shape[1],
        "height": image.shape[0],
        "source_width": frame.source_size[0],
        "source_height": frame.source_size[1],
    }
    return header, jpeg.tobytes()


class PreviewGate:
    """Which frames become previews: at most `max_fps` per camera, on a fixed grid of send times
    (not "last + interval"), so the rate holds on average. Shared with the GPU letterbox, which
    must pick the frames to bring back to the host before the publisher sees them."""

    def __init__(self, max_fps: float):
        self.interval = 1.0 / max_fps
        self.due: dict[str, float] = {}  # camera -> monotonic time the next preview may go

    def take(self, camera: str) -> bool:
        now = time.monotonic()
        due = self.due.get(camera, 0.0)
        if now < due:
            return False
        self.due[camera] = max(due + self.interval, now - self.interval)
        return True


def bind_publisher(config: PublishConfig, context: zmq.Context | None = None, connect: str | None = None,
                   linger_s: float = 2.0, curve=None) -> zmq.Socket:
    """The publishing socket, bound at `config.bind`; or, in a worker process, connected to the
    supervisor's proxy at `connect` (pipeline/workers.py). `linger_s`: how long queued messages may
    take to leave once the socket is closed and its context terminated (the shutdown deadline).
    `curve` (a pipeline.keys.CurveServer): only subscribers with an admitted key get in."""
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.SNDHWM, config.send_hwm)
    socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
    socket.setsockopt(zmq.XPUB_VERBOSE, 1)
    if connect is not None:
        socket.connect(connect)
        return socket
    if curve is not None:
        curve.secure(socket)
    try:
        socket.bind(config.bind)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise PublishError(f"publish.bind: cannot bind {config.bind}: {exc.strerror}") from None
    return socket


def bound_endpoint(socket: zmq.Socket) -> str:
    """The endpoint a socket really bound: `tcp://127.0.0.1:*` becomes the port the system chose."""
    return socket.getsockopt_string(zmq.LAST_ENDPOINT) or "?"


def wait_for_subscribers(socket: zmq.Socket, count: int, timeout_s: float, stop: threading.Event | None = None) -> int:
    """Block until `count` subscriptions arrived, the timeout passed or `stop` was set (a signal:
    checked every 0.1 s); returns how many arrived."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < count and not (stop is not None and stop.is_set()):
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            break
        if not socket.poll(min(remaining_ms, 100), zmq.POLLIN):
            continue
        message = socket.recv()
        if message[:1] == b"\x01":
            seen += 1
    return seen


class PublishStage(Stage):
    name = "publish"

    def __init__(self, inbox: BoundedQueue, socket: zmq.Socket, labels: list[str], prefix: str, cameras: list[str],
                 preview: PreviewConfig | None = None, preview_gate: PreviewGate | None = None,
                 end_reason: Callable[[str], str] | None = None, events_prefix: str = "events",
                 event_cameras: list[str] = (), sinks: list = (),
                 ownership: Callable[[str], dict | None] | None = None):
        super().__init__(inbox, None)
        # brokers beside ZeroMQ (sinks/): each message is offered to them too, never waiting on them
        self.sinks = list(sinks)
        # fleet mode (pipeline/fleet.py): camera -> fields stamped into its messages ({"host", "fence"}),
        # or None when this host does not hold the camera's lease (its frames are dropped, counted)
        self.ownership = ownership
        # camera -> why its stream ended ("eof", "stopped", "failed"), asked when the end messages go out
        self.end_reason = end_reason or (lambda _camera: "eof")
        self.socket = socket
        self.labels = labels
        self.prefix, self.events_prefix = prefix, events_prefix
        self.topics = {camera: topic_for(prefix, camera) for camera in cameras}
        self.seq = {camera: 0 for camera in cameras}
        # capture to publish, per camera (Prometheus: vapipe_capture_to_publish_seconds)
        self.latency = {camera: LatencyHistogram(END_TO_END_BUCKETS_S) for camera in cameras}
        self.preview = preview if preview is not None and preview.enabled else None
        if self.preview is not None:
            self.preview_topics = {camera: topic_for(self.preview.topic_prefix, camera) for camera in cameras}
            self.preview_seq = {camera: 0 for camera in cameras}
            # None: an earlier stage already chose the frames (only those carry an image)
            self.preview_gate = preview_gate
            self.previews_sent = 0
        self.subscriptions = 0  # subscription notices received (duplicates too: XPUB_VERBOSE)
        # zone and line events, for the cameras that have zones or lines
        self.event_topics = {camera: topic_for(events_prefix, camera) for camera in event_cameras}
        self.event_seq = {camera: 0 for camera in event_cameras}
        self.events_sent = 0
        # cameras added or removed while the run goes (Pipeline.add_camera/remove_camera): asked for
        # from another thread, applied in this one, which alone uses the socket and these dicts
        self._changes: collections.deque = collections.deque()
        self._retiring: dict[str, tuple[int | None, threading.Event, float]] = {}
        self._last_index: dict[str, int] = {}  # camera -> index of the last frame published
        self._retire_timeout: dict[str, float] = {}

    def add_camera(self, camera: str, events: bool) -> None:
        """Publish a new camera's frames (asked before its first frame can get here)."""
        self._changes.append(("add", camera, events))

    def retire(self, camera: str, last_index: int | None, timeout_s: float) -> threading.Event:
        """A removed camera: once its frame `last_index` (the last its source queued; None: none)
        is published, send its `end` ("removed") and forget it. A frame that never comes (dropped
        on the way, counted there) is waited for until none of the camera's frames has come for
        `timeout_s` (a backed-up pipeline still brings them: each one restarts the wait). The event
        is set when done."""
        done = threading.Event()
        self._retire_timeout[camera] = timeout_s
        self._changes.append(("retire", camera, (last_index, done, time.monotonic() + timeout_s)))
        return done

    def _apply_changes(self) -> None:
        while self._changes:
            kind, camera, argument = self._changes.popleft()
            if kind == "add":
                self.topics[camera] = topic_for(self.prefix, camera)
                self.seq[camera] = 0
                self.latency[camera] = LatencyHistogram(END_TO_END_BUCKETS_S)
                if self.preview is not None:
                    self.preview_topics[camera] = topic_for(self.preview.topic_prefix, camera)
                    self.preview_seq[camera] = 0
                if argument:
                    self.event_topics[camera] = topic_for(self.events_prefix, camera)
                    self.event_seq[camera] = 0
            else:
                self._retiring[camera] = argument

    def _check_retiring(self, force: bool = False, frame: Frame | None = None) -> None:
        now = time.monotonic()
        for camera, (last_index, done, deadline) in list(self._retiring.items()):
            if frame is not None and frame.camera == camera:  # still coming: wait on
                deadline = now + self._retire_timeout[camera]
                self._retiring[camera] = (last_index, done, deadline)
            if force or last_index is None or self._last_index.get(camera, -1) >= last_index or now > deadline:
                self._send_end(camera, "removed")
                del self._retiring[camera]
                for table in (self.topics, self.seq, self.latency, self._last_index, self.event_topics, self.event_seq,
                              getattr(self, "preview_topics", {}), getattr(self, "preview_seq", {})):
                    table.pop(camera, None)
                done.set()

    def _send(self, topic: bytes, header: dict, *payload: bytes, camera: str | None = None) -> None:
        # never blocks: a full subscriber queue drops this message for that subscriber only (see above)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        self.socket.send_multipart([topic, encoded, *payload], flags=zmq.NOBLOCK)
        if camera is not None:  # detections (and their end) also go to the brokers, which never block either
            for sink in self.sinks:
                sink.offer(camera, encoded)

    def _send_preview(self, frame: Frame) -> None:
        image, frame.image = frame.image, None  # the pipeline keeps no decoded image past this point
        camera = frame.camera
        if image is None or (self.preview_gate is not None and not self.preview_gate.take(camera)):
            return
        header, jpeg = encode_preview(frame, image, self.preview, self.preview_seq[camera])
        self.preview_seq[camera] += 1
        self._send(self.preview_topics[camera], header, jpeg)
        self.previews_sent += 1

    def process(self, frame: Frame) -> None:
        if self._changes:
            self._apply_changes()
        if frame.camera not in self.topics:  # a removed camera's straggler (its end went out): counted, not sent
            self.metrics.drop("removed")
            return
        frame.mark("publish")
        owner = None
        if self.ownership is not None:
            owner = self.ownership(frame.camera)
            if owner is None:  # the lease is gone: another host may already publish this camera
                frame.image = None
                self.metrics.drop("not_owner")
                return
        message = to_message(frame, self.labels, self.seq[frame.camera])
        if owner:
            message.update(owner)
        self.seq[frame.camera] += 1
        self._send(self.topics[frame.camera], message, camera=frame.camera)
        self.latency[frame.camera].observe(message["latency_ms"]["total"] / 1000.0)
        self._last_index[frame.camera] = frame.index
        self.metrics.items_out += 1
        self.metrics.frames_out += 1
        if frame.events:
            self._send_events(frame)
        if self.preview is not None:
            self._send_preview(frame)  # after the detections, so a viewer usually has them first
        self._drain_subscriptions()  # under load too: a busy publisher is never idle
        if self._retiring:
            self._check_retiring(frame=frame)

    def _send_events(self, frame: Frame) -> None:
        topic = self.event_topics.get(frame.camera)
        if topic is None:
            return
        for event in to_events(frame, self.event_seq[frame.camera]):
            self.event_seq[frame.camera] += 1
            self._send(topic, event)
            self.events_sent += 1

    def on_idle(self) -> None:
        if self._changes:
            self._apply_changes()
        self._drain_subscriptions()
        if self._retiring:
            self._check_retiring()

    def _drain_subscriptions(self) -> None:
        # XPUB queues every subscription notice (in a queue with no bound); read them so they never pile up
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            if self.socket.recv()[:1] == b"\x01":
                self.subscriptions += 1

    def flush(self) -> None:
        self._apply_changes()
        self._check_retiring(force=True)  # removed cameras whose last frame is past: "removed"
        # "reason" tells a complete stream ("eof") from one that was stopped or cut off by a failure
        for camera in list(self.topics):
            owner = None
            if self.ownership is not None:  # fleet mode: only the cameras this host holds end here
                owner = self.ownership(camera)
                if owner is None:
                    continue
            self._send_end(camera, self.end_reason(camera), owner)

    def _send_end(self, camera: str, reason: str, owner: dict | None = None) -> None:
        if camera in self.topics:
            end = {"schema": SCHEMA, "type": "end", "camera": camera, "seq": self.seq[camera], "reason": reason}
            end.update(owner or {})
            self._send(self.topics[camera], end, camera=camera)
        if camera in self.event_topics:
            self._send(self.event_topics[camera], {"schema": EVENTS_SCHEMA, "type": "end", "camera": camera,
                                                   "seq": self.event_seq[camera], "reason": reason})

    def on_stop(self) -> None:
        self.socket.close()
