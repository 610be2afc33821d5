"""The record that flows between stages.

A `Frame` is born in the source stage and carries everything later stages add to it: the
letterbox geometry, the detections, and the per-stage timestamps the publisher reports. The batch
stage groups frames into a `FrameBatch` that owns one host slot (the engine's input buffer) from
letterbox until inference; postprocess splits it back into frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.buffers import batch_view


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Where a source image sits inside the model input: input = source * ratio + pad."""

    ratio: float
    pad_x: int
    pad_y: int
    resized_w: int
    resized_h: int


@dataclass(slots=True)
class Detections:
    """Boxes in source pixels (x1, y1, x2, y2), one row each; track ids once the track stage ran."""

    xyxy: np.ndarray  # float32 [n, 4]
    scores: np.ndarray  # float32 [n]
    class_ids: np.ndarray  # int32 [n]
    track_ids: np.ndarray | None = None  # int64 [n], -1 = not part of a confirmed track; None = not tracked
    track_ages: np.ndarray | None = None  # float32 [n], seconds since the track's first detection

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(slots=True)
class Frame:
    camera: str
    index: int  # 0-based frame count per camera (never reused across reconnects)
    pts: float | None  # presentation time in seconds, None when the stream gives none
    capture_time: float  # wall clock (time.time()) when the frame left the decoder
    image: np.ndarray | None  # decoded BGR uint8 [h, w, 3] (None when `video` holds it); released after letterbox
    source_size: tuple[int, int]  # (width, height)
    letterbox: Letterbox | None = None
    # the decoded PyAV frame itself, when letterbox runs on the GPU: YUV on the host, or NV12 still
    # in device memory (NVDEC); released by the letterbox once its kernel has read it
    video: object | None = None
    detections: Detections | None = None
    # set by the track stage when the camera has zones or lines: counts (published with the
    # detections) and this frame's events (published on their own topic)
    analytics: dict | None = None
    events: list[dict] | None = None
    # stage name -> monotonic time the frame left that stage
    marks: dict[str, float] = field(default_factory=dict)
    born: float = field(default_factory=time.monotonic)

    def mark(self, stage: str) -> None:
        self.marks[stage] = time.monotonic()

    def stage_latency_ms(self) -> dict[str, float]:
        """Time spent from the previous mark (or birth) to each stage's mark, in milliseconds."""
        out, previous = {}, self.born
        for stage, t in self.marks.items():
            out[stage] = round((t - previous) * 1000.0, 3)
            previous = t
        return out


@dataclass(slots=True)
class FrameBatch:
    frames: list[Frame]
    slot: object | None = None  # a pipeline.buffers.HostSlot while the batch owns one
    outputs: list[np.ndarray] | None = None  # raw engine outputs, batch-major
    release: object | None = None  # callable that frees pinned output slots once postprocess is done
    credit: object | None = None  # a pipeline.queues.Credits held from batching until inference is done
    input_hw: tuple[int, int] | None = None  # the model input (height, width) every frame of the batch is letterboxed to

    def images(self):
        """The batch's letterboxed images: the first rows of its slot, seen at the batch's input shape
        (the slot's own when the batch has none). A numpy array, or a DeviceArray (GPU letterbox)."""
        return batch_view(self.slot.array, len(self.frames), self.input_hw or tuple(self.slot.array.shape[1:3]))

    def release_credit(self) -> None:
        if self.credit is not None:
            self.credit.release()
            self.credit = None

    def __len__(self) -> int:
        return len(self.frames)
