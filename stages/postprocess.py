"""Postprocess stage: raw model output -> detections in source pixels, one frame at a time.

Three output layouts are decoded (chosen by the model preset):
- `yolox`  [boxes, 5+C]: grid units; xy = (xy + grid) * stride, wh = exp(wh) * stride,
  score = objectness x class score.
- `yolov5` [boxes, 5+C]: cx, cy, w, h in input pixels, objectness, class scores.
- `yolov8` [4+C, boxes]: cx, cy, w, h in input pixels, class scores (no objectness).
Each box keeps its best class; class-aware NMS (OpenCV's batched NMS) follows; boxes are mapped
back through the letterbox and clipped to the source image.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from pipeline.queues import Aborted, BoundedQueue
from pipeline.record import Detections, FrameBatch, Letterbox
from pipeline.stage import Stage


@functools.lru_cache(maxsize=8)
def yolox_grid(input_hw: tuple[int, int], strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Grid offsets [A, 2] and strides [A, 1] for YOLOX's anchor points (row-major, x fastest)."""
    grids, expanded = [], []
    for stride in strides:
        hs, ws = input_hw[0] // stride, input_hw[1] // stride
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grid = np.stack((xv, yv), axis=2).reshape(-1, 2)
        grids.append(grid)
        expanded.append(np.full((grid.shape[0], 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(expanded).astype(np.float32)


def decode_output(raw: np.ndarray, layout: str, input_hw: tuple[int, int], strides: tuple[int, ...] = (8, 16, 32),
                  rows: np.ndarray | None = None):
    """One image's raw output -> (boxes cxcywh [A, 4] in input pixels, class scores [A, C]).

    `rows` (yolox/yolov5): decode only these anchor rows.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if layout == "yolox":
        grid, stride = yolox_grid(tuple(input_hw), tuple(strides))
        if raw.shape[0] != grid.shape[0]:
            raise ValueError(f"yolox output has {raw.shape[0]} boxes, expected {grid.shape[0]} for input {input_hw}")
        if rows is not None:
            raw, grid, stride = raw[rows], grid[rows], stride[rows]
        xy = (raw[:, :2] + grid) * stride
        wh = np.exp(np.minimum(raw[:, 2:4], 20.0)) * stride  # clamp: exp of garbage must not overflow
        return np.concatenate((xy, wh), axis=1), raw[:, 4:5] * raw[:, 5:]
    if layout == "yolov5":
        raw = raw if rows is None else raw[rows]
        return raw[:, :4], raw[:, 4:5] * raw[:, 5:]
    if layout == "yolov8":
        raw = raw.T
        return raw[:, :4], raw[:, 4:]
    raise ValueError(f"unknown output layout {layout!r}")


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Class-aware NMS; returns kept indices, best score first."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    xywh = boxes_xyxy.copy()
    xywh[:, 2:] -= xywh[:, :2]
    # top_k=0: OpenCV's top_k limits the candidates before suppression; max_det applies after it
    keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), class_ids.tolist(), 0.0, iou, top_k=0)
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")][:max_det]


def to_source(boxes_xyxy: np.ndarray, geometry: Letterbox, source_size: tuple[int, int]) -> np.ndarray:
    """Model-input pixels -> source pixels, clipped to the image."""
    out = boxes_xyxy.astype(np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - geometry.pad_x) / geometry.ratio
    out[:, [1, 3]] = (out[:, [1, 3]] - geometry.pad_y) / geometry.ratio
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, source_size[0])
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, source_size[1])
    return out


def to_input(boxes_xyxy: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """Source pixels -> model-input pixels (the inverse of `to_source` before clipping)."""
    out = boxes_xyxy.astype(np.float32, copy=True)
    out[:, [0, 2]] = out[:, [0, 2]] * geometry.ratio + geometry.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * geometry.ratio + geometry.pad_y
    return out


def detect(raw: np.ndarray, layout: str, input_hw, geometry: Letterbox, source_size, conf: float, iou: float,
           max_det: int, strides=(8, 16, 32), classes: list[int] | None = None) -> Detections:
    raw = np.asarray(raw)
    if layout in ("yolox", "yolov5"):
        # score = objectness x class score <= objectness: rows below the threshold cannot survive,
        # so only the few candidates are decoded (exactly the same result, a fraction of the work)
        candidates = np.flatnonzero(raw[:, 4] >= conf)
        if candidates.size == 0:
            return Detections.empty()
        cxcywh, class_scores = decode_output(raw, layout, input_hw, strides, rows=candidates)
    else:
        cxcywh, class_scores = decode_output(raw, layout, input_hw, strides)
    class_ids = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(class_ids)), class_ids]
    mask = scores >= conf
    if classes is not None:
        mask &= np.isin(class_ids, classes)
    if not mask.any():
        return Detections.empty()
    cxcywh, scores, class_ids = cxcywh[mask], scores[mask], class_ids[mask].astype(np.int32)
    xyxy = np.concatenate((cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2), axis=1)
    keep = nms(xyxy, scores, class_ids, iou, max_det)
    return Detections(to_source(xyxy[keep], geometry, source_size), scores[keep].astype(np.float32), class_ids[keep])


class PostprocessStage(Stage):
    name = "postprocess"

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, layout: str, input_hw, strides, conf: float,
                 iou: float, max_det: int, classes: list[int] | None = None):
        super().__init__(inbox, outbox)
        self.layout, self.input_hw, self.strides = layout, tuple(input_hw), tuple(strides)
        self.conf, self.iou, self.max_det, self.classes = conf, iou, max_det, classes

    def process(self, batch: FrameBatch) -> None:
        try:
            self._detect_all(batch)
        finally:
            if batch.release is not None:  # pinned output slot of the GPU path: hand it back
                batch.release()
                batch.release = None

    def _detect_all(self, batch: FrameBatch) -> None:
        output = batch.outputs[0]
        input_hw = batch.input_hw or self.input_hw  # the batch's rectangle: its grid decodes the rows
        for row, frame in enumerate(batch.frames):
            try:
                frame.detections = detect(output[row], self.layout, input_hw, frame.letterbox, frame.source_size,
                                          self.conf, self.iou, self.max_det, self.strides, self.classes)
            except Exception as exc:  # one bad output row costs its frame, not the batch
                self.metrics.drop("error")
                self._log_item_error(exc)
                continue
            frame.mark("postprocess")
            try:
                self.emit(frame)
            except Aborted:  # the publisher stopped: the frames not sent yet are counted too
                self.metrics.drop("stopped", len(batch.frames) - row - 1)
                raise

    def discard(self, item) -> None:
        """A batch refused or failed hands its output slot back; a frame refused by a closed outbox
        (the batch it came from is still being processed) holds nothing."""
        if isinstance(item, FrameBatch) and item.release is not None:
            item.release()
            item.release = None
