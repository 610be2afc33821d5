"""`run.py view`: subscribe to a publisher, pair previews with detections, draw, show or save.

One SUB socket subscribes to `det/<camera>/` and `preview/<camera>/` (or every camera). Each loop
drains whatever arrived, lets each camera's `CameraStream` pair it, and renders only the newest
paired frame per camera, so a slow screen never builds a backlog (older frames are skipped, the
publisher's non-blocking sends absorb the rest). Outputs: a window per camera (q or Esc quits,
s saves a snapshot), a video per camera (`--record`) and periodic PNG snapshots
(`--snapshot-dir`). ZeroMQ reconnects by itself, so the viewer may start before the publisher,
join mid-stream and outlive a publisher restart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from pipeline.errors import UsageError
from pipeline.keys import secure_client

from pipeline.errors import PipelineError
from viewer.annotate import blank_canvas, draw_analytics, draw_detections, draw_status, draw_trails
from viewer.stream import CameraStream, Paired, count_lines

log = logging.getLogger("viewer")

NO_PREVIEW_AFTER_S = 2.0  # then detections are drawn on a blank canvas (publisher has previews off)
STATUS_REFRESH_S = 0.5  # windows redraw the last frame this often, so fps/latency/state stay current


class ViewerError(PipelineError):
    exit_code = 2


def topic(prefix: str, camera: str | None) -> bytes:
    return f"{prefix}/{camera}/".encode() if camera else f"{prefix}/".encode()


# -- outputs --------------------------------------------------------------------------------------
class WindowOutput:
    """One OpenCV window per camera, tiled left to right, top to bottom in order of appearance."""

    def __init__(self, columns: int = 3):
        self.columns = columns
        self.names: dict[str, str] = {}
        self.quit = False
        self.snapshot_requested = False

    def write(self, camera: str, image: np.ndarray, paired: Paired, new: bool) -> None:
        name = self.names.get(camera)
        if name is None:
            name = self.names[camera] = f"vapipe {camera}"
            # GUI_NORMAL: no toolbar or status bar, the window is the image and nothing else
            cv2.namedWindow(name, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            i = len(self.names) - 1
            cv2.moveWindow(name, (i % self.columns) * (image.shape[1] + 10), (i // self.columns) * (image.shape[0] + 40))
        cv2.imshow(name, image)

    def poll(self) -> None:
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            self.quit = True
        elif key in (ord("s"), ord("S")):
            self.snapshot_requested = True
        for name in self.names.values():  # the window's close button quits too
            try:
                if cv2.getWindowProperty(name, cv2.WND_PROP_VISIBLE) < 1:
                    self.quit = True
            except cv2.error:
                self.quit = True

    def close(self) -> None:
        cv2.destroyAllWindows()
        cv2.waitKey(1)


class RecordOutput:
    """A video file per camera (`out.mp4`, or `out-<camera>.mp4` when several cameras may come)."""

    def __init__(self, path: Path, fps: float, single_camera: bool):
        # checked now: the first frame may come much later, and the writer's own failure says little
        if path.suffix.lower() not in (".mp4", ".avi"):
            raise ViewerError(f"--record {path}: use a .mp4 or .avi file name")
        if not path.parent.is_dir():
            raise ViewerError(f"--record {path}: folder {path.parent} does not exist")
        self.path, self.fps, self.single = path, fps, single_camera
        self.writers: dict[str, tuple[cv2.VideoWriter, tuple[int, int]]] = {}
        self.frames = 0

    def path_for(self, camera: str) -> Path:
        return self.path if self.single else self.path.with_name(f"{self.path.stem}-{camera}{self.path.suffix}")

    def write(self, camera: str, image: np.ndarray, paired: Paired, new: bool) -> None:
        if not new:
            return
        entry = self.writers.get(camera)
        if entry is None:
            path = self.path_for(camera)
            size = (image.shape[1], image.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
            writer = cv2.VideoWriter(str(path), fourcc, self.fps, size)
            if not writer.isOpened():
                raise ViewerError(f"--record: cannot write {path} (use .mp4 or .avi in a writable folder)")
            log.info("recording %s to %s", camera, path)
            entry = self.writers[camera] = (writer, size)
        writer, size = entry
        if (image.shape[1], image.shape[0]) != size:  # the publisher restarted with another width
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        writer.write(image)
        self.frames += 1

    def close(self) -> None:
        for writer, _size in self.writers.values():
            writer.release()


class SnapshotOutput:
    """PNG files `<camera>_<frame>.png`, at most one per camera every `every_s` seconds (0: all)."""

    def __init__(self, folder: Path, every_s: float):
        self.folder, self.every_s = folder, every_s
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a regular file in the way, no permission
            raise ViewerError(f"--snapshot-dir {folder}: cannot create the folder ({exc.strerror or exc})") from None
        self.last: dict[str, float] = {}
        self.force = False

    def write(self, camera: str, image: np.ndarray, paired: Paired, new: bool) -> None:
        now = time.monotonic()
        due = new and now - self.last.get(camera, -1e9) >= self.every_s
        if not (due or self.force):
            return
        self.last[camera] = now
        path = self.folder / f"{camera}_{paired.frame:06d}.png"
        if not cv2.imwrite(str(path), image):
            raise ViewerError(f"--snapshot-dir: cannot write {path}")
        if self.force:
            log.info("snapshot %s", path)

    def close(self) -> None:
        pass


# -- the viewer -----------------------------------------------------------------------------------
class Viewer:
    def __init__(self, endpoints: list[str], cameras: list[str] | None, prefix: str = "det",
                 preview_prefix: str = "preview", outputs: list | None = None, canvas_width: int = 640,
                 keys: tuple[str | None, str | None] = (None, None)):
        self.cameras = cameras
        self.prefix, self.preview_prefix = prefix.encode() + b"/", preview_prefix.encode() + b"/"
        self.outputs = outputs or []
        self.canvas_width = canvas_width
        self.streams: dict[str, CameraStream] = {}
        self.last_shown: dict[str, tuple[Paired, float]] = {}  # camera -> (paired, monotonic time drawn)
        self.bad_messages = 0
        self.shown = 0
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 200)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 200)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # heartbeats notice a publisher host that vanished without closing the connection
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        try:
            secure_client(self.socket, *keys)  # a publisher with CURVE keys (publish.keys) admits key holders only
        except UsageError:
            self.socket.close(0)
            raise
        for camera in cameras or [None]:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic(prefix, camera))
            self.socket.setsockopt(zmq.SUBSCRIBE, topic(preview_prefix, camera))
        for endpoint in endpoints:
            try:
                self.socket.connect(endpoint)
            except zmq.ZMQError as exc:
                self.socket.close(0)
                raise ViewerError(f"--connect {endpoint}: {exc.strerror}") from None

    def stream(self, camera: str) -> CameraStream:
        stream = self.streams.get(camera)
        if stream is None:
            stream = self.streams[camera] = CameraStream(camera)
            log.info("camera %s: first message", camera)
        return stream

    def handle(self, parts: list[bytes]) -> list[Paired]:
        """Route one multipart message to its camera; returns the frames it completed."""
        try:
            header = json.loads(parts[1])
            camera = header["camera"]
            if parts[0].startswith(self.preview_prefix) and len(parts) >= 3:
                return self.stream(camera).on_preview(header, parts[2])
            if parts[0].startswith(self.prefix):
                stream = self.stream(camera)
                restarts, state = stream.restarts, stream.state
                paired = stream.on_detections(header)
                if stream.restarts != restarts:
                    log.info("camera %s: publisher restarted", camera)
                if stream.state != state and stream.state == "ended":
                    log.info("camera %s: stream ended", camera)
                return paired
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self.bad_messages += 1
            if self.bad_messages <= 5:
                log.warning("skipping a malformed message on %r: %s", parts[0][:64], exc)
        return []

    def render(self, paired: Paired) -> np.ndarray:
        stream = self.streams[paired.camera]
        detections = paired.detections
        image = None
        if paired.jpeg is not None:
            image = cv2.imdecode(np.frombuffer(paired.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is not None:
            scale = image.shape[1] / max(1, paired.preview.get("source_width") or image.shape[1])
        else:
            source = detections or {}
            image, scale = blank_canvas(source.get("width", 640), source.get("height", 360), self.canvas_width)
        lines = stream.status_lines(paired.frame)
        if detections is None:
            lines.append("detections lost")
        elif paired.jpeg is None:
            lines.append("no preview frames (publish.preview)")
        if detections is not None:  # zones and lines first: boxes and the panel go over them
            draw_analytics(image, detections.get("analytics"), scale)
            lines += count_lines(detections.get("analytics"))
        draw_status(image, lines)
        if detections is not None:  # boxes over the panel: the panel must never hide a detection
            draw_trails(image, stream.trails_at(paired.frame), scale)
            draw_detections(image, detections.get("detections", []), scale)
        return image

    def show(self, paired: Paired, new: bool) -> None:
        image = self.render(paired)
        if new:
            self.shown += 1
            log.debug("show %s frame=%d detections=%d", paired.camera, paired.frame,
                      len(paired.detections["detections"]) if paired.detections else -1)
        for output in self.outputs:
            output.write(paired.camera, image, paired, new)
        self.last_shown[paired.camera] = (paired, time.monotonic())

    def receive(self, timeout_ms: int) -> dict[str, Paired]:
        """Drain what arrived (waiting up to `timeout_ms` for the first); newest pair per camera."""
        newest: dict[str, Paired] = {}
        if not self.socket.poll(timeout_ms):
            return newest
        for _ in range(2000):  # bounded, so windows stay responsive under a flood
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            for paired in self.handle(parts):
                newest[paired.camera] = paired
        return newest

    def step(self, timeout_ms: int = 20) -> None:
        now = time.monotonic()
        newest = self.receive(timeout_ms)
        for paired in newest.values():
            self.show(paired, new=True)
        for camera, stream in self.streams.items():
            if camera in newest:
                continue
            latest = stream.latest_detections
            last = self.last_shown.get(camera)
            if (latest is not None and stream.state == "live" and now - stream.last_preview_time > NO_PREVIEW_AFTER_S
                    and (last is None or now - last[1] >= 0.1) and (last is None or last[0].frame != latest["frame"])):
                self.show(Paired(camera, latest["frame"], None, None, latest), new=True)
            elif last is not None and now - last[1] >= STATUS_REFRESH_S:
                self.show(last[0], new=False)

    def all_ended(self) -> bool:
        expected = set(self.cameras or self.streams)
        return bool(expected) and all(c in self.streams and self.streams[c].state == "ended" for c in expected)

    def close(self) -> None:
        for output in self.outputs:
            output.close()
        self.socket.close(0)


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_viewer(args) -> int:
    """The `view` command (arguments from run.py's parser)."""
    headless = args.headless or (not has_display() and bool(args.record or args.snapshot_dir))
    if not headless and not has_display():
        raise ViewerError("view: no display (DISPLAY is not set): pass --record FILE or --snapshot-dir DIR "
                          "to run headless, or run on a desktop")
    if headless and not (args.record or args.snapshot_dir):
        raise ViewerError("view: --headless needs --record FILE or --snapshot-dir DIR")
    outputs: list = []
    windows = None
    if not headless:
        windows = WindowOutput()
        outputs.append(windows)
    if args.record:
        outputs.append(RecordOutput(Path(args.record), args.record_fps, single_camera=len(args.camera or []) == 1))
    snapshots = SnapshotOutput(Path(args.snapshot_dir), args.snapshot_every) if args.snapshot_dir else None
    if snapshots:
        outputs.append(snapshots)
    viewer = Viewer(args.connect or ["tcp://127.0.0.1:5555"], args.camera, args.prefix, args.preview_prefix, outputs,
                    args.width, keys=(args.server_key, args.client_key))
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: closing", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    deadline = time.monotonic() + args.duration if args.duration else None
    log.info("viewing %s from %s (%s)", ", ".join(args.camera) if args.camera else "all cameras",
             ", ".join(args.connect or ["tcp://127.0.0.1:5555"]), "headless" if headless else "windows")
    try:
        while not stop.is_set():
            viewer.step()
            if windows is not None:
                windows.poll()
                if windows.quit:
                    break
                if windows.snapshot_requested:
                    windows.snapshot_requested = False
                    target = snapshots or SnapshotOutput(Path.cwd(), 0)
                    target.force = True
                    for paired, _t in viewer.last_shown.values():
                        target.write(paired.camera, viewer.render(paired), paired, False)
                    target.force = False
            if args.exit_on_end and viewer.all_ended():
                break
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        viewer.close()
    for camera, stream in sorted(viewer.streams.items()):
        log.info("camera %s: %s, drops %d, restarts %d", camera, stream.state, stream.drops, stream.restarts)
    log.info("shown %d frame(s)", viewer.shown)
    return 0
