"""One camera as a viewer sees it: pairs preview frames with their detections and keeps statistics.

The publisher sends a frame's detections (`det/<camera>/`) and, for some frames, a JPEG preview
(`preview/<camera>/`). They travel as separate messages, so either may come first or be lost:
each side waits in a small buffer keyed by frame index until its partner arrives. A preview whose
detections are clearly lost (detections of later frames came in) is shown without them, marked.
A sequence number going backwards means the publisher restarted: buffers and counters start over.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

DETECTIONS_KEPT = 64  # detections wait this many frames for their preview (previews are rate-limited)
PREVIEWS_KEPT = 8
TRAIL_POINTS = 30  # a track's trail: its last this many positions
TRAIL_FORGET_FRAMES = 50  # a track not seen for this many frames loses its trail
LOST_AFTER_FRAMES = 16  # a preview is shown without detections once detections are this far ahead


@dataclass
class Paired:
    camera: str
    frame: int
    preview: dict | None  # the preview header (None: no preview frames, draw on a blank canvas)
    jpeg: bytes | None
    detections: dict | None  # the detections message (None: it was lost)


@dataclass
class _Sequence:
    """Counts gaps in one topic's `seq` (messages lost in transport or dropped by the publisher)."""

    last: int | None = None
    lost: int = 0

    def see(self, seq: int) -> bool:
        """Record `seq`; returns False when it went backwards (the publisher restarted)."""
        if self.last is not None and seq <= self.last:
            self.last = seq
            return False
        if self.last is not None:
            self.lost += seq - self.last - 1
        self.last = seq
        return True


@dataclass
class CameraStream:
    camera: str
    state: str = "waiting"  # waiting -> live -> ended (-> live again when the publisher restarts)
    restarts: int = 0
    detection_seq: _Sequence = field(default_factory=_Sequence)
    preview_seq: _Sequence = field(default_factory=_Sequence)
    lost_before_restart: int = 0
    last_message: float = 0.0
    last_preview_time: float = 0.0
    latest_detections: dict | None = None
    _detections: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _previews: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _arrivals: collections.deque = field(default_factory=lambda: collections.deque(maxlen=240))
    _latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    # track id -> (last frame seen, recent bottom-centre points in source pixels), from `track_id`s
    trails: dict = field(default_factory=dict)

    # -- statistics --------------------------------------------------------------------------
    @property
    def drops(self) -> int:
        return self.lost_before_restart + self.detection_seq.lost + self.preview_seq.lost

    def fps(self, now: float | None = None, window_s: float = 2.0) -> float:
        """Detections per second over the last `window_s` (the camera's pipeline rate)."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._arrivals if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def latency_ms(self) -> float | None:
        """Median capture-to-viewer latency of recent detections (same clock on one host)."""
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[len(ordered) // 2]

    def status_lines(self, shown_frame: int | None) -> list[str]:
        latency = self.latency_ms()
        lines = [f"{self.camera}  frame {shown_frame if shown_frame is not None else '-'}  [{self.state}]",
                 f"{self.fps():.1f} fps  latency {f'{latency:.0f} ms' if latency is not None else '-'}",
                 f"drops {self.drops}" + (f"  restarts {self.restarts}" if self.restarts else "")]
        return lines


    # -- messages ----------------------------------------------------------------------------
    def _restart(self) -> None:
        self.restarts += 1
        self.lost_before_restart += self.detection_seq.lost + self.preview_seq.lost
        self.detection_seq, self.preview_seq = _Sequence(), _Sequence()
        self._detections.clear()
        self._previews.clear()
        self._arrivals.clear()
        self.trails.clear()

    def on_detections(self, message: dict, now: float | None = None) -> list[Paired]:
        now = time.monotonic() if now is None else now
        self.last_message = now
        if message.get("type") == "end":
            self.state = "ended"
            self.detection_seq.see(message.get("seq", 0))
            return self._expire(all_=True)
        seq = message.get("seq", 0)
        if not self.detection_seq.see(seq):
            self.detection_seq.last = None
            self._restart()
            self.detection_seq.see(seq)
        self.state = "live"
        self._arrivals.append(now)
        capture = message.get("capture_time")
        if capture is not None:
            self._latencies.append((time.time() - capture) * 1000.0)
        self.latest_detections = message
        frame = message["frame"]
        self._update_trails(message, frame)
        out = []
        preview = self._previews.pop(frame, None)
        if preview is not None:
            out.append(Paired(self.camera, frame, preview[0], preview[1], message))
        else:
            self._detections[frame] = message
            while len(self._detections) > DETECTIONS_KEPT:
                self._detections.popitem(last=False)
        return out + self._expire(newest=frame)

    def _update_trails(self, message: dict, frame: int) -> None:
        for detection in message.get("detections", ()):
            track = detection.get("track_id")
            if track is None:
                continue
            x1, _y1, x2, y2 = detection["box"]
            entry = self.trails.get(track)
            if entry is None:
                entry = self.trails[track] = [frame, collections.deque(maxlen=TRAIL_POINTS)]
            entry[0] = frame
            entry[1].append(((x1 + x2) / 2, y2))
        for track in [t for t, (seen, _points) in self.trails.items() if frame - seen > TRAIL_FORGET_FRAMES]:
            del self.trails[track]

    def trails_at(self, frame: int) -> dict[int, list[tuple[float, float]]]:
        """Trails of the tracks seen in the last few frames before `frame` (what a drawn frame shows)."""
        return {t: list(points) for t, (seen, points) in self.trails.items() if abs(frame - seen) <= 3}

    def on_preview(self, header: dict, jpeg: bytes, now: float | None = None) -> list[Paired]:
        now = time.monotonic() if now is None else now
        self.last_message = self.last_preview_time = now
        if not self.preview_seq.see(header.get("seq", 0)):
            self.preview_seq.last = None
            self.preview_seq.see(header.get("seq", 0))
            self._previews.clear()
        frame = header["frame"]
        detections = self._detections.pop(frame, None)
        if detections is not None:
            return [Paired(self.camera, frame, header, jpeg, detections)]
        self._previews[frame] = (header, jpeg)
        while len(self._previews) > PREVIEWS_KEPT:
            old, (h, j) = self._previews.popitem(last=False)
            return [Paired(self.camera, old, h, j, None)]
        return []

    def _expire(self, newest: int | None = None, all_: bool = False) -> list[Paired]:
        """Previews whose detections will not come any more, oldest first."""
        out = []
        for frame in list(self._previews):
            if all_ or (newest is not None and newest - frame >= LOST_AFTER_FRAMES):
                header, jpeg = self._previews.pop(frame)
                out.append(Paired(self.camera, frame, header, jpeg, None))
        return out


def count_lines(analytics: dict | None) -> list[str]:
    """Status-panel lines for a detections message's `analytics`: crossings per line, occupancy per zone."""
    if not analytics:
        return []

    def fmt(counts: dict) -> str:
        return ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "0"

    out = [f"line {name}: in {fmt(line.get('in', {}))} | out {fmt(line.get('out', {}))}"
           for name, line in analytics.get("lines", {}).items()]
    out += [f"zone {name}: now {fmt(zone.get('occupancy', {}))} | entered {fmt(zone.get('entered', {}))}"
            for name, zone in analytics.get("zones", {}).items()]
    return out
