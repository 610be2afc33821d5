"""Letterbox geometry and pixels, for both alignments and awkward sizes."""

import time

import cv2
import numpy as np
import pytest

from stages.letterbox import letterbox_geometry, letterbox_into

SIZES = [(768, 432), (432, 768), (641, 479), (479, 641), (1, 1), (3, 2), (2, 3), (416, 416), (3840, 2160), (4000, 3000), (100, 5000)]


@pytest.mark.parametrize("align", ["center", "top-left"])
@pytest.mark.parametrize("src_w,src_h", SIZES)
def test_geometry_fits_and_keeps_aspect(align, src_w, src_h):
    geo = letterbox_geometry(src_w, src_h, 416, 416, align)
    assert geo.ratio == pytest.approx(min(416 / src_w, 416 / src_h))
    assert max(geo.resized_w, geo.resized_h) == 416  # the long side fills the input
    assert 0 <= geo.pad_x and geo.pad_x + geo.resized_w <= 416
    assert 0 <= geo.pad_y and geo.pad_y + geo.resized_h <= 416
    if align == "top-left":
        assert geo.pad_x == geo.pad_y == 0
    else:  # centred: the two pads differ by at most one pixel
        assert abs((416 - geo.resized_w - geo.pad_x) - geo.pad_x) <= 1
        assert abs((416 - geo.resized_h - geo.pad_y) - geo.pad_y) <= 1
    if src_w > 2 and src_h > 2:
        assert abs(geo.resized_w / geo.resized_h - src_w / src_h) < 0.02 * src_w / src_h + 1 / min(geo.resized_w, geo.resized_h)


def test_landscape_centered_numbers():
    geo = letterbox_geometry(768, 432, 640, 640, "center")
    assert (geo.resized_w, geo.resized_h, geo.pad_x, geo.pad_y) == (640, 360, 0, 140)


def test_portrait_top_left_numbers():
    geo = letterbox_geometry(432, 768, 416, 416, "top-left")
    assert (geo.resized_w, geo.resized_h, geo.pad_x, geo.pad_y) == (234, 416, 0, 0)


@pytest.mark.parametrize("align", ["center", "top-left"])
@pytest.mark.parametrize("src_w,src_h", [(768, 432), (479, 641), (3, 2), (1920, 1080), (416, 416)])
def test_pixels_written_in_place(align, src_w, src_h):
    rng = np.random.default_rng(src_w * src_h)
    image = rng.integers(0, 256, (src_h, src_w, 3), dtype=np.uint8)
    slot = np.full((2, 416, 416, 3), 7, np.uint8)  # a batch slot; row 1 is written, row 0 untouched
    geo = letterbox_into(image, slot[1], align, pad_value=114)
    x0, y0 = geo.pad_x, geo.pad_y
    x1, y1 = x0 + geo.resized_w, y0 + geo.resized_h
    expected = cv2.resize(image, (geo.resized_w, geo.resized_h), interpolation=cv2.INTER_LINEAR) \
        if (geo.resized_w, geo.resized_h) != (src_w, src_h) else image
    assert np.array_equal(slot[1, y0:y1, x0:x1], expected)
    padding = np.ones((416, 416), bool)
    padding[y0:y1, x0:x1] = False
    assert (slot[1][padding] == 114).all()
    assert (slot[0] == 7).all()


def test_threaded_stage_writes_the_same_rows_as_one_thread():
    from pipeline.buffers import HostSlotPool
    from pipeline.model import PRESETS
    from pipeline.queues import CLOSED, BoundedQueue
    from pipeline.record import Frame, FrameBatch
    from stages.letterbox import LetterboxStage

    rng = np.random.default_rng(7)
    sizes = [(1920, 1080), (640, 480), (33, 71), (1280, 720)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    results = []
    for threads in (1, 3):
        inbox, outbox = BoundedQueue(2), BoundedQueue(2)
        pool = HostSlotPool(2, (4, 416, 416, 3))
        stage = LetterboxStage(inbox, outbox, pool, PRESETS["yolov8"], threads=threads)
        frames = [Frame("c", i, None, 0.0, img, (img.shape[1], img.shape[0])) for i, img in enumerate(images)]
        inbox.put(FrameBatch(frames))
        inbox.close()
        stage.start()
        batch = outbox.get(timeout=10)
        assert outbox.get(timeout=10) is CLOSED and stage.join(5)
        results.append((batch.slot.array.copy(), [f.letterbox for f in batch.frames]))
        assert all(f.image is None for f in batch.frames)
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_a_closed_slot_pool_stops_the_stage_instead_of_spinning():
    """Past the shutdown deadline the run closes the slot pool: a letterbox stage waiting for a slot
    must end (its batch counted as stopped), not retry a pool that answers at once forever."""
    from pipeline.buffers import HostSlotPool
    from pipeline.model import PRESETS
    from pipeline.queues import BoundedQueue
    from pipeline.record import Frame, FrameBatch
    from stages.letterbox import LetterboxStage

    pool = HostSlotPool(1, (1, 32, 32, 3))
    held = pool.acquire()  # every slot in flight
    inbox, outbox = BoundedQueue(4), BoundedQueue(4)
    stage = LetterboxStage(inbox, outbox, pool, PRESETS["yolox"])
    inbox.put(FrameBatch([Frame("cam", 0, 0.0, 0.0, np.zeros((48, 64, 3), np.uint8), (64, 48))]))
    stage.start()
    time.sleep(0.2)  # let it start waiting for a slot (not the verdict: the join below is)
    pool.close()
    assert stage.join(timeout=10), "the letterbox stage is still running (spinning on the closed pool)"
    assert stage.metrics.drops["stopped"] == 1 and stage.failure is None
    assert held is not None and outbox.closed


@pytest.mark.parametrize("hw", [(416, 416), (256, 416), (416, 256)])
def test_batch_view_of_a_device_slot_at_the_square_and_a_rectangle(hw):
    """The GPU letterbox's slots are DeviceArrays (a pointer and a shape; nothing to slice on the
    host). A batch at the slot's own square once went through `array[:n]` and every such batch
    failed (square letterbox with NVDEC or `letterbox_device: gpu` dropped every frame)."""
    from pipeline.buffers import batch_view
    from pipeline.cuda import DeviceArray

    slot = DeviceArray(0x7000_0000, (8, 416, 416, 3), np.uint8)
    view = batch_view(slot, 3, hw)
    assert isinstance(view, DeviceArray)
    assert view.ptr == slot.ptr and view.shape == (3, *hw, 3)
    assert view.row_ptr(1) - view.ptr == hw[0] * hw[1] * 3  # rows packed at the batch's shape
    host = batch_view(np.zeros((8, 416, 416, 3), np.uint8), 3, hw)
    assert host.shape == view.shape and host.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="does not fit"):
        batch_view(slot, 9, (416, 416))
    # what the stages read: a batch's images at its input shape, or at the slot's own without one
    from pipeline.buffers import HostSlot
    from pipeline.record import Frame, FrameBatch

    frames = [Frame("cam", i, None, 0.0, None, (768, 432)) for i in range(3)]
    shaped = FrameBatch(frames, slot=HostSlot(0, slot), input_hw=hw).images()
    assert isinstance(shaped, DeviceArray) and shaped.shape == view.shape
    assert FrameBatch(frames, slot=HostSlot(0, slot)).images().shape == (3, 416, 416, 3)
