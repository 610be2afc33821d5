#!/usr/bin/env python3
"""fp16 autocast emulated on the CPU, to study YOLOX-Nano's fp16 score error without a GPU.

Autocast stores every activation in fp16 and runs convolutions on fp16 inputs and weights with
fp32 accumulation (cuDNN). The emulation does the same in fp32 arithmetic: every floating tensor a
torch op returns is rounded to fp16 and back, and a convolution's input, weight and bias are
rounded before it runs; its output is rounded. Early bias: the sum and bias add stay fp32; late
bias (as PyTorch does on the GPU): the sum is rounded before the fp16 bias is added. It is checked
against the GPU's numbers (bench/results/fp16_precision.md) before any variant is judged by it.

    python bench/fp16_emulate.py [--frames 320] [--attribute 10] [--emulation early|late|both] [--variants all|new]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import MODEL, append_results, commit  # noqa: E402
from bench.fp16_precision import frames  # noqa: E402
from engines.torch_fp16 import SPLIT_CONVS, calibration_images, centre_pixels, shift_activations, split_weights  # noqa: E402
from engines.torch_engine import _inline_identity_initializers, convolutions  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402


def cpu_module(prepared):
    """The torch engine's converted module (fp32), on the CPU."""
    import onnx
    from onnx2torch import convert

    proto = onnx.load_model_from_string(prepared.onnx_bytes)
    _inline_identity_initializers(proto)
    return convert(proto).eval()


def _half(value):
    import torch

    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.half().float()
    if isinstance(value, (list, tuple)):
        return type(value)(_half(v) for v in value)
    return value


def fp16_mode(only_weights: set[int] | None = None, late_bias: bool = False):
    """A TorchFunctionMode that emulates autocast fp16: all ops (only_weights None) or only the
    convolutions whose weight tensor's id is in `only_weights` (one layer in fp16, the rest fp32).

    late_bias: the convolution's sum is rounded to fp16 before its (fp16) bias is added, as PyTorch
    does on the GPU (eager: cuDNN without bias, then an fp16 add; inductor peels the bias off the
    same way). It matches the GPU rows better than adding the bias in fp32 (conv 2 alone: 0.1200 /
    28 anchors > 0.02 against the GPU's 0.1183 / 29; early bias 0.0914 / 25)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    convs = {F.conv2d, torch.conv2d}

    class Fp16(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in convs:
                if only_weights is not None and id(args[1]) not in only_weights:
                    return func(*args, **kwargs)
                args, kwargs = _half(tuple(args)), {k: _half(v) for k, v in kwargs.items()}
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if late_bias and bias is not None:
                    args = (*args[:2], None, *args[3:]) if len(args) > 2 else args
                    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
                    return _half(_half(func(*args, **kwargs)) + bias.view(1, -1, 1, 1))
                return _half(func(*args, **kwargs))
            out = func(*args, **kwargs)
            return out if only_weights is not None else _half(out)

    return Fp16()


def scores(module, images: np.ndarray, mode=None, batch: int = 16) -> np.ndarray:
    """Per anchor: objectness x best class score, as fp16_precision.py scores them."""
    import contextlib

    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))
            with mode if mode is not None else contextlib.nullcontext():
                y = module(x)
            y = y.float()
            out.append((y[..., 4:5] * y[..., 5:]).amax(-1).numpy())
    return np.concatenate(out)


def conv_macs(module, image: np.ndarray) -> np.ndarray:
    """Multiply-adds of each convolution (graph order) for one image of this size."""
    import torch

    macs = []
    hooks = [conv.register_forward_hook(lambda c, a, y: macs.append(
        y[0].numel() * c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1]))
        for _, conv in convolutions(module)]
    try:
        with torch.no_grad():
            module(torch.from_numpy(np.ascontiguousarray(image)))
    finally:
        for hook in hooks:
            hook.remove()
    return np.array(macs, dtype=np.int64)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--attribute", type=int, default=10, help="convolutions to attribute one by one")
    parser.add_argument("--emulation", choices=["early", "late", "both"], default="both",
                        help="bias added in fp32 before rounding (early) or to the rounded sum (late, as on the GPU)")
    parser.add_argument("--variants", default="all", help="'new': only the rewrites added in the second step")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    images = frames(args.frames)
    prepared = prepare_model(MODEL, "yolox", want_batch=32)
    module = cpu_module(prepared)
    started = time.perf_counter()
    reference = scores(module, images)
    mask = reference >= 0.25
    rows = []

    def row(name, values):
        diff = np.abs(values - reference)[mask]
        rows.append((name, float(diff.max()), int((diff > 0.02).sum()), int((diff > 0.01).sum())))
        print(f"| {name} | {rows[-1][1]:.4f} | {rows[-1][2]} | {rows[-1][3]} |", flush=True)

    modes = {"early": [False], "late": [True], "both": [False, True]}[args.emulation]
    label = {False: "emulated, early bias", True: "emulated, late bias"}
    macs = conv_macs(module, images[:1])
    for late in modes if args.variants == "all" else []:
        row(f"all layers fp16 ({label[late]})", scores(module, images, fp16_mode(late_bias=late)))
        for index, (_, conv) in enumerate(convolutions(module)[: args.attribute]):
            row(f"conv {index} alone fp16 ({label[late]})",
                scores(module, images, fp16_mode({id(conv.weight)}, late_bias=late)))
    calibration = calibration_images(8, 416, 416)  # synthetic: the demo frames only judge
    fp32_drift = []
    variants = [("shift", lambda m: shift_activations(m, calibration)),
                ("centre pixels (no split) + shift",
                 lambda m: (centre_pixels(m, split_weights=False), shift_activations(m, calibration))),
                ("centre pixels, split conv-0 weights + shift",
                 lambda m: (centre_pixels(m), shift_activations(m, calibration)))]
    variants = variants[2:] if args.variants == "new" else variants
    variants += [("centre pixels, split conv-0 weights + shift, other channels centred",
                  lambda m: (centre_pixels(m), shift_activations(m, calibration, centre_rest=True))),
                 (f"as above + split weights of convs 1-9 (+{macs[list(SPLIT_CONVS)].sum() / macs.sum():.1%} "
                  "multiply-adds): engine.fp16_exact",
                  lambda m: (centre_pixels(m), shift_activations(m, calibration, centre_rest=True),
                             split_weights(m, SPLIT_CONVS)))]
    for name, apply in variants:
        rewritten = cpu_module(prepared)
        changed = apply(rewritten)
        fp32_drift.append(float(np.abs(scores(rewritten, images[:32]) - reference[:32]).max()))
        for late in modes:
            row(f"all fp16, {name} {changed} ({label[late]})", scores(rewritten, images, fp16_mode(late_bias=late)))
    seconds = time.perf_counter() - started
    lines = [f"## fp16 emulated on the CPU, {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
             f"{datetime.date.today()}, commit {commit()}", "",
             f"{args.frames} frames of the demo clip; {int(mask.sum())} anchors scored >= 0.25 by fp32 (CPU). "
             f"Load average at the end: {load_average()}; {seconds:.0f} s. Rewritten modules in fp32 move scores "
             f"by at most {max(fp32_drift):.1e} (32 frames). Shift: (convolutions, channels).", "",
             "| variant | max abs score diff | > 0.02 | > 0.01 |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {m:.4f} | {a} | {b} |" for n, m, a, b in rows]
    markdown = "\n".join(lines)
    print(markdown)
    append_results(args.out, "fp16_precision", markdown,
                   {"date": str(datetime.date.today()), "machine": "cpu-emulation", "commit": commit(),
                    "frames": args.frames, "anchors": int(mask.sum()), "load": load_average(),
                    "rows": [{"variant": n, "max_diff": m, "over_0.02": a, "over_0.01": b} for n, m, a, b in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
