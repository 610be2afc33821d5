"""A plain per-frame YOLOX-Nano implementation, written independently of the pipeline's code.

It follows the model's published recipe (top-left letterbox padded with 114, BGR raw 0-255 floats
in NCHW, grid/stride decode, objectness x class score, per-class NMS) on the original ONNX file,
so the pipeline's detections can be checked against it. With `rect=True` it letterboxes as
Ultralytics' rect mode does (pad only up to the next multiple of 32 of the resized frame) and runs
the same file with its input's height and width declared free.
"""

from __future__ import annotations

import av
import cv2
import numpy as np
import onnx
import onnxruntime as ort

INPUT = 416
STRIDES = (8, 16, 32)


def read_frames(path, wanted: set[int]) -> dict[int, np.ndarray]:
    frames = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="bgr24")
            if len(frames) == len(wanted):
                break
    return frames


def preprocess(image: np.ndarray, rect: bool = False) -> tuple[np.ndarray, float]:
    r = min(INPUT / image.shape[0], INPUT / image.shape[1])
    resized = cv2.resize(image, (int(round(image.shape[1] * r)), int(round(image.shape[0] * r))), interpolation=cv2.INTER_LINEAR)
    if rect:
        height, width = (int(np.ceil(n / 32) * 32) for n in resized.shape[:2])
    else:
        height = width = INPUT
    padded = np.full((height, width, 3), 114, np.uint8)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return padded.transpose(2, 0, 1)[None].astype(np.float32), r


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order = scores.argsort()[::-1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1) * np.maximum(0, yy2 - yy1)
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= iou]
    return keep


def postprocess(output: np.ndarray, ratio: float, width: int, height: int, conf: float, iou: float,
                input_hw: tuple[int, int] = (INPUT, INPUT)) -> list[dict]:
    grids, strides = [], []
    for s in STRIDES:
        nh, nw = input_hw[0] // s, input_hw[1] // s
        ys, xs = np.mgrid[0:nh, 0:nw]
        grids.append(np.stack((xs.ravel(), ys.ravel()), 1))
        strides.append(np.full((nh * nw, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred = output[0].copy()
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * stride
    boxes = np.empty((len(pred), 4), np.float32)
    boxes[:, :2] = pred[:, :2] - pred[:, 2:4] / 2
    boxes[:, 2:] = pred[:, :2] + pred[:, 2:4] / 2
    boxes /= ratio
    scores_all = pred[:, 4:5] * pred[:, 5:]
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    detections = []
    for c in np.unique(cls[score >= conf]):
        idx = np.where((cls == c) & (score >= conf))[0]
        for k in _nms(boxes[idx], score[idx], iou):
            b = boxes[idx[k]].copy()
            b[[0, 2]] = b[[0, 2]].clip(0, width)
            b[[1, 3]] = b[[1, 3]].clip(0, height)
            detections.append({"class_id": int(c), "score": float(score[idx[k]]), "box": b.tolist()})
    return detections


class ReferenceDetector:
    def __init__(self, model_path, conf: float = 0.3, iou: float = 0.45, rect: bool = False):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        model = onnx.load(str(model_path))
        if rect:  # the exported graph is fully convolutional; only its declared input size is fixed
            dims = model.graph.input[0].type.tensor_type.shape.dim
            dims[2].dim_param, dims[3].dim_param = "h", "w"
            model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "anchors"
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.conf, self.iou, self.rect = conf, iou, rect

    def __call__(self, image: np.ndarray) -> list[dict]:
        blob, ratio = preprocess(image, self.rect)
        output = self.session.run(None, {self.session.get_inputs()[0].name: blob})[0]
        return postprocess(output, ratio, image.shape[1], image.shape[0], self.conf, self.iou, blob.shape[2:])


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def unmatched(expected: list[dict], actual: list[dict], min_iou: float, score_tol: float, conf: float) -> list[str]:
    """Detections of `expected` with no partner in `actual` (same class, IoU, score), and vice versa.

    Detections whose score lies within `score_tol` of the threshold may legitimately appear on one
    side only, so they are not required to match.
    """
    problems = []
    for this, other, side in ((expected, actual, "missing"), (actual, expected, "extra")):
        for d in this:
            if d["score"] < conf + score_tol:
                continue
            partners = [o for o in other if o["class_id"] == d["class_id"] and iou(o["box"], d["box"]) >= min_iou
                        and abs(o["score"] - d["score"]) <= score_tol]
            if not partners:
                problems.append(f"{side}: class {d['class_id']} score {d['score']:.3f} box {[round(v, 1) for v in d['box']]}")
    return problems
