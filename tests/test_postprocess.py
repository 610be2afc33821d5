"""Output layouts decoded from constructed tensors, class-aware NMS, and the box mapping round trip."""

import numpy as np
import pytest

from pipeline.record import Letterbox
from stages.letterbox import letterbox_geometry
from stages.postprocess import decode_output, detect, nms, to_input, to_source, yolox_grid

HW = (416, 416)
ANCHORS = 52 * 52 + 26 * 26 + 13 * 13
IDENTITY = Letterbox(1.0, 0, 0, 416, 416)


def test_yolox_grid_order_is_row_major_x_fastest():
    grid, stride = yolox_grid(HW, (8, 16, 32))
    assert grid.shape == (ANCHORS, 2) and stride.shape == (ANCHORS, 1)
    assert grid[1].tolist() == [1, 0] and grid[52].tolist() == [0, 1]
    assert stride[52 * 52].item() == 16 and grid[52 * 52].tolist() == [0, 0]
    assert stride[-1].item() == 32 and grid[-1].tolist() == [12, 12]


def test_yolox_layout():
    raw = np.zeros((ANCHORS, 85), np.float32)
    # anchor (x=10, y=20) at stride 8: centre offset 0.5, size exp(log(4)) * 8 = 32
    a = 20 * 52 + 10
    raw[a, :4] = [0.5, 0.25, np.log(4.0), np.log(2.0)]
    raw[a, 4] = 0.9
    raw[a, 5 + 2] = 0.8
    dets = detect(raw, "yolox", HW, IDENTITY, (416, 416), conf=0.3, iou=0.45, max_det=100)
    assert dets.class_ids.tolist() == [2]
    assert dets.scores[0] == pytest.approx(0.72)
    cx, cy = (10 + 0.5) * 8, (20 + 0.25) * 8
    assert dets.xyxy[0].tolist() == pytest.approx([cx - 16, cy - 8, cx + 16, cy + 8])


def test_yolov5_layout_uses_objectness():
    raw = np.zeros((100, 85), np.float32)
    raw[3, :5] = [200, 100, 50, 80, 0.5]
    raw[3, 5 + 7] = 0.9
    raw[4, :5] = [50, 50, 10, 10, 0.2]  # objectness 0.2 x class 0.9 = 0.18: below threshold
    raw[4, 5 + 1] = 0.9
    dets = detect(raw, "yolov5", HW, IDENTITY, (416, 416), conf=0.3, iou=0.45, max_det=100)
    assert dets.class_ids.tolist() == [7]
    assert dets.scores[0] == pytest.approx(0.45)
    assert dets.xyxy[0].tolist() == pytest.approx([175, 60, 225, 140])


def test_yolov8_layout_is_channels_first_without_objectness():
    raw = np.zeros((84, 200), np.float32)
    raw[:4, 17] = [100, 200, 40, 20]
    raw[4 + 5, 17] = 0.66
    boxes, scores = decode_output(raw, "yolov8", HW)
    assert boxes.shape == (200, 4) and scores.shape == (200, 80)
    dets = detect(raw, "yolov8", HW, IDENTITY, (416, 416), conf=0.25, iou=0.45, max_det=100)
    assert dets.class_ids.tolist() == [5]
    assert dets.scores[0] == pytest.approx(0.66)
    assert dets.xyxy[0].tolist() == pytest.approx([80, 190, 120, 210])


def test_classes_filter_and_max_detections():
    raw = np.zeros((84, 10), np.float32)
    for i in range(10):
        raw[:4, i] = [20 + 40 * i, 50, 30, 30]
        raw[4 + (i % 2), i] = 0.5 + i / 100
    dets = detect(raw, "yolov8", HW, IDENTITY, (416, 416), conf=0.25, iou=0.45, max_det=3, classes=[1])
    assert dets.class_ids.tolist() == [1, 1, 1]
    assert dets.scores.tolist() == pytest.approx([0.59, 0.57, 0.55])


def test_nms_is_class_aware():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 100, 100], [0, 0, 100, 100], [200, 200, 250, 250]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 0, 1, 0], np.int32)
    keep = nms(boxes, scores, classes, iou=0.5, max_det=10)
    # box 1 overlaps box 0 of the same class: suppressed; box 2 is another class: kept
    assert keep.tolist() == [0, 2, 3]
    assert nms(boxes, scores, classes, iou=0.5, max_det=2).tolist() == [0, 2]
    assert nms(boxes[:0], scores[:0], classes[:0], 0.5, 10).tolist() == []


def test_nms_keeps_overlaps_below_the_threshold():
    boxes = np.array([[0, 0, 100, 100], [50, 0, 150, 100]], np.float32)  # IoU = 1/3
    scores = np.array([0.9, 0.8], np.float32)
    classes = np.zeros(2, np.int32)
    assert nms(boxes, scores, classes, iou=0.5, max_det=10).tolist() == [0, 1]
    assert nms(boxes, scores, classes, iou=0.3, max_det=10).tolist() == [0]


@pytest.mark.parametrize("align", ["center", "top-left"])
@pytest.mark.parametrize("src", [(768, 432), (432, 768), (1920, 1080), (33, 17)])
def test_box_mapping_round_trip(align, src):
    geo = letterbox_geometry(src[0], src[1], 416, 416, align)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1, (50, 2)) * np.array(src) * 0.5
    wh = rng.uniform(0.01, 0.5, (50, 2)) * np.array(src)
    boxes = np.concatenate((xy, xy + wh), 1).astype(np.float32)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, src[0])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, src[1])
    back = to_source(to_input(boxes, geo), geo, src)
    assert np.allclose(back, boxes, atol=1e-3 * max(src))


def test_boxes_in_the_padding_are_clipped_to_the_image():
    geo = letterbox_geometry(768, 432, 416, 416, "center")  # 416x234, pad_y 91
    boxes = np.array([[-20, 0, 500, 416]], np.float32)  # reaches into both padding bands
    out = to_source(boxes, geo, (768, 432))
    assert out[0].tolist() == pytest.approx([0, 0, 768, 432])


def test_a_frame_refused_by_a_closed_outbox_is_a_counted_stop_not_an_error():
    """Postprocess takes batches in and sends frames out. When the stage after it has stopped (its
    queue closed, as at a shutdown deadline), the refused frame is counted as `stopped` and the batch's
    output slot is handed back once; it was an AttributeError ('Frame' has no 'release') logged as a
    skipped item, on a 4-GPU load run's shutdown."""
    from pipeline.queues import Aborted, BoundedQueue
    from pipeline.record import Frame, FrameBatch
    from stages.postprocess import PostprocessStage

    inbox, outbox = BoundedQueue(2, name="inferred"), BoundedQueue(2, name="detected")
    stage = PostprocessStage(inbox, outbox, "yolox", HW, (8, 16, 32), 0.3, 0.45, 100)
    released = []
    frames = [Frame(camera="cam", index=i, pts=None, capture_time=0.0, image=None, source_size=(416, 416),
                    letterbox=IDENTITY) for i in range(2)]
    batch = FrameBatch(frames, outputs=[np.zeros((2, ANCHORS, 85), np.float32)], release=lambda: released.append(1))
    outbox.close()
    with pytest.raises(Aborted):
        stage.process(batch)
    stage.discard(batch)  # what the stage loop does with an aborted item
    assert released == [1]
    assert stage.metrics.drops == {"stopped": 2}
