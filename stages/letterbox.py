"""Letterbox stage: resizes each frame of a batch straight into its row of a host slot.

The long side is scaled to the model input, the rest padded with a constant, aligned to the
centre (YOLOv5/v8) or the top-left corner (YOLOX). The slot stays uint8 BGR: colour order,
scaling and layout are applied inside the model graph (see pipeline/model.py). The geometry is
kept on each frame so that postprocess can map boxes back to source pixels.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from pipeline.buffers import HostSlotPool
from pipeline.model import Preset
from pipeline.queues import BoundedQueue
from pipeline.record import FrameBatch, Letterbox
from pipeline.stage import Stage


def letterbox_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int, align: str) -> Letterbox:
    ratio = min(dst_w / src_w, dst_h / src_h)
    resized_w = max(1, min(dst_w, int(round(src_w * ratio))))
    resized_h = max(1, min(dst_h, int(round(src_h * ratio))))
    if align == "center":
        pad_x, pad_y = (dst_w - resized_w) // 2, (dst_h - resized_h) // 2
    elif align == "top-left":
        pad_x = pad_y = 0
    else:
        raise ValueError(f"unknown alignment {align!r}")
    return Letterbox(ratio, pad_x, pad_y, resized_w, resized_h)


def letterbox_into(image: np.ndarray, dst: np.ndarray, align: str, pad_value: int = 114) -> Letterbox:
    """Write `image` (BGR uint8 [h, w, 3]) letterboxed into `dst` ([H, W, 3]); return the geometry."""
    dst_h, dst_w = dst.shape[:2]
    geo = letterbox_geometry(image.shape[1], image.shape[0], dst_w, dst_h, align)
    x0, y0, x1, y1 = geo.pad_x, geo.pad_y, geo.pad_x + geo.resized_w, geo.pad_y + geo.resized_h
    # padding: only the border bands are written, the image area is written once by resize
    dst[:y0] = pad_value
    dst[y1:] = pad_value
    dst[y0:y1, :x0] = pad_value
    dst[y0:y1, x1:] = pad_value
    target = dst[y0:y1, x0:x1]
    if (geo.resized_w, geo.resized_h) == (image.shape[1], image.shape[0]):
        target[...] = image
    else:
        # bilinear, as the models were trained with (the classic YOLO letterbox recipe)
        out = cv2.resize(image, (geo.resized_w, geo.resized_h), dst=target, interpolation=cv2.INTER_LINEAR)
        if out is not target and not np.shares_memory(out, dst):  # never expected; keeps output right
            target[...] = out
    return geo


class LetterboxStage(Stage):
    name = "letterbox"

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, pool: HostSlotPool, preset: Preset, keep_images: bool = False,
                 threads: int = 1):
        super().__init__(inbox, outbox)
        self.pool = pool
        self.preset = preset
        self.keep_images = keep_images  # the publisher needs them for preview frames
        # cv2.resize releases the GIL: large frames (1080p: ~1 ms each) letterbox in parallel
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="letterbox") if threads > 1 else None

    def process(self, batch: FrameBatch) -> None:
        slot = None
        waiting_since = time.perf_counter()
        while slot is None:
            slot = self.pool.acquire(timeout=0.5)
            if slot is None and self.outbox.closed:
                raise RuntimeError("host slot pool closed")
        self._waited += time.perf_counter() - waiting_since
        batch.slot = slot
        rows = range(len(batch.frames))
        if self._workers is not None and len(batch.frames) > 1:
            geometries = list(self._workers.map(lambda row: self._letterbox_row(batch, row), rows))
        else:
            geometries = [self._letterbox_row(batch, row) for row in rows]
        for frame, geometry in zip(batch.frames, geometries):
            frame.letterbox = geometry
            if not self.keep_images:
                frame.image = None
            frame.mark("letterbox")
        self.emit(batch)

    def _letterbox_row(self, batch: FrameBatch, row: int) -> Letterbox:
        return letterbox_into(batch.frames[row].image, batch.slot.array[row], self.preset.align, self.preset.pad_value)

    def on_stop(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=True)

    def discard(self, batch: FrameBatch) -> None:
        batch.release_credit()
        if batch.slot is not None:
            self.pool.release(batch.slot)
            batch.slot = None
