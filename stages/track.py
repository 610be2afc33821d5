"""Track stage: between postprocess and publish, gives detections track ids and runs zones and lines.

One `ByteTracker` (pipeline/tracking.py) and, where configured, one `Analytics`
(pipeline/analytics.py) per camera with tracking on; frames of other cameras pass through. The
tracker's clock is the frame's timestamp (`pts`, else the capture time), never a frame count, so a
frame a live queue dropped is a longer step, not a lost track. With worker processes each worker
builds the stage for its own cameras: a camera's tracks live with its pipeline and nothing crosses
processes. The graph has this stage only when some camera tracks.
"""

from __future__ import annotations

from pipeline.analytics import Analytics
from pipeline.config import Config
from pipeline.queues import BoundedQueue
from pipeline.record import Frame
from pipeline.stage import Stage
from pipeline.tracking import ByteTracker


class CameraTracks:
    """One camera's tracker and analytics."""

    def __init__(self, tracker: ByteTracker, analytics: Analytics | None):
        self.tracker, self.analytics = tracker, analytics

    def process(self, frame: Frame) -> None:
        if frame.detections is None:
            return
        timestamp = frame.pts if frame.pts is not None else frame.capture_time
        frame.detections = self.tracker.update(frame.detections, timestamp)
        if self.analytics is not None:
            frame.analytics, frame.events = self.analytics.update(frame.detections, self.tracker.ended)


def tracked_cameras(config: Config, labels: list[str]) -> dict[str, CameraTracks]:
    out = {}
    for camera in config.cameras:
        settings = config.tracking_for(camera)
        if not settings.enabled:
            continue
        analytics = Analytics(camera.zones, camera.lines, labels) if (camera.zones or camera.lines) else None
        out[camera.id] = CameraTracks(ByteTracker.from_config(settings), analytics)
    return out


class TrackStage(Stage):
    name = "track"

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, cameras: dict[str, CameraTracks]):
        super().__init__(inbox, outbox)
        self.cameras = cameras

    def process(self, frame: Frame) -> None:
        tracks = self.cameras.get(frame.camera)
        if tracks is not None:
            tracks.process(frame)
        frame.mark("track")
        self.emit(frame)
