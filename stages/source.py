"""Source stage: opens one camera or file with PyAV, decodes frames and emits `Frame` records.

One thread per camera. Files are read to the end (or looped, optionally paced to real time) and
drop nothing: their queue blocks. Live sources (RTSP, HTTP, devices) keep only the newest frames
(their queue drops the oldest), treat end of stream as a disconnect and reconnect with
exponential backoff and jitter. A packet that fails to decode is skipped and counted.
The camera's state is a value (`SourceState`) that statistics and logs report.
"""

from __future__ import annotations

import enum
import logging
import random
import re
import threading
import time

import av

from pipeline.config import CameraConfig
from pipeline.errors import SourceError
from pipeline.queues import BoundedQueue
from pipeline.record import Frame
from pipeline.stage import Stage

log = logging.getLogger("pipeline")

_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """Hide `user:password@` in any URL inside `text`."""
    return _CREDENTIALS.sub("***@", text)


class SourceState(enum.Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"


def _open_options(camera: CameraConfig) -> dict:
    if camera.url.startswith("rtsp://") or camera.url.startswith("rtsps://"):
        return {
            "rtsp_transport": camera.rtsp_transport,
            # FFmpeg's socket I/O timeout, in microseconds (a frozen server otherwise hangs reads)
            "timeout": str(int(camera.read_timeout_s * 1_000_000)),
            "analyzeduration": "200000",
        }
    if "://" in camera.url:
        return {"timeout": str(int(camera.read_timeout_s * 1_000_000))}
    return {}


class SourceStage(Stage):
    poll_s = None

    def __init__(self, camera: CameraConfig, outbox: BoundedQueue, stop: threading.Event):
        self.name = f"source.{camera.id}"
        super().__init__(None, outbox)
        self.camera = camera
        self.stop_event = stop
        self.state = SourceState.CONNECTING
        self.reconnects = 0
        self.next_index = 0
        self.last_error: str | None = None
        self.safe_url = redact(camera.url)

    # A source has no inbox: its loop is the decoder.
    def loop(self) -> None:
        attempt = 0
        while not self.stop_event.is_set():
            self.state = SourceState.CONNECTING if self.reconnects == 0 and attempt == 0 else SourceState.RECONNECTING
            try:
                container = self._open()
            except SourceError as exc:
                if not self.camera.is_live:
                    self.state = SourceState.FAILED
                    raise
                self._note_error(str(exc))
                attempt += 1
                self._backoff(attempt)
                continue
            attempt = 0
            try:
                self.state = SourceState.RUNNING
                self._decode(container)
            finally:
                container.close()
            if self.stop_event.is_set():
                break
            if not self.camera.is_live:
                if self.camera.loop:
                    continue
                break
            # a live stream that ended is a disconnect
            self.reconnects += 1
            self._note_error("stream ended; reconnecting")
            self._backoff(1)
        self.state = SourceState.ENDED

    def _note_error(self, message: str) -> None:
        # one line per distinct error, not one per attempt
        if message != self.last_error:
            log.warning("camera %s: %s", self.camera.id, message)
            self.last_error = message

    def _backoff(self, attempt: int) -> None:
        delay = min(self.camera.reconnect_cap_s, self.camera.reconnect_base_s * (2 ** (attempt - 1)))
        delay *= random.uniform(0.5, 1.0)  # jitter: cameras that failed together do not retry together
        self.stop_event.wait(delay)

    def _open(self):
        options = _open_options(self.camera)
        try:
            if options:
                container = av.open(self.camera.url, options=options, timeout=(self.camera.open_timeout_s, self.camera.read_timeout_s))
            else:
                container = av.open(self.camera.url)
        except FileNotFoundError:
            raise SourceError(f"camera {self.camera.id}: {self.safe_url}: file not found") from None
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"camera {self.camera.id}: cannot open {self.safe_url}: {redact(str(exc))}") from None
        if not container.streams.video:
            container.close()
            raise SourceError(f"camera {self.camera.id}: {self.safe_url}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if self.camera.decode_threads:
            stream.codec_context.thread_count = self.camera.decode_threads
        return container

    def _decode(self, container) -> None:
        stream = container.streams.video[0]
        pace_start: tuple[float, float] | None = None  # (wall clock, pts) at the first paced frame
        packets = container.demux(stream)
        while not self.stop_event.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:
                # a damaged container or a dropped connection: what was decoded stays published
                self._note_error(f"stream ended with an error: {redact(str(exc))}")
                return
            started = time.perf_counter()
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                self.metrics.drop("decode_error")
                count = self.metrics.drops["decode_error"]
                if count == 1 or count % 100 == 0:
                    log.warning("camera %s: undecodable packet skipped (%s); %d so far", self.camera.id,
                                redact(str(exc)), count)
                continue
            for av_frame in frames:
                if self.stop_event.is_set():
                    return
                pts = float(av_frame.time) if av_frame.time is not None else None
                if self.camera.realtime and not self.camera.is_live and pts is not None:
                    if pace_start is None:
                        pace_start = (time.monotonic(), pts)
                    wait = pace_start[0] + (pts - pace_start[1]) - time.monotonic()
                    if wait > 0:
                        self.stop_event.wait(wait)
                image = av_frame.to_ndarray(format="bgr24")
                frame = Frame(
                    camera=self.camera.id,
                    index=self.next_index,
                    pts=pts,
                    capture_time=time.time(),
                    image=image,
                    source_size=(image.shape[1], image.shape[0]),
                )
                self.next_index += 1
                self.metrics.record_latency(time.perf_counter() - started)
                frame.mark("source")
                self.emit(frame)
                started = time.perf_counter()  # the next frame's cost starts after this one left

    def snapshot(self) -> dict:
        return {"state": self.state.value, "reconnects": self.reconnects, "frames": self.next_index, **self.metrics.snapshot()}
