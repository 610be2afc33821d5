#!/usr/bin/env python3
"""The GPU engine alone, variant against variant in one run (GPU machine): eager vs compiled,
fp16 with and without fp32 first convolutions; start-up time, GPU time a frame, lanes throughput, and the
largest score difference from fp32 on the demo clip.

    python bench/engine_variants.py [--batches 32,64] [--out bench/results]
    python bench/engine_variants.py --startup-only --cache-dir DIR   (one compiled start, timed)
    python bench/engine_variants.py --input-shapes 416x416,256x416 --variants "compiled fp16, all layers"
        (GPU time a frame at the square and at the 16:9 rectangle the rect letterbox gives 1080p cameras)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import letterboxed, run_lanes  # noqa: E402
from bench.common import CLIP, MODEL, append_results, commit  # noqa: E402
from engines.torch_engine import TorchEngine  # noqa: E402
from pipeline.lanes import LaneSet  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402

VARIANTS = {  # name: TorchEngine options (CUDA graphs always on)
    "eager fp32": {"fp16": False},
    "eager fp16, first 16 convs fp32 (default)": {"fp16": True},
    "eager fp16, all layers": {"fp16": True, "fp32_first_convs": 0},
    "compiled fp16, first 16 convs fp32": {"fp16": True, "compile": True},
    "compiled fp16, first 3 convs fp32": {"fp16": True, "compile": True, "fp32_first_convs": 3},
    "compiled fp16, all layers": {"fp16": True, "compile": True, "fp32_first_convs": 0},
    "eager fp16_exact": {"fp16": True, "fp16_exact": True},
    "compiled fp16_exact": {"fp16": True, "compile": True, "fp16_exact": True},
    # process-wide PyTorch settings, set for the whole variant (each new set of lanes warms up again and
    # picks the kernels its CUDA graphs capture) and restored after it
    "eager fp16, all layers, cudnn.benchmark": {"fp16": True, "fp32_first_convs": 0, "cudnn_benchmark": True},
    "compiled fp16, all layers, frozen + cudnn.benchmark": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                                             "cudnn_benchmark": True, "freezing": True},
    "compiled fp16, all layers, frozen": {"fp16": True, "compile": True, "fp32_first_convs": 0, "freezing": True},
    # the convolutions' weights and biases stored in fp16 before the warm-up: autocast otherwise casts
    # each of them on every call (236 casts in the compiled graph of YOLOX-Nano, 10 with fp16
    # weights; PyTorch 2.13 CPU autocast), the same rounding, so the outputs are the same
    "eager fp16, all layers, fp16 weights": {"fp16": True, "fp32_first_convs": 0, "fp16_weights": True},
    "compiled fp16, all layers, fp16 weights": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                                "fp16_weights": True},
    "compiled fp16, all layers, fp16 weights + cudnn.benchmark": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                                                  "fp16_weights": True, "cudnn_benchmark": True},
    # engines/torch_speed.py, exact: the stem's 12 input channels padded to 16 for cuDNN's fp16
    # tensor-core kernels, and SPP's 9x9 and 13x13 max pools as chains of 5x5 ones (SPPF)
    "eager fp16, all layers, stem padded + pools cascaded": {"fp16": True, "fp32_first_convs": 0,
                                                             "pad_channels": True, "cascade_pools": True},
    "compiled fp16, all layers, stem padded": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                               "pad_channels": True},
    "compiled fp16, all layers, pools cascaded": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                                  "cascade_pools": True},
    "compiled fp16, all layers, stem padded + pools cascaded": {"fp16": True, "compile": True, "fp32_first_convs": 0,
                                                                "pad_channels": True, "cascade_pools": True},
}


@contextlib.contextmanager
def torch_settings(cudnn_benchmark: bool = False, freezing: bool = False):
    """cudnn.benchmark: cuDNN times its algorithms for each shape on first use instead of picking by
    heuristics; inductor freezing: the weights are constants of the compiled graph, so their fp16
    casts (autocast) and layout changes are folded at compile time instead of running on every call.
    A frozen graph is kept by the compile cache on PyTorch 2.13 (CPU autocast, YOLOX-Nano, checked
    with an empty inductor cache each time): `torch.compiler.save_cache_artifacts()` gives 588 kB
    (1.3 MB unfrozen), and a fresh process that loads them hits inductor's FX graph cache. Not yet
    checked on the GPU machine's PyTorch."""
    import torch
    import torch._inductor.config as inductor_config

    saved = torch.backends.cudnn.benchmark, inductor_config.freezing
    torch.backends.cudnn.benchmark, inductor_config.freezing = cudnn_benchmark, freezing
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, inductor_config.freezing = saved


SETTINGS = ("cudnn_benchmark", "freezing")  # variant options that are process settings, not engine options
BENCH_OPTIONS = SETTINGS + ("fp16_weights", "pad_channels", "cascade_pools")  # the bench applies these, not TorchEngine


def fp16_weights(module) -> int:
    """Store the weights and biases of the convolutions and linear layers, the modules autocast runs
    in fp16, as fp16: what autocast does to them on every call, done once (the same rounding). Not
    an engine option yet; here to measure what those casts cost. Needs every layer in fp16 (an
    fp32 island's convolution must keep fp32 weights). Returns the tensors cast."""
    import torch

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)  # every convolution, transposed too
    cast = 0
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, kinds):
                for tensor in layer.parameters(recurse=False):
                    if tensor.is_floating_point():
                        # Parameter.data = keeps the Parameter and its memory format (channels_last)
                        tensor.data = tensor.data.half()
                        cast += 1
    return cast


def start(prepared, max_batch: int, options: dict, cache_dir: Path, shapes: list[tuple[int, int]] | None = None):
    started = time.perf_counter()
    engine = TorchEngine(prepared, max_batch, cuda_graphs=True, cache_dir=cache_dir,
                         **{k: v for k, v in options.items() if k not in BENCH_OPTIONS})
    if options.get("fp16_weights"):
        if options.get("fp32_first_convs") != 0 or not options.get("fp16"):  # unset: the engine's fp32 islands
            raise SystemExit("fp16_weights needs fp16 in every layer (fp32_first_convs 0)")
        # before LaneSet's warm-up: torch.compile traces the module on its first call there
        print(f"fp16 weights: {fp16_weights(engine.module)} tensors cast", flush=True)
    if options.get("pad_channels") or options.get("cascade_pools"):
        import torch

        from engines.torch_speed import cascade_max_pools, pad_conv_channels

        if options.get("pad_channels"):
            print(f"padded: {pad_conv_channels(engine.module)}", flush=True)
        if options.get("cascade_pools"):
            print(f"pools cascaded: {cascade_max_pools(engine.module)}", flush=True)
        if options.get("compile"):  # the padded weight is new: the compiled engine's layout again
            engine.module = engine.module.to(memory_format=torch.channels_last)
    if shapes:
        engine.warm_shapes = shapes
    lanes = LaneSet(engine, 1)  # warms (compiles, captures) every bucket
    return engine, lanes, time.perf_counter() - started


def kernel_profile(lanes: LaneSet, images: np.ndarray, batch: int, rows: int = 12) -> str:
    """The GPU kernels of one batch (CUDA graph replays included), by GPU time: where the time goes."""
    import torch

    lanes.run_sync(images[:batch])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            lanes.run_sync(images[:batch])
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=rows)


def scores(lanes: LaneSet, images: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        y = lanes.run_sync(images[i : i + batch])[0]
        out.append((y[..., 4:5] * y[..., 5:]).max(-1))
    return np.concatenate(out)


def measure(name: str, prepared, args, cache_dir: Path, images: np.ndarray, shaped: dict, columns: list,
            column) -> tuple[dict, list[str]]:
    """One variant, under its process settings: start it, score the demo frames, write its kernel
    profile (--profile), then GPU time a frame on 1 lane and throughput on 3 at every column.
    Returns its record (with the frames' scores, for the difference from the first variant) and
    its table cells."""
    import torch

    engine, lanes, seconds = start(prepared, args.max_batch, VARIANTS[name], cache_dir, list(shaped))  # its shapes
    result = {"startup_s": seconds, "compiled": getattr(engine, "compiled", False), "scores": scores(lanes, images, 32)}
    if args.profile:
        first = columns[0][0]
        args.profile.mkdir(parents=True, exist_ok=True)
        table = kernel_profile(lanes, images, first)
        (args.profile / f"{name.replace(' ', '_').replace(',', '')}.txt").write_text(table)
        print(f"{name}: kernels of 3 batches of {first}\n{table}", flush=True)
    lanes.close()
    cells = []
    for b, hw in columns:
        _, timings = run_lanes(engine, 1, shaped[hw], b, rounds=3)
        us = statistics.median(t.compute_end - t.h2d_end for t in timings) * 1000 / b
        fps, _ = run_lanes(engine, 3, shaped[hw], b, rounds=3)
        cells += [f"{us:.0f}", f"{fps:.0f}"]
        result[column(b, hw)] = {"gpu_us_per_frame": us, "lanes3_fps": fps}
    engine.close()
    del engine
    torch.cuda.empty_cache()
    return result, cells


def startup_only(args) -> int:
    prepared = prepare_model(MODEL, "yolox", want_batch=args.max_batch)
    engine, lanes, seconds = start(prepared, args.max_batch, {"fp16": True, "compile": True}, args.cache_dir)
    print(json.dumps({"seconds": seconds, "compiled": engine.compiled}))
    return 0


def timed_start(cache_dir: Path, max_batch: int) -> float:
    """A compiled start in a fresh process with an empty inductor cache: only our artifacts help."""
    with tempfile.TemporaryDirectory() as inductor:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor)
        out = subprocess.run([sys.executable, __file__, "--startup-only", "--cache-dir", str(cache_dir),
                              "--max-batch", str(max_batch)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names separated by ;")
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--no-startup", action="store_true",
                        help="skip timing the compiled start-up (two more compiles in fresh processes)")
    parser.add_argument("--input-shapes", default="416x416",
                        help="HxW input shapes to time each variant at (a rectangle needs the shape-dynamic model)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write each variant's GPU kernels at the first batch size (3 batches, by GPU time) here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.startup_only:
        return startup_only(args)
    import torch

    card = torch.cuda.get_device_name()
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.input_shapes.split(",")]
    images = letterboxed(CLIP, args.frames, np.empty)
    shaped = {hw: images if hw == (416, 416) else letterboxed(CLIP, args.frames, np.empty, hw) for hw in shapes}
    prepared = prepare_model(MODEL, "yolox", want_batch=args.max_batch,
                             letterbox="rect" if any(hw != (416, 416) for hw in shapes) else "square")
    many = len(shapes) > 1
    columns = [(b, hw) for hw in shapes for b in batches]

    def column(b: int, hw: tuple[int, int]) -> str:
        return f"b{b} {hw[0]}x{hw[1]}" if many else f"b{b}"
    lines = [f"## Engine alone: YOLOX-Nano 416, {card}, {datetime.date.today()}, commit {commit()}", "",
             "CUDA graphs on; GPU us/frame = median compute time of a batch on 1 lane / batch; lanes fps = 3 lanes "
             "back to back; score diff = largest |score - the first row's| on anchors the first row scores >= 0.25 "
             f"({args.frames} demo frames); start-up = engine + warm-up of every batch bucket up to {args.max_batch}.", "",
             "| variant | start-up s | " + " | ".join(f"GPU us/frame {column(b, hw)} | 3-lane fps {column(b, hw)}"
                                                   for b, hw in columns)
             + " | max score diff | > 0.02 |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in columns) + " | --- | --- |"]
    record = {"date": str(datetime.date.today()), "card": card, "commit": commit(), "variants": {}}
    reference = None
    ratios: list[str] = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.variants.split(";"):
            with torch_settings(**{k: VARIANTS[name][k] for k in SETTINGS if k in VARIANTS[name]}):
                result, cells = measure(name, prepared, args, Path(cache) / name.replace(" ", "_"), images, shaped,
                                        columns, column)
            frame_scores = result.pop("scores")
            if reference is None:  # the first variant is the reference
                reference = frame_scores
            diff = np.abs(frame_scores - reference)[reference >= 0.25]
            result.update(max_diff=float(diff.max()), over_002=int((diff > 0.02).sum()))
            if many:
                base = result[column(batches[0], shapes[0])]["gpu_us_per_frame"]
                result["ratios"] = {column(batches[0], hw): base / result[column(batches[0], hw)]["gpu_us_per_frame"]
                                    for hw in shapes[1:]}
            # a compile that failed ran eagerly (the engine's one warning line): the row must say so
            label = f"{name} (compile failed: eager)" if VARIANTS[name].get("compile") and not result["compiled"] else name
            lines.append(f"| {label} | {result['startup_s']:.1f} | " + " | ".join(cells)
                         + f" | {diff.max():.4f} | {(diff > 0.02).sum()} |")
            print(lines[-1], flush=True)
            for shape, ratio in result.get("ratios", {}).items():
                ratios.append(f"{name}: GPU time a frame {shapes[0][0]}x{shapes[0][1]} / {shape} = **{ratio:.2f}x**")
            record["variants"][name] = result
        # compiled start-up: cold (empty caches) and from our cached artifacts, each in a fresh process
        if any("compiled" in n for n in args.variants.split(";")) and not args.no_startup:
            cache_dir = Path(cache) / "startup"
            cold = timed_start(cache_dir, args.max_batch)
            warm = timed_start(cache_dir, args.max_batch)
            lines += ["", f"Compiled start-up in a fresh process with an empty inductor cache: {cold:.1f} s without "
                      f"cached artifacts, {warm:.1f} s with them (`engine.compile_cache_dir`)."]
            record["startup"] = {"cold_s": cold, "cached_s": warm}
    if ratios:
        lines += [""] + [f"- {r}" for r in ratios]
    markdown = "\n".join(lines)
    print(markdown)
    append_results(args.out, "gpu", markdown, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
