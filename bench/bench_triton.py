#!/usr/bin/env python3
"""Triton engine benchmark, every variant in one run, against a local Triton server (PyTriton's
tritonserver from .venv-triton, serving what `run.py export-triton` writes; ONNX Runtime inside):

1. engine alone  - letterboxed batches of the demo clip, 2 lanes in flight: the onnxruntime engine
                   in-process, the triton engine with system shared memory, and without it
2. pipeline      - the real pipeline on the same clip with engine.kind onnxruntime, then triton
3. overhead      - per request, microseconds: a null model (uint8 batch in, zeros of the real output
                   shape out) served the same way, one request at a time, batch 1 and 4, with and
                   without shared memory; what Triton, gRPC and the copies add to any model

The target (issue 15): the triton engine's pipeline >= 80% of the onnxruntime engine's fps.
Prints a table and appends it (date, machine, commit) to bench/results/triton.md and .jsonl.

    python bench/bench_triton.py [--frames 300] [--repeat 3] [--requests 50]
"""

from __future__ import annotations

import argparse
import datetime
import os
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench.bench_cpu import clip_prefix, machine  # noqa: E402
from bench.common import CLIP, MODEL, append_results, commit, timed_pipeline  # noqa: E402
from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from engines.triton_engine import TritonEngine  # noqa: E402
from engines.triton_repository import write_repository  # noqa: E402
from pipeline.config import TritonConfig  # noqa: E402
from pipeline.model import INPUT_NAME, PreparedModel, prepare_model  # noqa: E402
from pytriton_server import PyTritonServer  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402

TOKEN = "bench-token"
HEADERS = {"triton-grpc-protocol-triton-access-token": TOKEN}
BATCH, LANES = 4, 2


def null_model(like: PreparedModel) -> PreparedModel:
    """uint8 [N, H, W, 3] in, float32 zeros of the real model's output shape out: no compute, the same bytes."""
    import onnx
    from onnx import TensorProto, helper

    rows, values = 3549, 85
    h, w = like.input_hw
    nodes = [
        helper.make_node("Shape", [INPUT_NAME], ["shape"], end=1),
        helper.make_node("Concat", ["shape", "tail"], ["out_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["out_shape"], ["output"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
    ]
    graph = helper.make_graph(nodes, "null", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", h, w, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", rows, values])],
                              [onnx.numpy_helper.from_array(np.array([rows, values], np.int64), "tail")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    return PreparedModel(data, INPUT_NAME, like.input_hw, ["output"], like.num_classes, True, like.preset, "null")


def letterboxed(clip: Path, model: PreparedModel, frames: int) -> np.ndarray:
    h, w = model.input_hw
    out = np.empty((frames, h, w, 3), np.uint8)
    n = 0
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            if n >= frames:
                break
            letterbox_into(frame.to_ndarray(format="bgr24"), out[n], model.preset.align, model.preset.pad_value)
            n += 1
    return out[:n]


def engine_fps(engine, images: np.ndarray) -> float:
    """Batches of BATCH, LANES in flight (as the infer stage runs them)."""
    batches = [images[i : i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
    with ThreadPoolExecutor(LANES) as pool:
        started = time.perf_counter()
        list(pool.map(engine.infer, batches))
        return len(batches) * BATCH / (time.perf_counter() - started)


def request_us(engine, images: np.ndarray, requests: int) -> float:
    engine.infer(images)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        engine.infer(images)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each runs every variant once; medians reported")
    parser.add_argument("--requests", type=int, default=50, help="requests per overhead measurement")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    reason = PyTritonServer.unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    clip = clip_prefix(args.frames, tmp)
    model = prepare_model(MODEL, "yolox", BATCH)
    write_repository(model, tmp / "models", "yolox_nano", BATCH, LANES)
    write_repository(null_model(model), tmp / "models", "null", BATCH, LANES)
    server = PyTritonServer(tmp / "models", ["yolox_nano", "null"], tmp / "server", token=TOKEN).start_retrying()
    load_before = os.getloadavg()
    try:
        triton = {"url": server.url, "headers": HEADERS}
        images = letterboxed(clip, model, args.frames)
        ort_engine = OnnxRuntimeEngine(model, BATCH, intra_op_threads=1)
        shm = TritonEngine(TritonConfig(**triton, shared_memory="system"), model, "yolox_nano", BATCH, LANES)
        plain = TritonEngine(TritonConfig(**triton, shared_memory="none"), model, "yolox_nano", BATCH, LANES)
        slots = shm.host_allocator(images.shape, np.uint8)  # as the pipeline's host slots: letterboxed into shared memory
        slots[...] = images
        base = {"cameras": [{"id": "bench", "url": str(clip)}], "model": {"path": str(MODEL), "preset": "yolox"},
                "engine": {"max_batch": BATCH, "lanes": LANES, "intra_op_threads": 1, "batch_timeout_ms": 20}}

        def pipeline(kind: str) -> float:
            engine = {**base["engine"], "kind": kind, **({"triton": {**triton, "shared_memory": "system"}} if kind == "triton" else {})}
            fps, run = timed_pipeline({**base, "engine": engine})
            run.close()
            return fps

        variants = {
            "engine alone: onnxruntime (in-process)": lambda: engine_fps(ort_engine, images),
            "engine alone: triton, system shared memory": lambda: engine_fps(shm, slots),
            "engine alone: triton, tensors in the request": lambda: engine_fps(plain, images),
            "pipeline: onnxruntime": lambda: pipeline("onnxruntime"),
            "pipeline: triton, system shared memory": lambda: pipeline("triton"),
        }
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved: drift on a busy machine hits every variant alike
            for name, run in variants.items():
                runs[name].append(run())
        fps = {name: statistics.median(values) for name, values in runs.items()}

        null = null_model(model)
        overhead = {}
        for label, mode in (("system shared memory", "system"), ("tensors in the request", "none")):
            engine = TritonEngine(TritonConfig(**triton, shared_memory=mode), null, "null", BATCH, 1)
            for batch in (1, BATCH):
                data = engine.host_allocator((batch, *model.input_hw, 3), np.uint8) if mode == "system" else \
                    np.zeros((batch, *model.input_hw, 3), np.uint8)
                overhead[f"{label}, batch {batch}"] = request_us(engine, data, args.requests)
            engine.close()
        for engine in (shm, plain):
            engine.close()
    finally:
        server.stop()
    load_after = os.getloadavg()

    ratio = fps["pipeline: triton, system shared memory"] / fps["pipeline: onnxruntime"]
    engine_ratio = fps["engine alone: triton, system shared memory"] / fps["engine alone: onnxruntime (in-process)"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    frames = len(images)
    lines = [f"### {stamp} | {machine()} | commit {commit()} | {frames} frames of {CLIP.name} | batch {BATCH}, "
             f"{LANES} lanes x 1 thread (server: {LANES} instances x 1 thread) | median of {args.repeat} | "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after", "",
             "| variant | fps (median) | runs | vs onnxruntime |", "| --- | --- | --- | --- |"]
    for name, value in fps.items():
        ref = fps["pipeline: onnxruntime"] if name.startswith("pipeline") else fps["engine alone: onnxruntime (in-process)"]
        lines.append(f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in runs[name])} | {value / ref:.0%} |")
    lines += ["", "| per-request overhead (null model, one request at a time) | median µs |", "| --- | --- |"]
    lines += [f"| {name} | {value:.0f} |" for name, value in overhead.items()]
    lines += ["", f"triton pipeline / onnxruntime pipeline = {ratio:.0%} (target >= 80%); engine alone: {engine_ratio:.0%}"]
    print("\n".join(lines))
    if not args.no_save:
        append_results(ROOT / "bench" / "results", "triton", "\n".join(lines), {
            "date": stamp, "machine": machine(), "commit": commit(), "frames": frames, "batch": BATCH, "lanes": LANES,
            "fps_median": fps, "runs": runs, "overhead_us": overhead, "pipeline_ratio": ratio, "engine_ratio": engine_ratio,
            "load_average": {"before": load_before, "after": load_after}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
