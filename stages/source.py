"""Source stage: opens one camera or file with PyAV, decodes frames and emits `Frame` records.

One thread per camera. Files are read to the end (or looped, optionally paced to real time) and
drop nothing: their queue blocks. Live sources (RTSP, HTTP, devices) keep only the newest frames
(their queue drops the oldest), treat end of stream as a disconnect and reconnect with
exponential backoff and jitter. A packet that fails to decode is skipped and counted.
The camera's state is a value (`SourceState`) that statistics and logs report.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import random
import re
import threading
import time

import av
from av.video.reformatter import VideoReformatter
import cv2
import numpy as np

from pipeline.config import CameraConfig
from pipeline.errors import ConfigError, SourceError
from pipeline.queues import Aborted, BoundedQueue
from pipeline.record import Frame
from pipeline.stage import Stage

log = logging.getLogger("pipeline")

_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """Hide `user:password@` in any URL inside `text`."""
    return _CREDENTIALS.sub("***@", text)


def to_bgr(av_frame, converter: str = "swscale", reformatter: VideoReformatter | None = None) -> np.ndarray:
    """Decoded frame -> BGR uint8 [h, w, 3].

    "swscale" is PyAV's own conversion: what a plain PyAV program gets, but it holds the GIL, so
    with many cameras the decoders take turns (measured: 2 threads gain 25% over one). "opencv"
    converts yuv420p with OpenCV, which releases the GIL and is faster (2 threads: 3x); pixels
    differ from swscale's by about one level on average (its chroma upsampling differs).
    """
    if (converter == "opencv" and av_frame.format.name == "yuv420p"
            and av_frame.width % 2 == 0 and av_frame.height % 2 == 0):
        return cv2.cvtColor(av_frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2BGR_I420)
    if reformatter is not None:  # a kept reformatter reuses its swscale context: same pixels, half the time
        return reformatter.reformat(av_frame, format="bgr24").to_ndarray()
    return av_frame.to_ndarray(format="bgr24")


class SourceState(enum.Enum):
    CONNECTING = "connecting"  # first attempt to open
    OPENED = "opened"  # preroll: decoder open, first frame decoded and held until the run starts
    RUNNING = "running"  # frames are flowing
    RECONNECTING = "reconnecting"  # lost (or never had) the stream: waiting out a backoff, then opening again
    ENDED = "ended"  # stopped, or a file read to its end
    FAILED = "failed"  # a file that cannot be read: the run cannot go on


def _classify(exc: BaseException) -> str:
    """A short, stable name for an open/read failure: one log line per class, not per attempt."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    names = {
        "ConnectionRefusedError": "connection refused",
        "HTTPNotFoundError": "not found (404)",
        "HTTPUnauthorizedError": "unauthorized (401)",
        "HTTPForbiddenError": "forbidden (403)",
        "TimeoutError": "timed out",
        "ExitError": "timed out",  # PyAV's own open/read timeout interrupts FFmpeg this way
        "InvalidDataError": "no valid stream (server frozen or not a video)",
    }
    return names.get(type(exc).__name__, type(exc).__name__)


# a file that yields fewer frames than its container declares by more than this fraction is
# reported (truncated, or a hole in its data): FFmpeg itself often ends such files without an error
MISSING_FRAMES_WARN_FRACTION = 0.02
# a network camera released by the preroll starts at its next keyframe, waiting at most this long for one
KEYFRAME_WAIT_S = 5.0


def probe_files(cameras: list[CameraConfig]) -> dict[str, tuple[int, int]]:
    """Open every file camera and decode its first frame before anything starts; return each file
    camera's first frame size (width, height), which engines prepare their input shapes for.

    A file that cannot be played is the user's to fix (exit 2, one line, `--check` too), and
    finding it mid-run would cut the other cameras off. Live cameras are not probed: they may
    come up later, and reconnecting is their normal life.
    """
    sizes = {}
    for i, camera in enumerate(cameras):
        if not camera.is_file:
            continue
        where = f"cameras[{i}].url: camera {camera.id}: {camera.url}"
        if not os.path.isfile(camera.url):
            raise ConfigError(f"{where}: file not found")
        if os.path.getsize(camera.url) == 0:
            raise ConfigError(f"{where}: the file is empty (0 bytes)")
        try:
            with av.open(camera.url) as container:
                if not container.streams.video:
                    kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                    raise ConfigError(f"{where}: no video stream (the file has {', '.join(kinds)})")
                first = next(container.decode(video=0), None)
                if first is None:
                    raise ConfigError(f"{where}: no frame could be decoded")
                sizes[camera.id] = (first.width, first.height)
        except (av.error.FFmpegError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"{where}: cannot be read as a video ({reason})") from None
    return sizes


def _open_arguments(camera: CameraConfig) -> dict:
    """Keyword arguments for `av.open`: transport, timeouts (so nothing can hang) and format."""
    url = camera.url
    if url.startswith("/dev/video"):
        return {"format": "v4l2", "timeout": (camera.open_timeout_s, _read_timeout(camera))}
    if camera.is_file:
        return {}
    # FFmpeg's socket I/O timeout, in MICROseconds ("stimeout" is silently ignored by FFmpeg 8).
    # A frozen RTSP server raises TimeoutError after about TWICE this value (measured), so it is
    # set to half the read timeout; PyAV's `timeout=(open, read)` is a second bound on every call.
    options = {"timeout": str(int(_read_timeout(camera) * 1_000_000 / 2))}
    if url.startswith(("rtsp://", "rtsps://")):
        options["rtsp_transport"] = camera.rtsp_transport
        options["analyzeduration"] = "200000"  # first frame in ~0.3 s instead of ~1.2 s
    return {"options": options, "timeout": (camera.open_timeout_s, _read_timeout(camera))}


def _read_timeout(camera: CameraConfig) -> float:
    # a read may never block longer than the stall watchdog allows
    return min(camera.read_timeout_s, camera.stall_timeout_s)


class _Lag:
    """How far a live camera is behind its own timestamps, and whether to skip to the next keyframe.

    A paced file knows when each packet was due. For a network camera, each packet's offset (arrival
    minus timestamp) is compared with the smallest offset seen, the packet that waited least in any
    queue: the difference is how long this one waited. The baseline creeps up by DRIFT (1 ms a
    second) so that a camera whose clock runs slow never looks late. Past `max_lag_s`, packets are
    dropped undecoded until a keyframe at most half that late, or until a read waits (nothing queued:
    the backlog is gone, and if the timestamps jumped back the baseline is taken anew there);
    decoding resumes at that keyframe with nothing missing from its references. Nothing is judged
    before the decoder's first frame: its opening is start-up (`decoder_started`)."""

    DRIFT = 1e-3

    def __init__(self, max_lag_s: float | None, frame_interval_s: float):
        self.max_lag_s = max_lag_s
        self.caught_up_wait_s = frame_interval_s / 2
        self.baseline: float | None = None  # smallest arrival - timestamp seen (s), crept up by DRIFT
        self.baseline_at = 0.0
        self.skipping = False
        self.decoding = False  # the decoder has given its first frame: before that, nothing is judged late
        self.skipped = 0  # frames skipped in the current or last catch-up
        self.behind_s = 0.0  # how late the catch-up found the camera
        self.drained = False  # a read waited during this catch-up: the backlog is gone

    def late_by(self, stamp_s: float, read_s: float) -> float:
        now = time.monotonic()
        offset = now - stamp_s
        if self.baseline is None:
            self.baseline = offset
        else:
            self.baseline += (now - self.baseline_at) * self.DRIFT
            if self.skipping and read_s >= self.caught_up_wait_s:
                self.drained, self.baseline = True, offset
            self.baseline = min(self.baseline, offset)
        self.baseline_at = now
        return offset - self.baseline

    def decoder_started(self) -> None:
        """The first frame is out: what queued while the decoder opened (NVDEC: seconds, with a hundred
        cameras opening at once) is start-up, not lag. It is decoded, not skipped; the baseline is taken
        anew from the packets that follow."""
        self.decoding, self.baseline = True, None

    def skip(self, late_s: float, keyframe: bool) -> bool:
        if self.max_lag_s is None or not self.decoding:
            return False
        if self.skipping:
            if keyframe and (late_s <= self.max_lag_s / 2 or self.drained):
                self.skipping = False
                return False
            self.skipped += 1
            return True
        if late_s > self.max_lag_s:
            self.skipping, self.skipped, self.behind_s, self.drained = True, 1, late_s, False
            return True
        return False


def _test_decoder_start_delay(camera_id: str) -> float:
    """Tests only: VAPIPE_TEST_DECODER_START_DELAY=<seconds> makes each connection's decoder that slow
    to open, for every camera; `<id>=<seconds>[,<id>=<seconds>...]` for the cameras named."""
    value = os.environ.get("VAPIPE_TEST_DECODER_START_DELAY") or ""
    if "=" not in value:
        return float(value or 0)
    delays = dict(item.split("=", 1) for item in value.split(",") if item)
    return float(delays.get(camera_id, 0))


class SourceStage(Stage):
    poll_s = None

    def __init__(self, camera: CameraConfig, outbox: BoundedQueue, stop: threading.Event, keep_video: bool = False,
                 device: int = 0, gate: threading.Event | None = None):
        """`gate`: the run's start (Pipeline.preroll): while it is clear, a camera that has decoded its
        first frame holds it (`opened` is set) instead of sending it on; None or set: no hold."""
        self.name = f"source.{camera.id}"
        super().__init__(None, outbox)
        self.camera = camera
        # keep_video: hand on the decoded frame itself (YUV, or NV12 on the GPU) for the GPU letterbox
        # (always so with NVDEC: the config refuses nvdec with a CPU letterbox)
        self.keep_video = keep_video
        self.device = device
        self._reformatter = VideoReformatter()  # keeps its swscale context across frames
        self.stop_event = stop
        self.gate = gate
        self.opened = threading.Event()  # the first frame is decoded (held while the gate is clear)
        self.open_failed = False  # an attempt ended before the first frame: down (the preroll does not wait), not slow
        self.state = SourceState.CONNECTING
        self.reconnects = 0  # times a stream that had delivered frames was lost and reopened
        self.attempts = 0  # every open, the first included
        self.failed_attempts = 0
        self.next_index = 0
        self.last_error: str | None = None
        self.retry_in_s = 0.0
        self.safe_url = redact(camera.url)
        self._logged_class: str | None = None
        # why the camera ended: "eof" (a file read to its end), "stopped" (the run was stopped) or
        # "failed" (it could not be read); the end message tells subscribers
        self.end_reason: str | None = None
        self.frames_declared: int | None = None  # by the file's container (per pass), when it says
        self.frames_missing = 0  # declared frames that never came out of the decoder (all passes)
        self._missing_warned = False
        self._next_pass_due: float | None = None  # a paced loop: when the next pass's first packet is due
        self._skip_logged_at = -1e9  # monotonic time of the last "skipped to the next keyframe" line
        self._test_decoder_start_delay_s = _test_decoder_start_delay(camera.id)
        self.last_queued: int | None = None  # index of the last frame its queue accepted (a removal waits for it)
        self._queued_at: collections.deque = collections.deque(maxlen=256)  # monotonic times, for `fps`

    def fps(self, window_s: float = 5.0) -> float:
        """Frames a second this camera delivered over the last `window_s` (0 when none came)."""
        times = list(self._queued_at)
        now = time.monotonic()
        recent = [t for t in times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    # A source has no inbox: its loop is the decoder.
    def loop(self) -> None:
        failures = 0  # consecutive attempts that brought no frame: drives the backoff
        while not self.stop_event.is_set():
            if self.attempts:
                self.state = SourceState.RECONNECTING
            self.attempts += 1
            try:
                container = self._open()
            except SourceError as exc:
                if not self.camera.is_live:
                    self.state = SourceState.FAILED
                    self.end_reason = "failed"
                    raise
                self.failed_attempts += 1
                self.open_failed = not self.opened.is_set()
                failures += 1
                self._note_error(getattr(exc, "error_class", "error"), str(exc), failures)
                self._backoff(failures)
                continue
            frames_before = self.next_index
            try:
                self.state = SourceState.RUNNING
                ended = self._decode(container)
            finally:
                container.close()
            if self.stop_event.is_set() or self.outbox.closed:
                break
            self.open_failed = not self.opened.is_set()
            if self.camera.loop and self.camera.is_file and self.next_index > frames_before:
                continue  # a looped file (live or not) starts over at once
            if not self.camera.is_live:
                self.end_reason = "eof"
                break
            # a live stream that ended, stalled or failed is a disconnect
            if self.next_index > frames_before:
                self.reconnects += 1
                failures = 0
            failures += 1
            self._note_error(ended, f"camera {self.camera.id}: {self.safe_url}: {ended}; reconnecting", failures)
            self._backoff(failures)
        self.state = SourceState.ENDED
        if self.end_reason is None:
            self.end_reason = "stopped"

    def _note_error(self, error_class: str, message: str, failures: int) -> None:
        """One line per class of failure until frames flow again: a dead camera never floods the log."""
        self.last_error = message
        if error_class != self._logged_class:
            self._logged_class = error_class
            log.warning("%s (retrying with backoff up to %.1f s; repeats are not logged)", message,
                        self.camera.reconnect_cap_s)

    def _on_frames_flowing(self) -> None:
        if self._logged_class is not None:
            log.info("camera %s: receiving frames again (attempt %d, %d reconnect(s) so far)", self.camera.id,
                     self.attempts, self.reconnects)
            self._logged_class = None

    def _backoff(self, failures: int) -> None:
        delay = min(self.camera.reconnect_cap_s, self.camera.reconnect_base_s * (2 ** (failures - 1)))
        delay *= random.uniform(0.5, 1.0)  # jitter: cameras that failed together do not retry together
        self.retry_in_s = round(delay, 3)
        self.stop_event.wait(delay)

    def _open(self):
        arguments = _open_arguments(self.camera)
        if self.camera.decoder == "nvdec":
            # frames stay in device memory (the primary CUDA context, shared with the engine)
            from pipeline.cuda import set_device

            set_device(self.device)
            arguments["hwaccel"] = av.codec.hwaccel.HWAccel("cuda", device=str(self.device), is_hw_owned=True,
                                                            allow_software_fallback=True)
        try:
            container = av.open(self.camera.url, **arguments)
        except (av.error.FFmpegError, OSError) as exc:
            error_class = _classify(exc)
            detail = error_class if self.camera.is_live or error_class == "file not found" else redact(str(exc))
            error = SourceError(f"camera {self.camera.id}: cannot open {self.safe_url}: {detail}")
            error.error_class = error_class
            raise error from None
        if not container.streams.video:
            container.close()
            error = SourceError(f"camera {self.camera.id}: {self.safe_url}: no video stream")
            error.error_class = "no video stream"
            raise error
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if self.camera.decoder == "nvdec":
            stream.codec_context.thread_count = 1  # NVDEC does the work; frame threads would only add delay
        elif self.camera.decode_threads:
            stream.codec_context.thread_count = self.camera.decode_threads
        return container

    def _decode(self, container) -> str:
        """Emit frames until the stream ends, stalls, fails or the run stops; say which."""
        stream = container.streams.video[0]
        self._pace_start = None  # (monotonic clock, pts) at the first paced packet
        self._next_pass_due = None
        last_paced: tuple[float, float] | None = None  # (seconds, duration) of the last paced packet
        paced = self.camera.realtime and self.camera.is_file
        packets = container.demux(stream)
        last_frame = time.monotonic()
        stall_s = self.camera.stall_timeout_s if self.camera.is_live else None
        lag = _Lag(self.camera.max_lag_s if self.camera.is_live else None, self._frame_interval(stream))
        pass_start = self.next_index
        decoder_opened = False  # the first packet opens the decoder
        keyframe_by: float | None = None  # released by the preroll: a network camera waits for a keyframe until then
        while not self.stop_event.is_set():
            try:
                read_started = time.monotonic()
                packet = next(packets)
                read_s = time.monotonic() - read_started
            except StopIteration:
                self._end_of_pass(stream, self.next_index - pass_start)
                if self.camera.loop and self.camera.is_file and self.next_index > pass_start:
                    # loop by seeking: reopening would also rebuild the decoder (NVDEC: a new
                    # device context, hundreds of ms, for every camera at once)
                    try:
                        container.seek(0, stream=stream)
                    except av.error.FFmpegError:
                        return "stream ended"  # not seekable: the caller reopens it
                    packets = container.demux(stream)
                    if last_paced is not None:  # the next pass starts one frame after this one's last
                        self._next_pass_due = self._due(last_paced[0]) + last_paced[1]
                    self._pace_start = None
                    pass_start = self.next_index
                    continue
                return "stream ended"
            except av.error.FFmpegError as exc:
                # a damaged container or a dropped/frozen connection: what was decoded stays published
                self._end_of_pass(stream, self.next_index - pass_start)
                return f"read failed ({_classify(exc)})"
            stamp = packet.dts if packet.dts is not None else packet.pts
            if paced and stamp is not None and packet.time_base is not None:
                # a file played as a camera: each packet arrives at its own (decode) time, before it is decoded
                seconds = float(stamp * packet.time_base)
                last_paced = (seconds, self._frame_duration(packet, stream))
                due = self._due(seconds)
                wait = due - time.monotonic()
                if wait > 0:
                    self.stop_event.wait(wait)
                late_s = -wait
            elif stamp is not None and packet.time_base is not None:
                late_s = lag.late_by(float(stamp * packet.time_base), read_s)
            else:
                late_s = 0.0
            if keyframe_by is not None:
                if not packet.is_keyframe and time.monotonic() < keyframe_by:
                    last_frame = time.monotonic()  # packets flow: not a stall
                    continue  # before the run's first frame: no frame number, nothing dropped
                keyframe_by = None  # a keyframe (or a stream that never flags one: decode on)
            if lag.skip(late_s, packet.is_keyframe):
                self.next_index += 1  # a frame number for each skipped frame: subscribers see the gap
                self.metrics.drop("late")
                last_frame = time.monotonic()  # packets flow: not a stall
                continue
            if lag.skipped:
                self._log_skip(lag)
            started = time.perf_counter()
            if not decoder_opened and self._test_decoder_start_delay_s:
                time.sleep(self._test_decoder_start_delay_s)  # tests only: a decoder slow to open
            decoder_opened = True
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                self.metrics.drop("decode_error")
                count = self.metrics.drops["decode_error"]
                if count == 1 or count % 100 == 0:
                    log.warning("camera %s: undecodable packet skipped (%s); %d so far", self.camera.id,
                                redact(str(exc)), count)
                frames = []
            # the watchdog: packets that never become frames are a stall too (a blocked read is
            # bounded by the read timeout, which is never longer than the stall timeout)
            if stall_s is not None and not frames and time.monotonic() - last_frame > stall_s:
                return f"stalled (no frame for {stall_s:g} s)"
            if frames and not lag.decoding:
                if self.gate is not None and not self.gate.is_set():
                    held = self._hold(stream, packets, frames)
                    if isinstance(held, str):
                        return held
                    frames, last_frame = held, time.monotonic()  # the hold is not a stall
                    if not self.camera.is_file:
                        keyframe_by = time.monotonic() + KEYFRAME_WAIT_S
                lag.decoder_started()
                if paced and last_paced is not None:
                    # a paced file's clock starts when its decoder gives the first frame (or, held by the
                    # preroll, when the run starts), not at the first packet: the opening is not lateness
                    self._pace_start = (time.monotonic(), last_paced[0])
            for av_frame in frames:
                if self.stop_event.is_set():
                    return "stopped"
                pts = float(av_frame.time) if av_frame.time is not None else None
                # a paced file's frame was "captured" when its packet was due: decode time counts as latency
                now = time.time()  # capture time is wall clock (messages carry it); pacing is monotonic
                late = time.monotonic() - self._due(pts) if paced and pts is not None else 0.0
                captured = now - max(0.0, late)
                if self.keep_video:
                    image, video = None, av_frame
                else:
                    image, video = to_bgr(av_frame, self.camera.color_conversion, self._reformatter), None
                frame = Frame(
                    camera=self.camera.id,
                    index=self.next_index,
                    pts=pts,
                    capture_time=captured,
                    image=image,
                    source_size=(av_frame.width, av_frame.height),
                    video=video,
                )
                self.next_index += 1
                last_frame = time.monotonic()
                self.metrics.record_latency(time.perf_counter() - started)
                frame.mark("source")
                self.emit(frame)
                if self.outbox.closed:  # the run is stopping (the pipeline closed this camera's queue)
                    return "stopped"
                self._on_frames_flowing()
                started = time.perf_counter()  # the next frame's cost starts after this one left
        return "stopped"

    def _hold(self, stream, packets, frames: list):
        """The preroll: the decoder is open and `frames` are its first; hold them until the run starts
        (the gate is set). A file waits where it is, and its held frames go on at the start. A network
        or device camera cannot be paused: it keeps reading, so its sender never waits on us, and drops
        what it reads; at the start its held frames are stale, so they are dropped too, its decoder is
        flushed and it starts at the next keyframe (the caller skips to it). Returns the frames to send
        on, or why the stream ended while held."""
        self.state = SourceState.OPENED
        self.opened.set()
        log.debug("camera %s: opened; holding its first frame until the run starts", self.camera.id)
        if self.camera.is_file:
            while not self.gate.wait(0.1):
                if self.stop_event.is_set():
                    return "stopped"
            self.state = SourceState.RUNNING
            return frames
        read = 0
        while not self.gate.is_set():  # a read blocks at most the read timeout (then it raises)
            if self.stop_event.is_set():
                return "stopped"
            try:
                next(packets)
            except StopIteration:
                return "stream ended"
            except av.error.FFmpegError as exc:
                return f"read failed ({_classify(exc)})"
            read += 1
        stream.codec_context.flush_buffers()  # no held reference frame decodes into the first frames
        self.state = SourceState.RUNNING
        log.debug("camera %s: run started; %d packet(s) read while held dropped, starting at a keyframe",
                  self.camera.id, read)
        return []

    def _log_skip(self, lag: "_Lag") -> None:
        """One line per catch-up, at most one a minute per camera (the drops are always counted)."""
        now = time.monotonic()
        if now - self._skip_logged_at >= 60.0:
            log.warning("camera %s: %.1f s behind its timestamps; skipped %d frame(s) to the next keyframe "
                        "(counted as late drops; cameras[].max_lag_s)", self.camera.id, lag.behind_s, lag.skipped)
            self._skip_logged_at = now
        lag.skipped = 0

    @staticmethod
    def _frame_interval(stream) -> float:
        rate = stream.average_rate or stream.guessed_rate
        return 1.0 / float(rate) if rate else 0.04

    def _due(self, pts: float) -> float:
        """Monotonic time at which a paced file's timestamp `pts` is due (the first one: now, or, in a
        loop, one frame after the previous pass's last). Not the wall clock: an NTP step would freeze
        the camera (backwards) or burst it (forwards)."""
        if self._pace_start is None:
            self._pace_start = (self._next_pass_due or time.monotonic(), pts)
        return self._pace_start[0] + (pts - self._pace_start[1])

    @staticmethod
    def _frame_duration(packet, stream) -> float:
        """How long a packet's frame is shown; a single-frame file loops at this pace."""
        if packet.duration and packet.time_base is not None:
            return float(packet.duration * packet.time_base)
        rate = stream.average_rate or stream.guessed_rate
        return 1.0 / float(rate) if rate else 0.04

    def _end_of_pass(self, stream, decoded: int) -> None:
        """Compare the frames one pass over a file gave with what its container declares.

        A truncated file or one with a hole in its data often just ends early, without an error
        from FFmpeg: without this, the loss would go unnoticed.
        """
        declared = stream.frames
        if not self.camera.is_file or not declared or self.stop_event.is_set():
            return
        self.frames_declared = declared
        missing = declared - decoded
        if missing <= 0:
            return
        self.frames_missing += missing
        if missing > declared * MISSING_FRAMES_WARN_FRACTION and not self._missing_warned:
            self._missing_warned = True  # a looped file would say it again every pass
            log.warning("camera %s: %s: read %d of the %d frames the file declares, %d missing "
                        "(truncated or damaged file)", self.camera.id, self.safe_url, decoded, declared, missing)

    def emit(self, frame: Frame) -> None:
        queued = self.metrics.items_out
        try:
            super().emit(frame)
        except Aborted:
            pass  # refused by a queue closed for shutdown: counted as `stopped`; the decode loop ends
        if self.metrics.items_out != queued:
            self.last_queued = frame.index
            self._queued_at.append(time.monotonic())

    def snapshot(self) -> dict:
        """Per-camera statistics: state, reconnects, frames, drops (by reason) and retry state."""
        return {
            "state": self.state.value,
            "reconnects": self.reconnects,
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "frames": self.next_index,
            "frames_declared": self.frames_declared,
            "frames_missing": self.frames_missing,
            "end_reason": self.end_reason,
            "retry_in_s": self.retry_in_s if self.state is SourceState.RECONNECTING else None,
            "last_error": self.last_error,
            **self.metrics.snapshot(),
        }
