#!/usr/bin/env python3
"""GPU data-path benchmark (run on the GPU machine), all parts in one run:

1. transfers: one batch host-to-device, pinned vs pageable, uint8 NHWC vs float32 NCHW
2. overlap:   K = 1..4 lanes; per batch, wall time (H2D start -> D2H end) vs the sum of its parts,
              and a CUDA-event timeline showing one batch's copies overlapping another's compute
3. 1080p:     a 1080p clip made from the demo clip; batch 1, 8, 32: engine alone (lanes on
              pre-letterboxed pinned slots) vs the whole pipeline (decode -> publish)

Prints tables; writes markdown and JSON to --out (default bench/results), with date, card, commit.
    python bench/bench_gpu.py [--engine torch] [--fp16] [--graphs] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CLIP, MODEL, append_results, commit, timed_pipeline  # noqa: E402
from engines import create_engine  # noqa: E402
from pipeline import cuda  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from pipeline.lanes import LaneSet  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402



def transfers(report: list[str], data: dict) -> None:
    rt = cuda._rt()
    stream = cuda.Stream()
    batch = 32
    pinned = cuda.PinnedAllocator()
    cases = {
        "uint8 NHWC, pinned": pinned((batch, 416, 416, 3), np.uint8),
        "uint8 NHWC, pageable": np.ones((batch, 416, 416, 3), np.uint8),
        "float32 NCHW, pinned": pinned((batch, 3, 416, 416), np.float32),
        "float32 NCHW, pageable": np.ones((batch, 3, 416, 416), np.float32),
    }
    device = cuda.DeviceBuffer(max(a.nbytes for a in cases.values()))
    start, end = cuda.Event(), cuda.Event()
    report += ["", f"## Host-to-device copy of one batch of {batch} (416x416), median of 20", "",
               "| what | MB | ms | GB/s | vs uint8 pinned |", "| --- | --- | --- | --- | --- |"]
    times = {}
    for name, array in cases.items():
        array.fill(1)
        samples = []
        for i in range(23):
            start.record(stream)
            cuda.copy_to_device(device.ptr, array, array.nbytes, stream)
            end.record(stream)
            end.synchronize()
            if i >= 3:
                samples.append(end.since(start))
        times[name] = (array.nbytes, statistics.median(samples))
    base = times["uint8 NHWC, pinned"][1]
    for name, (nbytes, ms) in times.items():
        report.append(f"| {name} | {nbytes / 1e6:.1f} | {ms:.3f} | {nbytes / ms / 1e6:.1f} | {ms / base:.1f}x |")
        data.setdefault("transfers", {})[name] = {"bytes": nbytes, "ms": ms}
    device.free()
    pinned.free()
    del rt


def letterboxed(path: Path, count: int, allocator, hw: tuple[int, int] = (416, 416)) -> np.ndarray:
    frames = allocator((count, *hw, 3), np.uint8)
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == count:
                break
            letterbox_into(frame.to_ndarray(format="bgr24"), frames[i], "top-left")
    return frames


def run_lanes(engine, lanes: int, frames: np.ndarray, batch: int, rounds: int):
    lane_set = LaneSet(engine, lanes)
    chunks = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    timings = []
    for warm in (True, False):
        work = chunks[: lanes * 2] if warm else chunks * rounds
        pending = list(work)
        started = time.perf_counter()
        while pending or lane_set.in_flight:
            while pending and lane_set.submit(pending[0], timeout=0):
                pending.pop(0)
            _, _, timing, release = lane_set.complete()
            release()
            if not warm:
                timings.append(timing)
        elapsed = time.perf_counter() - started
    lane_set.close()
    return len(work) * batch / elapsed, timings


def overlap(engine_config: EngineConfig, frames: np.ndarray, report: list[str], data: dict, batch: int) -> None:
    prepared = prepare_model(MODEL, "yolox", want_batch=batch)
    engine = create_engine(engine_config.model_copy(update={"max_batch": batch}), prepared)
    report += ["", f"## Overlap: lanes (stream + context each), batch {batch}, engine {engine.name}", "",
               "| lanes | fps | median wall ms/batch | median sum of parts ms | wall / sum | batches with a copy overlapping another's compute |",
               "| --- | --- | --- | --- | --- | --- |"]
    for lanes in (1, 2, 3, 4):
        fps, timings = run_lanes(engine, lanes, frames, batch, rounds=4)
        walls = [t.wall for t in timings]
        sums = [sum(t.parts) for t in timings]
        overlapped = 0
        for t in timings:  # does this batch's H2D or D2H run while another batch computes?
            copies = [(t.h2d_start, t.h2d_end), (t.compute_end, t.d2h_end)]
            if any(o is not t and a < o.compute_end and b > o.h2d_end for o in timings for a, b in copies):
                overlapped += 1
        report.append(f"| {lanes} | {fps:.0f} | {statistics.median(walls):.2f} | {statistics.median(sums):.2f} | "
                      f"{statistics.median(walls) / statistics.median(sums):.2f} | {overlapped}/{len(timings)} |")
        data.setdefault("overlap", {})[lanes] = {"fps": fps, "timeline": [t.__dict__ | {"parts": t.parts} for t in timings[:24]]}
        if lanes in (1, 3):
            report += ["", f"Timeline, {lanes} lane(s), first 6 batches (ms from the first H2D: [h2d | compute | d2h])", "```"]
            t0 = timings[0].h2d_start
            for t in timings[:6]:
                report.append(f"lane {t.lane} batch {t.batch:2d}: h2d {t.h2d_start - t0:7.3f}-{t.h2d_end - t0:7.3f} | "
                              f"compute {t.h2d_end - t0:7.3f}-{t.compute_end - t0:7.3f} | d2h {t.compute_end - t0:7.3f}-{t.d2h_end - t0:7.3f}")
            report += ["```", ""]
    engine.close()


def make_1080p(out: Path, frames: int) -> Path:
    target = out / "clip1080.mp4"
    with av.open(str(CLIP)) as src, av.open(str(target), "w") as dst:
        stream = dst.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i, frame in enumerate(src.decode(video=0)):
            if i == frames:
                break
            big = frame.reformat(width=1920, height=1080, format="yuv420p")
            big.pts = None
            for packet in stream.encode(big):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return target


def pipeline_fps(clip: Path, cameras: int, engine: dict, letterbox_threads: int = 1) -> tuple[float, dict]:
    fps, pipeline = timed_pipeline({
        "cameras": [{"id": f"cam{i}", "url": str(clip), "decode_threads": 2, "color_conversion": "opencv"}
                    for i in range(cameras)],
        "model": {"path": str(MODEL), "preset": "yolox"},
        "engine": engine,
        "runtime": {"status_interval_s": 3600, "host_slots": max(4, engine["lanes"] + 3), "queue_size": 8,
                    "letterbox_threads": letterbox_threads},
    })
    summary = pipeline.snapshot()
    pipeline.close()
    return fps, {k: v.get("latency_ms_p50") for k, v in summary["stages"].items()}


def throughput_1080p(engine_config: EngineConfig, report: list[str], data: dict, cameras: int, clip_frames: int,
                     keep_clip: Path | None = None) -> None:
    tmp = Path(tempfile.mkdtemp())
    clip = make_1080p(tmp, clip_frames)
    if keep_clip is not None:
        shutil.copyfile(clip, keep_clip)
    pinned = cuda.PinnedAllocator()
    frames = letterboxed(clip, clip_frames, pinned)
    report += ["", f"## 1080p: engine alone vs the whole pipeline ({cameras} cameras x {clip_frames} frames of 1080p30 H.264, CPU decode)", "",
               "| batch | lanes | engine alone fps | pipeline fps | pipeline / engine alone | pipeline fps, 4 letterbox threads | stage p50 ms |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
    for batch in (1, 8, 32):
        lanes = engine_config.lanes
        prepared = prepare_model(MODEL, "yolox", want_batch=batch)
        engine = create_engine(engine_config.model_copy(update={"max_batch": batch}), prepared)
        alone, _ = run_lanes(engine, lanes, frames, batch, rounds=max(1, 2048 // clip_frames))
        engine.close()
        full, stages = pipeline_fps(clip, cameras, {**engine_config.model_dump(mode="json"), "max_batch": batch,
                                                    "batch_timeout_ms": 5})
        fast_switch, _ = pipeline_fps(clip, cameras, {**engine_config.model_dump(mode="json"), "max_batch": batch,
                                                      "batch_timeout_ms": 5}, letterbox_threads=4)
        sources = [v for k, v in stages.items() if k.startswith("source.") and v is not None]
        stage_text = ", ".join(f"{k}={v:.2f}" for k, v in stages.items() if v is not None and not k.startswith("source."))
        if sources:
            stage_text += f", source (median over cameras)={statistics.median(sources):.2f}"
        report.append(f"| {batch} | {lanes} | {alone:.0f} | {full:.0f} | {full / alone:.0%} | {fast_switch:.0f} | {stage_text} |")
        data.setdefault("1080p", {})[batch] = {"engine_alone_fps": alone, "pipeline_fps": full, "stages_p50_ms": stages,
                                               "pipeline_fps_4_letterbox_threads": fast_switch}
    pinned.free()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="torch", choices=["torch", "tensorrt"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="torch: CUDA graphs")
    parser.add_argument("--lanes", type=int, default=3, help="lanes for the 1080p part")
    parser.add_argument("--cameras", type=int, default=8, help="1080p cameras in the pipeline part")
    parser.add_argument("--clip-frames", type=int, default=240)
    parser.add_argument("--parts", default="transfers,overlap,1080p")
    parser.add_argument("--keep-clip", type=Path, help="also write the 1080p clip here (for bench/decode_scaling.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine_config = EngineConfig(kind=args.engine, fp16=args.fp16, cuda_graphs=args.graphs, lanes=args.lanes)
    card = cuda.device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"{stamp} | {card} | {os.cpu_count()} CPU cores | commit {commit()} | engine {args.engine}"
             f"{' fp16' if args.fp16 else ' fp32'}{' + CUDA graphs' if args.graphs else ''}")
    report, data = [f"# {title}"], {"date": stamp, "card": card, "commit": commit(), "engine": engine_config.model_dump(mode="json")}
    parts = set(args.parts.split(","))
    if "transfers" in parts:
        transfers(report, data)
    if "overlap" in parts:
        pinned = cuda.PinnedAllocator()
        frames = letterboxed(CLIP, 256, pinned)
        overlap(engine_config, frames, report, data, batch=8)
        pinned.free()
    if "1080p" in parts:
        throughput_1080p(engine_config, report, data, args.cameras, args.clip_frames, args.keep_clip)
    text = "\n".join(report)
    print(text)
    append_results(args.out, "gpu", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
