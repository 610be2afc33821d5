#!/usr/bin/env python3
"""CPU benchmark, all variants in one run on the same frames of the demo clip:

1. naive loop   - decode, letterbox, infer, postprocess, one frame at a time, one thread
2. ORT alone    - the engine on frames letterboxed in advance (batch 1 and the pipeline's batch)
3. pipeline     - the real pipeline (threads, batching, publish over ZeroMQ)

Prints a table and appends the numbers (date, machine, commit) to bench/results/cpu.md and .jsonl.

    python bench/bench_cpu.py [--frames 600] [--threads 2] [--batch 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CLIP, LABELS, MODEL, commit, timed_pipeline  # noqa: E402
from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402
from stages.postprocess import detect  # noqa: E402



def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.machine()}"


def clip_prefix(frames: int, out_dir: Path) -> Path:
    """The first `frames` frames of the clip, remuxed without re-encoding (a shorter file)."""
    target = out_dir / "clip.mp4"
    with av.open(str(CLIP)) as src, av.open(str(target), "w") as dst:
        stream_in = src.streams.video[0]
        stream_out = dst.add_stream_from_template(stream_in)
        count = 0
        for packet in src.demux(stream_in):
            if packet.dts is None:
                continue
            if packet.is_keyframe and count >= frames:
                break
            packet.stream = stream_out
            dst.mux(packet)
            count += 1
    return target


def count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def naive_loop(path: Path, engine, preset, hw) -> float:
    slot = np.empty((1, hw[0], hw[1], 3), np.uint8)
    start = time.perf_counter()
    n = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="bgr24")
            geo = letterbox_into(image, slot[0], preset.align, preset.pad_value)
            out = engine.infer(slot)[0]
            detect(out[0], preset.layout, hw, geo, (image.shape[1], image.shape[0]), 0.3, 0.45, 300)
            n += 1
    return n / (time.perf_counter() - start)


def engine_alone(path: Path, engine, preset, hw, batch: int, concurrent: int = 1) -> float:
    images = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            slot = np.empty((hw[0], hw[1], 3), np.uint8)
            letterbox_into(frame.to_ndarray(format="bgr24"), slot, preset.align, preset.pad_value)
            images.append(slot)
    stacked = np.stack(images)
    engine.infer(stacked[:batch])  # warm-up
    chunks = [stacked[i : i + batch] for i in range(0, len(stacked), batch)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:  # `concurrent` calls in flight on one session
        list(pool.map(engine.infer, chunks))
    return len(stacked) / (time.perf_counter() - start)


def pipeline_run(path: Path, threads: int, batch: int, spin: bool, color_conversion: str = "swscale", lanes: int = 1) -> float:
    fps, _ = timed_pipeline({
        "cameras": [{"id": "bench", "url": str(path), "color_conversion": color_conversion}],
        "model": {"path": str(MODEL), "preset": "yolox", "labels": str(LABELS)},
        "engine": {"kind": "onnxruntime", "intra_op_threads": threads, "lanes": lanes, "max_batch": batch,
                   "batch_timeout_ms": 20, "spin": spin},
        "runtime": {"status_interval_s": 3600},
    })
    return fps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (all variants)")
    parser.add_argument("--batch", type=int, default=4, help="the pipeline's max_batch")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each round runs every variant once; medians reported")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads busy-wait (its default) in all variants")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    clip = clip_prefix(args.frames, tmp)
    n = count_frames(clip)
    prepared1 = prepare_model(MODEL, "yolox", want_batch=1)
    preparedn = prepare_model(MODEL, "yolox", want_batch=args.batch)
    engine1 = OnnxRuntimeEngine(prepared1, 1, args.threads, spin=args.spin)
    enginen = OnnxRuntimeEngine(preparedn, args.batch, args.threads, spin=args.spin)
    preset, hw = prepared1.preset, prepared1.input_hw

    engine_lane = OnnxRuntimeEngine(preparedn, args.batch, 1, spin=args.spin)  # one thread per concurrent call
    lanes = args.threads  # as many single-threaded lanes as the threads the others use
    pipe = f"pipeline ({lanes} lanes x 1 thread, batch <= {args.batch})"
    fast = f"pipeline ({lanes} lanes x 1 thread, batch <= {args.batch}), opencv colour conversion"
    variants = {
        f"naive loop (batch 1, {args.threads} threads)": lambda: naive_loop(clip, engine1, preset, hw),
        f"ORT alone, batch 1, {args.threads} threads": lambda: engine_alone(clip, engine1, preset, hw, 1),
        f"ORT alone, batch {args.batch}, {args.threads} threads": lambda: engine_alone(clip, enginen, preset, hw, args.batch),
        f"ORT alone, batch {args.batch}, {lanes} concurrent calls x 1 thread": lambda: engine_alone(clip, engine_lane, preset, hw,
                                                                                                    args.batch, lanes),
        f"pipeline (1 lane x {args.threads} threads, batch <= {args.batch})": lambda: pipeline_run(clip, args.threads, args.batch,
                                                                                                   args.spin),
        pipe: lambda: pipeline_run(clip, 1, args.batch, args.spin, lanes=lanes),
        fast: lambda: pipeline_run(clip, 1, args.batch, args.spin, "opencv", lanes=lanes),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeat):  # interleaved rounds: drift on a noisy machine hits every variant alike
        for name, fn in variants.items():
            results[name].append(fn())
    fps = {name: statistics.median(v) for name, v in results.items()}
    naive = fps[f"naive loop (batch 1, {args.threads} threads)"]
    best_ort = max(v for k, v in fps.items() if k.startswith("ORT alone"))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{stamp} | {machine()} | commit {commit()} | {n} frames of {CLIP.name} | ORT threads {args.threads}, spinning {'on' if args.spin else 'off'} | median of {args.repeat}"
    lines = [header, "", "| variant | fps (median) | runs | vs naive | vs best ORT alone |", "| --- | --- | --- | --- | --- |"]
    for name, value in fps.items():
        runs = ", ".join(f"{v:.1f}" for v in results[name])
        lines.append(f"| {name} | {value:.1f} | {runs} | {value / naive:.2f}x | {value / best_ort:.0%} |")
    lines.append("")
    lines.append(f"default pipeline / naive = {fps[pipe] / naive:.2f}x (target >= 1.4x); / best ORT alone = "
                 f"{fps[pipe] / best_ort:.0%} (target >= 90%); with opencv colour conversion: {fps[fast] / naive:.2f}x and "
                 f"{fps[fast] / best_ort:.0%}")
    print("\n".join(lines))
    if not args.no_save:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "cpu.md", "a", encoding="utf-8") as f:
            f.write("\n### " + "\n".join(lines) + "\n")
        with open(out / "cpu.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"date": stamp, "machine": machine(), "commit": commit(), "frames": n, "threads": args.threads,
                                "batch": args.batch, "fps_median": fps, "runs": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
