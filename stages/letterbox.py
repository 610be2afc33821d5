"""Letterbox stage: resizes each frame of a batch straight into its row of a host slot.

The long side is scaled to the model input, the rest padded with a constant, aligned to the
centre (YOLOv5/v8) or the top-left corner (YOLOX). The target is the batch's input shape: the
model's square, or with rectangle letterboxing the smallest stride-aligned rectangle that holds
the frame (`pipeline.model.rect_shape`; the batch stage groups frames by it). The slot stays uint8 BGR: colour order,
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
from pipeline.queues import Aborted, BoundedQueue
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


class _SlotFillingStage(Stage):
    """A letterbox stage: takes a free batch slot for each batch (waiting is back-pressure, not work)."""

    name = "letterbox"
    pool: HostSlotPool

    def _take_slot(self, batch: FrameBatch):
        slot = None
        waiting_since = time.perf_counter()
        while slot is None:
            slot = self.pool.acquire(timeout=0.5)
            # a closed pool returns at once: stop instead of spinning (torn down, or inference stopped)
            if slot is None and (self.pool.closed or self.outbox.closed):
                self.metrics.drop("stopped", len(batch))
                raise Aborted("batch slot pool closed")
        self._waited += time.perf_counter() - waiting_since
        batch.slot = slot
        return slot

    def discard(self, batch: FrameBatch) -> None:
        for frame in batch.frames:
            frame.video = None
        batch.release_credit()
        if batch.slot is not None:
            self.pool.release(batch.slot)
            batch.slot = None


class LetterboxStage(_SlotFillingStage):

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, pool: HostSlotPool, preset: Preset, keep_images: bool = False,
                 threads: int = 1):
        super().__init__(inbox, outbox)
        self.pool = pool
        self.preset = preset
        self.keep_images = keep_images  # the publisher needs them for preview frames
        # cv2.resize releases the GIL: large frames (1080p: ~1 ms each) letterbox in parallel
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="letterbox") if threads > 1 else None

    def process(self, batch: FrameBatch) -> None:
        self._take_slot(batch)
        images = batch.images()
        rows = range(len(batch.frames))
        if self._workers is not None and len(batch.frames) > 1:
            geometries = list(self._workers.map(lambda row: self._letterbox_row(batch, images, row), rows))
        else:
            geometries = [self._letterbox_row(batch, images, row) for row in rows]
        for frame, geometry in zip(batch.frames, geometries):
            frame.letterbox = geometry
            if not self.keep_images:
                frame.image = None
            frame.mark("letterbox")
        self.emit(batch)

    def _letterbox_row(self, batch: FrameBatch, images: np.ndarray, row: int) -> Letterbox:
        return letterbox_into(batch.frames[row].image, images[row], self.preset.align, self.preset.pad_value)

    def on_stop(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=True)


class GpuLetterboxStage(_SlotFillingStage):
    """Letterbox on the GPU into a device batch buffer (see `pipeline.gpu_letterbox`).

    Frames carry their decoded PyAV frame (`Frame.video`): NV12 in device memory from NVDEC is
    read in place; YUV 4:2:0 from a CPU decoder is uploaded plane by plane (1.5 bytes a pixel
    instead of BGR's 3, and no colour conversion or resize on the CPU). One kernel launch a frame;
    the batch waits for its kernels before it moves on, so decoder surfaces go back to NVDEC at
    once and any lane can read the buffer. With previews on, a frame picked by `preview_gate` is
    also converted to BGR on the host for the publisher.
    """

    def __init__(self, inbox: BoundedQueue, outbox: BoundedQueue, pool: HostSlotPool, preset: Preset, device: int,
                 preview_gate=None):
        from pipeline.cuda import Event, Stream, set_device
        from pipeline.gpu_letterbox import GpuLetterboxer

        super().__init__(inbox, outbox)
        self.pool = pool
        self.preset = preset
        self.device = device
        self.preview_gate = preview_gate
        set_device(device)
        self.stream = Stream(blocking=True)  # waits for FFmpeg's NVDEC copies on the legacy default stream
        self.done = Event()
        batch_shape = pool.slots[0].array.shape
        self.letterboxer = GpuLetterboxer(device, batch_shape[1:3], rgb_order=False, pad_value=preset.pad_value)
        self._staging: list = []  # per batch row: a device buffer for an uploaded host frame's planes
        self.uploads = 0  # host frames uploaded (CPU decoding)
        self.converted = 0  # host frames in a format other than yuv420p, converted on the CPU first

    def on_start(self) -> None:
        from pipeline.cuda import set_device

        set_device(self.device)  # the driver-API launch needs the device's context current in this thread

    def process(self, batch: FrameBatch) -> None:
        self._take_slot(batch)
        images = batch.images()  # a DeviceArray of the batch's shape
        dst_h, dst_w = images.shape[1:3]
        for row, frame in enumerate(batch.frames):
            planes = self._planes(frame, row)
            geometry = letterbox_geometry(planes.width, planes.height, dst_w, dst_h, self.preset.align)
            self.letterboxer.launch(planes, images.row_ptr(row), geometry, self.stream, dst_hw=(dst_h, dst_w))
            frame.letterbox = geometry
        self.done.record(self.stream)
        self.done.wait()  # polls, so other threads keep the GIL meanwhile
        for frame in batch.frames:
            if self.preview_gate is not None and self.preview_gate.take(frame.camera):
                frame.image = _to_bgr(frame.video)
            frame.video = None
            frame.mark("letterbox")
        self.emit(batch)

    def _planes(self, frame, row: int):
        from pipeline.gpu_letterbox import YuvPlanes, frame_matrix

        video = frame.video
        if video is None:
            raise RuntimeError(f"camera {frame.camera}: frame {frame.index} has no decoded video to letterbox")
        if video.format.name == "cuda":
            return YuvPlanes.from_nv12_frame(video)
        if video.format.name not in ("yuv420p", "yuvj420p"):  # odd sizes are fine: see i420_layout
            video = video.reformat(format="yuv420p")
            self.converted += 1
        return self._upload(video, row, *frame_matrix(video))

    def _upload(self, video, row: int, matrix: str, full_range: bool):
        from pipeline.cuda import DeviceBuffer, copy_2d_to_device
        from pipeline.gpu_letterbox import YuvPlanes, i420_layout

        w, h = video.width, video.height
        offsets, sizes = i420_layout(w, h)
        need = offsets[2] + sizes[2][0] * sizes[2][1]
        while len(self._staging) <= row:
            self._staging.append(None)
        if self._staging[row] is None or self._staging[row].nbytes < need:
            if self._staging[row] is not None:
                self.stream.synchronize()
                self._staging[row].free()
            self._staging[row] = DeviceBuffer(need)
        base = self._staging[row].ptr
        for plane, offset, (pw, ph) in zip(video.planes, offsets, sizes):
            copy_2d_to_device(base + offset, pw, plane.buffer_ptr, plane.line_size, pw, ph, self.stream)
        self.uploads += 1
        return YuvPlanes(w, h, base, w, base + offsets[1], base + offsets[2], sizes[1][0], 1, matrix,
                         full_range or video.format.name == "yuvj420p")

    def on_stop(self) -> None:
        self.stream.synchronize()
        for buffer in self._staging:
            if buffer is not None:
                buffer.free()
        self._staging.clear()


def _to_bgr(video) -> np.ndarray:
    """A decoded frame (host, or NVDEC's NV12 on the device) as BGR on the host: for previews."""
    if video.format.name == "cuda":
        from pipeline.cuda import copy_2d_to_host

        w, h = video.width, video.height
        nv12 = np.empty((h * 3 // 2, w), np.uint8)
        copy_2d_to_host(nv12[:h], video.planes[0].buffer_ptr, video.planes[0].line_size, w, h)
        copy_2d_to_host(nv12[h:], video.planes[1].buffer_ptr, video.planes[1].line_size, w, h // 2)
        return cv2.cvtColor(nv12, cv2.COLOR_YUV2BGR_NV12)
    return video.to_ndarray(format="bgr24")
