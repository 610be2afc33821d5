#!/usr/bin/env python3
"""Rectangle vs square letterbox on the CPU, all variants in one run on the same frames of the demo
clip (768x432: square 416x416, rectangle 256x416), interleaved rounds, medians:

1. pipeline, `model.letterbox: square`   (the demo's engine settings: 2 lanes x 1 thread, batch <= 4)
2. pipeline, `model.letterbox: rect`
3. ONNX Runtime alone at each size, on frames letterboxed in advance, the pipeline's engine
   shape (batch 4, 2 concurrent calls x 1 thread: its best on 2 cores, bench/results/cpu.md)

Targets (issue 12): rect >= 1.35x square, and >= 90% of ONNX Runtime alone at the rect size.
The pipeline rows also give frames per CPU second of this process (other processes' load moves it
much less than wall-clock fps on a shared machine).
Prints a table and appends it to bench/results/rect_letterbox.md and .jsonl.

    python bench/rect_letterbox.py [--frames 600] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_cpu import clip_prefix, count_frames, engine_alone, machine  # noqa: E402
from bench.common import CLIP, LABELS, MODEL, append_results, commit  # noqa: E402
from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.graph import Pipeline  # noqa: E402
from pipeline.model import prepare_model, rect_shape  # noqa: E402


def pipeline_fps(path: Path, letterbox: str, lanes: int, batch: int, cpu_seconds: list[float]) -> float:
    """Frames a second of the real pipeline from start to end (the model load not counted); appends
    the CPU seconds this process spent meanwhile to `cpu_seconds`."""
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    pipeline = Pipeline(parse_config({
        "cameras": [{"id": "bench", "url": str(path)}],
        "model": {"path": str(MODEL), "preset": "yolox", "labels": str(LABELS), "letterbox": letterbox},
        "engine": {"kind": "onnxruntime", "intra_op_threads": 1, "lanes": lanes, "max_batch": batch, "batch_timeout_ms": 20},
        "publish": {"bind": "tcp://127.0.0.1:0"},
        "runtime": {"status_interval_s": 3600},
    }, "bench.yaml"))
    assert pipeline.model.shape_dynamic == (letterbox == "rect"), "the model did not take the asked letterbox"
    cpu_before, started = time.process_time(), time.perf_counter()
    pipeline.start()
    pipeline.wait()
    elapsed = time.perf_counter() - started
    cpu_seconds.append(time.process_time() - cpu_before)
    pipeline.close()
    return pipeline.publish.metrics.frames_out / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--lanes", type=int, default=2, help="pipeline lanes = ORT concurrent calls, 1 thread each")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    clip = clip_prefix(args.frames, Path(tempfile.mkdtemp()))
    n = count_frames(clip)
    model = prepare_model(MODEL, "yolox", want_batch=args.batch, letterbox="rect")
    engine = OnnxRuntimeEngine(model, args.batch, 1)  # one session, `lanes` calls at once, as the pipeline runs it
    rect = rect_shape((768, 432), model.input_hw, model.stride)
    square = tuple(model.input_hw)
    names = {
        "square": f"pipeline, letterbox square {square[0]}x{square[1]}",
        "rect": f"pipeline, letterbox rect {rect[0]}x{rect[1]}",
        "ort_square": f"ORT alone {square[0]}x{square[1]}, batch {args.batch}, {args.lanes} calls x 1 thread",
        "ort_rect": f"ORT alone {rect[0]}x{rect[1]}, batch {args.batch}, {args.lanes} calls x 1 thread",
    }
    cpu_seconds: dict[str, list[float]] = {"square": [], "rect": []}  # of each pipeline run
    variants = {
        "square": lambda: pipeline_fps(clip, "square", args.lanes, args.batch, cpu_seconds["square"]),
        "rect": lambda: pipeline_fps(clip, "rect", args.lanes, args.batch, cpu_seconds["rect"]),
        "ort_square": lambda: engine_alone(clip, engine, model.preset, square, args.batch, args.lanes),
        "ort_rect": lambda: engine_alone(clip, engine, model.preset, rect, args.batch, args.lanes),
    }
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(args.repeat):  # interleaved: a busy moment hits every variant alike
        for key, run in variants.items():
            runs[key].append(run())
            print(f"  {names[key]}: {runs[key][-1]:.1f} fps", flush=True)
    load_after = os.getloadavg()
    fps = {key: statistics.median(values) for key, values in runs.items()}
    rect_vs_square = fps["rect"] / fps["square"]
    rect_vs_ort = fps["rect"] / fps["ort_rect"]
    per_cpu_s = {key: [n / s for s in values] for key, values in cpu_seconds.items()}  # pipeline frames per CPU second
    cpu_fps = {key: statistics.median(values) for key, values in per_cpu_s.items()}

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared)"
    lines = [f"### {stamp} | {machine()} | commit {commit()} | {n} frames of {CLIP.name} (768x432) | median of {args.repeat} | {load}",
             "", "| variant | fps (median) | runs | vs pipeline square | frames per CPU second |", "| --- | --- | --- | --- | --- |"]
    for key, name in names.items():
        lines.append(f"| {name} | {fps[key]:.1f} | {', '.join(f'{v:.1f}' for v in runs[key])} | {fps[key] / fps['square']:.2f}x | "
                     f"{f'{cpu_fps[key]:.1f}' if key in cpu_fps else '-'} |")
    lines += ["", f"rect / square = **{rect_vs_square:.2f}x** (target >= 1.35x); rect / ORT alone at the rect size = "
              f"**{rect_vs_ort:.0%}** (target >= 90%); ORT alone rect / square = {fps['ort_rect'] / fps['ort_square']:.2f}x; "
              f"pipeline frames per CPU second rect / square = {cpu_fps['rect'] / cpu_fps['square']:.2f}x"]
    print("\n".join(lines))
    if not args.no_save:
        append_results(ROOT / "bench" / "results", "rect_letterbox", "\n".join(lines), {
            "date": stamp, "machine": machine(), "card": None, "commit": commit(), "frames": n, "clip": CLIP.name,
            "lanes": args.lanes, "batch": args.batch, "loadavg_before": load_before, "loadavg_after": load_after,
            "fps_median": {names[k]: v for k, v in fps.items()}, "runs": {names[k]: v for k, v in runs.items()},
            "rect_vs_square": rect_vs_square, "rect_vs_ort_alone_rect": rect_vs_ort,
            "pipeline_frames_per_cpu_s": cpu_fps, "pipeline_frames_per_cpu_s_runs": per_cpu_s,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
