#!/usr/bin/env python3
"""The Ultralytics half of the side-by-side benchmark: YOLOv8n built from its yaml (random weights,
seeded), exported to ONNX for the pipeline, and Ultralytics' own streaming predict measured on the
same sources.

    python bench/ultralytics_side.py --sources a.mp4 b.mp4 --duration 10 --device cpu [--export DIR]

Nothing here touches the network: YOLO_OFFLINE, YOLO_AUTOINSTALL=False and a private
YOLO_CONFIG_DIR are set before Ultralytics is imported; the model comes from the packaged yaml;
export runs with simplify=False (no onnxslim) and onnx is already installed, so its requirement check
passes without pip; predict draws nothing (no fonts). Importing Ultralytics has process-wide side
effects (cv2.setNumThreads(0), OMP_NUM_THREADS=1 if unset, cudnn.benchmark=True once streams
open), so run this side in its own process, not in the pipeline's.

How Ultralytics' LoadStreams (the loader behind a `.streams` source) treats local video files, read
from ultralytics/data/loaders.py (8.4.x):
- one reader thread per source (cv2.VideoCapture, grab + retrieve = decode + BGR); no pacing to
  the file's frame rate: files are read as fast as they decode; no looping: a stream ends at its
  last frame and the whole predict ends when any stream has ended and its buffer is empty;
- stream_buffer=False (Ultralytics' default): each stream keeps only the newest frame, so a file
  is consumed at decode speed and every frame decoded while a batch is in flight is discarded
  (meant for live cameras); stream_buffer=True: a FIFO of up to 30 frames per stream, the reader
  waits when it is full, nothing is dropped;
- batch = the number of sources: each batch takes one frame from every stream; if a stream has
  none yet, the consumer sleeps 1 / (lowest source fps) before looking again (100 ms for a 10 fps
  file), so when decoding cannot keep up the loss is quantised to the clip's frame period.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before any Ultralytics import: no DNS probe, no pip, settings kept out of the home folder.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "ultralytics-config"))

import numpy as np

MODEL_YAML = "yolov8n.yaml"
SEED = 0


def _build_model(weights: str | Path | None, seed: int = SEED):
    """YOLO from `weights` (a local .pt or a model yaml); None: YOLOv8n from its yaml, random weights seeded
    so that export and measure build the same network."""
    import torch
    from ultralytics import YOLO

    source = str(weights) if weights else MODEL_YAML
    if source.endswith((".yaml", ".yml")):
        torch.manual_seed(seed)
    elif not Path(source).is_file():
        raise FileNotFoundError(f"weights: {source}: no such file (nothing is downloaded)")
    return YOLO(source)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim]


def export_yolov8n_onnx(out_dir: Path, imgsz: int = 640, weights: str | Path | None = None, opset: int | None = None,
                        dynamic_batch: bool = True) -> Path:
    """Export YOLOv8n (built from its yaml, seeded random weights, unless `weights`) to
    `out_dir`/yolov8n.onnx with Ultralytics' exporter and return the path.

    Graph: input `images` float32 [batch, 3, imgsz, imgsz] (RGB, /255), output `output0`
    [batch, 4 + nc, anchors] (xywh in input pixels + class scores: the pipeline's `yolov8` preset).
    Ultralytics' dynamic=True would also free H and W (the pipeline needs them fixed) and compute the
    anchors in the graph, so the export runs with dynamic=False (anchors baked as constants) and only
    the batch axis is marked dynamic in the torch.onnx.export call. dynamic_batch=False: Ultralytics'
    plain export (batch 1), which the pipeline's prepare_model makes batch-dynamic by itself.
    Opset: Ultralytics' choice (18 for torch >= 2.4, capped at the installed onnx) unless given.
    Also writes yolov8n.pt beside it (the same weights, fp16 as Ultralytics saves) for measure_ultralytics(weights=...).
    """
    import onnx
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(weights)
    with torch.no_grad():  # the real output shape, from the module itself
        probe = model.model.float().eval()(torch.zeros(1, 3, imgsz, imgsz))
    probe = probe[0] if isinstance(probe, (list, tuple)) else probe
    values, anchors = int(probe.shape[1]), int(probe.shape[2])

    original_export = torch.onnx.export

    def batch_only_export(*args, **kwargs):
        if kwargs.get("dynamic_axes"):
            raise RuntimeError(f"unexpected dynamic axes from Ultralytics: {kwargs['dynamic_axes']}")
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "output0": {0: "batch"}}
        return original_export(*args, **kwargs)

    if dynamic_batch:
        torch.onnx.export = batch_only_export
    cwd = os.getcwd()
    scratch = Path(tempfile.mkdtemp(prefix="ultra-export-"))
    os.chdir(scratch)  # a yaml-built model exports next to 'yolov8n.yaml', i.e. into the working folder
    try:
        exported = Path(model.export(format="onnx", imgsz=imgsz, dynamic=False, simplify=False, opset=opset, batch=1,
                                     device="cpu", nms=False, verbose=False)).resolve()
    finally:
        os.chdir(cwd)
        torch.onnx.export = original_export
    target = out_dir / "yolov8n.onnx"
    onnx_model = onnx.load(str(exported))
    shutil.rmtree(scratch, ignore_errors=True)
    # torch names the output's fixed dims symbolically (Concat...); write the real values
    output = onnx_model.graph.output[0]
    dims = output.type.tensor_type.shape.dim
    for index, value in ((1, values), (2, anchors)):
        dims[index].Clear()
        dims[index].dim_value = value
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(target))
    model.save(str(out_dir / "yolov8n.pt"))

    inputs = [(i.name, _dims(i)) for i in onnx_model.graph.input]
    outputs = [(o.name, _dims(o)) for o in onnx_model.graph.output]
    opset_used = max(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
    print(f"exported {target} (opset {opset_used}, {target.stat().st_size / 1e6:.1f} MB): inputs {inputs} outputs {outputs}")
    expected_batch = "batch" if dynamic_batch else 1
    if inputs != [("images", [expected_batch, 3, imgsz, imgsz])] or outputs != [("output0", [expected_batch, values, anchors])]:
        raise RuntimeError(f"unexpected exported shapes: inputs {inputs} outputs {outputs}")
    return target


class _Stamped(np.ndarray):
    """A decoded frame with the time the loader got it (perf_counter), its stream and its number."""

    t_read: float = 0.0
    stream: int = -1
    number: int = -1


class _Capture:
    """Stands in for the cv2 module inside ultralytics.data.loaders: its VideoCapture counts the
    frames grabbed (decoded) and stamps each retrieved frame; everything else is cv2's own."""

    def __init__(self, cv2):
        self._cv2 = cv2
        self.captures: list = []
        outer = self

        class VideoCapture(cv2.VideoCapture):
            def __init__(self, *args):
                super().__init__(*args)
                self.index = len(outer.captures)
                self.grabbed = 0
                outer.captures.append(self)

            def _stamp(self, ok, frame):
                if ok and frame is not None:
                    frame = frame.view(_Stamped)
                    frame.t_read, frame.stream, frame.number = time.perf_counter(), self.index, self.grabbed
                return ok, frame

            def grab(self):
                ok = super().grab()
                self.grabbed += ok
                return ok

            def retrieve(self, *args):
                return self._stamp(*super().retrieve(*args))

            def read(self, *args):
                ok, frame = super().read(*args)
                self.grabbed += bool(ok)
                return self._stamp(ok, frame)

        self.VideoCapture = VideoCapture

    def __getattr__(self, name):
        return getattr(self._cv2, name)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def measure_ultralytics(sources: list[str], duration_s: float, warmup_s: float, imgsz=640, half=True, device=0,
                        weights=None, stream_buffer: bool = True, rect: bool | None = None, conf: float | None = None) -> dict:
    """Ultralytics' streaming predict over all `sources` at once, as a user runs it: a `.streams` file
    listing them, `model.predict(source=that, stream=True, imgsz=, half=, device=, verbose=False)` on
    the PyTorch model in memory (YOLOv8n from its yaml, seeded random weights, unless `weights`: a
    local .pt). `half` is passed as Ultralytics' quantize=16 where that argument exists (it replaced
    `half`), and only takes effect on CUDA.

    stream_buffer=True (default here, not Ultralytics'): every frame of every file is processed, as
    the pipeline does with files; False: Ultralytics' default, newest frame only (see the module
    docstring: files are then consumed at decode speed and most frames are skipped). rect=None keeps
    Ultralytics' predict default (rect=True: letterbox to the smallest stride-32 rectangle, e.g.
    640x384 for 16:9, not 640x640); rect=False letterboxes to imgsz x imgsz like the pipeline.
    conf=None keeps Ultralytics' default (0.25).

    The first `warmup_s` seconds after the first result are not counted (CUDA init, cudnn.benchmark
    autotuning, Ultralytics' model.warmup); then results are counted for `duration_s` seconds, or
    until a source ends (LoadStreams does not loop files; 'ended_early' says so and 'seconds' is the
    time actually measured). Counting is per batch: the window runs from the yield of the first batch
    after warm-up to the yield of the last one.

    Returned figures:
    - fps_total: frames yielded (results) per second, all streams; fps_per_stream: fps_total / streams,
      and frames_by_stream;
    - latency_p50_ms / p99_ms ('latency' below): per frame, from the moment the loader thread had the
      decoded BGR frame (VideoCapture.retrieve returned) to the moment the predict generator yielded
      its Results to the caller: waiting in the loader's buffer + letterbox + upload + inference +
      NMS. With stream_buffer=True and a loader that decodes faster than inference, the buffer holds
      up to 30 frames a stream and that wait dominates;
    - batch_wall_p50_ms / p99_ms: per batch, from the end of the dataset fetch (on_predict_batch_start)
      to the yield: the processing time alone;
    - loader_wait_ms_mean / loader_wait_fraction: time the predict loop spent inside the dataset fetch
      (from the caller asking for the next result to on_predict_batch_start), i.e. waiting for frames;
    - speed_ms_per_image: Ultralytics' own profile (preprocess, inference, postprocess; CUDA-synced),
      per image, mean over the window;
    - frames_decoded / frames_skipped: frames the reader threads decoded in the window, and those
      decoded but never yielded (dropped by the newest-frame loader; 0 with stream_buffer=True,
      apart from what sits in the buffers at the window's edges);
    - input_shape: the tensor the model saw, [batch, 3, H, W].
    """
    import torch
    import ultralytics
    import ultralytics.data.loaders as loaders
    from ultralytics.cfg import DEFAULT_CFG_DICT

    sources = [str(Path(s).resolve()) if Path(s).exists() else str(s) for s in sources]
    for s in sources:
        if not Path(s).is_file():
            raise FileNotFoundError(f"source {s}: not a file")
    model = _build_model(weights)
    work = Path(tempfile.mkdtemp(prefix="ultra-streams-"))
    streams_file = work / "sources.streams"
    streams_file.write_text("\n".join(sources) + "\n", encoding="utf-8")

    kwargs = dict(source=str(streams_file), stream=True, imgsz=imgsz, device=device, verbose=False,
                  stream_buffer=stream_buffer)
    if "quantize" in DEFAULT_CFG_DICT:  # 8.4.x: half is a deprecated alias of quantize=16
        kwargs["quantize"] = 16 if half else None
    else:
        kwargs["half"] = half
    if rect is not None:
        kwargs["rect"] = rect
    if conf is not None:
        kwargs["conf"] = conf

    marks = {"batch_start": 0.0, "shape": None, "predictor": None}

    def on_batch_start(predictor):
        marks["batch_start"] = time.perf_counter()
        if marks["predictor"] is None:
            marks["predictor"] = predictor

    model.add_callback("on_predict_batch_start", on_batch_start)

    capture = _Capture(loaders.cv2)
    loaders.cv2 = capture
    n = len(sources)
    first_yield = window_start = window_end = None
    frames = 0
    frames_by_stream = [0] * n
    latencies, walls, waits, speeds, detections = [], [], [], [], 0
    grabbed_at_start = buffered_at_start = None
    ended_early = True
    asked = time.perf_counter()
    generator = model.predict(**kwargs)
    try:
        batch_results: list = []
        for result in generator:
            now = time.perf_counter()
            batch_results.append((result, now))
            if len(batch_results) < n:
                continue  # a batch is n results (one a stream), yielded back to back
            batch_start = marks["batch_start"]
            batch_yield = batch_results[0][1]
            if first_yield is None:
                first_yield = batch_yield
            if window_start is None and batch_yield - first_yield >= warmup_s:
                window_start = batch_yield  # this batch closes the warm-up; count from the next one
                dataset = marks["predictor"].dataset
                grabbed_at_start = sum(c.grabbed for c in capture.captures)
                buffered_at_start = sum(len(x) for x in dataset.imgs)
            elif window_start is not None:
                for r, t in batch_results:
                    frames += 1
                    frames_by_stream[getattr(r.orig_img, "stream", 0)] += 1
                    t_read = getattr(r.orig_img, "t_read", 0.0)
                    if t_read:
                        latencies.append((t - t_read) * 1e3)
                    detections += len(r.boxes) if r.boxes is not None else 0
                walls.append((batch_yield - batch_start) * 1e3)
                waits.append((batch_start - asked) * 1e3)
                speeds.append(batch_results[0][0].speed)
                window_end = batch_yield
                if window_end - window_start >= duration_s:
                    ended_early = False
                    break
            if marks["shape"] is None:
                r0 = batch_results[0][0]
                marks["shape"] = r0.orig_shape
            batch_results = []
            asked = time.perf_counter()
        predictor = marks["predictor"]
        grabbed_at_end = sum(c.grabbed for c in capture.captures)
        buffered_at_end = sum(len(x) for x in predictor.dataset.imgs) if predictor is not None else 0
        input_hw = None
        if predictor is not None:  # the letterbox Ultralytics applied, on one frame of the real shape
            probe = np.zeros(marks["shape"] + (3,), np.uint8) if marks["shape"] else None
            if probe is not None:
                input_hw = list(predictor.pre_transform([probe] * n)[0].shape[:2])
        cuda_name = torch.cuda.get_device_name(predictor.device) if predictor is not None and predictor.device.type == "cuda" else None
        fp16 = bool(getattr(predictor.model, "fp16", False)) if predictor is not None else None
    finally:
        generator.close()  # runs predict's finally: closes LoadStreams (joins the reader threads)
        loaders.cv2 = capture._cv2
        streams_file.unlink(missing_ok=True)
        work.rmdir()

    if window_start is None or window_end is None or frames == 0:
        raise RuntimeError(f"no batch after the {warmup_s:.1f} s warm-up (the sources ended first); use longer sources")
    seconds = window_end - window_start
    decoded = grabbed_at_end - grabbed_at_start
    skipped = max(0, decoded - frames - (buffered_at_end - buffered_at_start))
    speed = {k: statistics.fmean(s[k] for s in speeds) for k in speeds[0]} if speeds else {}
    fps_total = frames / seconds if seconds > 0 else float("nan")
    notes = (
        f"ultralytics {ultralytics.__version__}, torch {torch.__version__}, {cuda_name or 'CPU'}, fp16={fp16}; "
        f"LoadStreams over a .streams file of {n} local files: no pacing to file fps, no looping, "
        f"stream_buffer={stream_buffer} ({'FIFO of <=30 frames a stream, lossless' if stream_buffer else 'newest frame only, the rest dropped'}), "
        f"batch = {n} (one frame a stream); rect={'default(True)' if rect is None else rect}, input {input_hw}; "
        f"latency = loader's retrieve() of the frame -> Results yielded; batch_wall = dataset fetch done -> yield; "
        f"warm-up {warmup_s:.1f} s excluded" + ("; a source ended before the duration" if ended_early else "")
    )
    return {
        "frames": frames,
        "seconds": seconds,
        "fps_total": fps_total,
        "fps_per_stream": fps_total / n,
        "frames_by_stream": frames_by_stream,
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p99_ms": _percentile(latencies, 99),
        "batch_wall_p50_ms": _percentile(walls, 50),
        "batch_wall_p99_ms": _percentile(walls, 99),
        "loader_wait_ms_mean": statistics.fmean(waits) if waits else None,
        "loader_wait_fraction": sum(waits) / 1e3 / seconds if seconds > 0 else None,
        "batch": n,
        "batches": len(walls),
        "input_shape": [n, 3, *input_hw] if input_hw else None,
        "speed_ms_per_image": speed,
        "frames_decoded": decoded,
        "frames_skipped": skipped,
        "detections_per_frame": detections / frames,
        "ended_early": ended_early,
        "stream_buffer": stream_buffer,
        "fp16": fp16,
        "device": cuda_name or "cpu",
        "ultralytics": ultralytics.__version__,
        "torch": torch.__version__,
        "notes": notes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", required=True, help="video files, one stream each")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured after warm-up")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted at the start")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="0", help="CUDA index or 'cpu'")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=None, help="fp16 (default: on CUDA)")
    parser.add_argument("--weights", help="a local .pt (default: YOLOv8n from its yaml, seeded random weights)")
    parser.add_argument("--stream-buffer", action=argparse.BooleanOptionalAction, default=True,
                        help="Ultralytics' stream_buffer (default here: on = every frame; off = newest frame only)")
    parser.add_argument("--rect", action=argparse.BooleanOptionalAction, default=None,
                        help="letterbox to the minimal rectangle (Ultralytics' default) or to imgsz x imgsz (--no-rect)")
    parser.add_argument("--export", type=Path, help="also export the ONNX into this folder")
    args = parser.parse_args()
    if args.export:
        export_yolov8n_onnx(args.export, args.imgsz, args.weights)
    device = args.device if not args.device.isdigit() else int(args.device)
    half = args.half if args.half is not None else device != "cpu"
    result = measure_ultralytics(args.sources, args.duration, args.warmup, imgsz=args.imgsz, half=half, device=device,
                                 weights=args.weights, stream_buffer=args.stream_buffer, rect=args.rect)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
