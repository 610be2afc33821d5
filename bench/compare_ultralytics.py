#!/usr/bin/env python3
"""Side by side with Ultralytics on one machine, in one run: same model, same clips, same streams.

The model is Ultralytics' YOLOv8n built from its yaml (seeded random weights: speed does not
depend on them) and exported by Ultralytics to ONNX (bench/ultralytics_side.py). Both sides read
the same N 1080p30 H.264 files as N streams, as fast as they can, every frame processed:

- Ultralytics: `model.predict(source=<.streams file>, stream=True, half=True)` on the PyTorch
  model, `stream_buffer=True` (every frame, like the pipeline's files), once with its default
  rectangular letterbox (640x384 for 16:9: fewer pixels, its best case) and once square (640x640,
  the same work as the pipeline's model input);
- this pipeline, with the exported ONNX (`yolov8` preset): one process with CPU decoding, and its
  many-camera configuration (NVDEC, worker processes under MPS when the bench runs it so).

Reported: frames per second (total, per stream), latency p50/p99 (Ultralytics: from the frame
being read to its result being yielded; pipeline: from decode to publish) and the ratio to
Ultralytics' best throughput. Each side runs in its own processes, one after the other.

    python bench/compare_ultralytics.py --streams 16 [--workers-nvdec 8] [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import append_results, commit  # noqa: E402
from bench.load import build_parser as build_load_parser, make_clips, measure  # noqa: E402


def export_model(folder: Path) -> Path:
    """Ultralytics' own export (batch 1, which the pipeline makes batch-dynamic and checks), at opset 17:
    onnx2torch (the torch engine) has no converter for opset 18's Split. Its dynamic-batch export
    keeps run-time shape arithmetic on the batch, which blocks CUDA graph capture."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.ultralytics_side import export_yolov8n_onnx; print(export_yolov8n_onnx(Path(sys.argv[2]), opset=17, dynamic_batch=False))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder)], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def ultralytics_run(sources: list[Path], args, rect: bool) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "ultralytics_side.py"), "--sources", *map(str, sources),
               "--duration", str(args.duration), "--warmup", str(args.warmup), "--device", "0", "--half",
               "--rect" if rect else "--no-rect"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + args.warmup + 240)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    text = out.stdout
    return json.loads(text[text.index("{"):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--workers-nvdec", type=int, default=8, help="worker processes for the many-camera configuration")
    parser.add_argument("--clips", type=Path, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="the pipeline's torch engine compiled (engine.compile, inductor): the first pipeline run "
                             "compiles and caches the artifacts (start-up allowed 420 s), the second loads them")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compare-"))
    clip_dir = args.clips or work
    clip_dir.mkdir(parents=True, exist_ok=True)
    clips = make_clips(clip_dir, seconds=30)  # Ultralytics stops at the first file that ends: long enough for the window
    sources = [clips[i % len(clips)] for i in range(args.streams)]
    model = export_model(work / "model")
    from pipeline import cuda

    card = cuda.device_name() if cuda.available() else "no GPU"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[tuple[str, str, dict]] = []
    for rect in (True, False):
        rows.append(("Ultralytics 8.4 predict(stream=True)", f"fp16, {'rect 640x384 (default)' if rect else 'square 640x640'}",
                     ultralytics_run(sources, args, rect)))

    def pipeline(decoder: str, workers: int, letterbox: str) -> dict:
        # the load benchmark's own defaults (torch fp16 + graphs, 3 lanes, batch <= 32), on this model
        options = build_load_parser().parse_args([
            "--model", str(model), "--preset", "yolov8", "--labels", "", "--letterbox", letterbox,
            "--workers", str(workers), "--warmup", str(args.warmup), "--duration", str(args.duration), "--windows", "1",
            "--startup-timeout", "420" if args.compile else "120", *(["--compile"] if args.compile else [])])
        result = measure(clips, args.streams, decoder, options, work, live=False)
        return {"fps_total": result.get("fps_total"), "fps_per_stream": result.get("fps_stream_mean"),
                "latency_p50_ms": result.get("latency_p50_ms"), "latency_p99_ms": result.get("latency_p99_ms"),
                "cpu_cores": result.get("cpu_cores"), "gpu_util_pct": result.get("gpu_util_pct"), **result}

    engine = f"torch fp16{' compiled' if args.compile else ''} + CUDA graphs"
    rows.append(("this pipeline", f"1 process, CPU decode, GPU letterbox, {engine}", pipeline("cpu", 0, "gpu")))
    rows.append(("this pipeline", f"{args.workers_nvdec} workers, NVDEC, GPU letterbox, {engine}",
                 pipeline("nvdec", args.workers_nvdec, "gpu")))

    best = max((r.get("fps_total") or 0) for name, _, r in rows if name.startswith("Ultralytics"))
    title = (f"{stamp} | {card} | {os.cpu_count()} CPU cores | commit {commit()} | {args.streams} streams of 1080p30 H.264 "
             f"| YOLOv8n 640 (Ultralytics export)" + (f" | {args.label}" if args.label else ""))
    lines = [f"# Ultralytics side by side: {title}", "",
             "| side | configuration | fps total | fps / stream | latency p50 ms | p99 ms | vs Ultralytics' best |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, setting, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {setting} | error: {r['error']} | | | | |")
            continue
        fps = r.get("fps_total") or 0
        lines.append(f"| {name} | {setting} | {fps:.0f} | {r.get('fps_per_stream') or 0:.1f} | "
                     f"{r.get('latency_p50_ms') or float('nan'):.0f} | {r.get('latency_p99_ms') or float('nan'):.0f} | "
                     f"{fps / best:.2f}x |" if best else "| - |")
    text = "\n".join(lines)
    print(text)
    append_results(args.out, "ultralytics", text, {"date": stamp, "card": card, "commit": commit(), "streams": args.streams,
                                                  "rows": [{"side": n, "setting": s, **r} for n, s, r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
