#!/usr/bin/env python3
"""Why fp16 moves YOLOX-Nano's scores, and what fixes it at the source (GPU machine).

Runs letterboxed demo frames through the PyTorch engine's converted module in fp32 (TF32 off)
and in fp16 autocast variants, and prints:

1. variants: the largest score difference from fp32 on anchors that fp32 scores >= 0.25, how
   many differ by more than 0.02, and eager batch-32 ms (launch-bound: not a speed claim);
2. attribution: each of the first convolutions alone in fp16 (all else fp32): the score error it
   causes, its largest |bias| against its output's spread, and how large its pre-bias sums get.
   A convolution whose bias cancels a large sum (BatchNorm folded over inputs with a large mean)
   loses that sum's fp16 rounding error in full;
3. the fix (`engines.torch_engine.recentre_convolutions`): the calibrated input mean is taken out
   of each convolution's input and its effect folded, in fp32, into the bias, so the fp16 sums stay
   small. Exact in real numbers (the bias is a map that includes the zero padding's borders).

    python bench/fp16_precision.py [--frames 320] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CLIP, MODEL, append_results, commit  # noqa: E402
from engines.torch_engine import (TorchEngine, calibration_images, convolutions, fp32_layers,
                                  recentre_convolutions)  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402


def frames(count: int) -> np.ndarray:
    out = np.empty((count, 416, 416, 3), np.uint8)
    with av.open(str(CLIP)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == count:
                break
            letterbox_into(f.to_ndarray(format="bgr24"), out[i], "top-left")
    return out


def scores(module, images: np.ndarray, fp16: bool) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32]).cuda()
            with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                y = module(x).float()
            out.append((y[..., 4:5] * y[..., 5:]).amax(-1).cpu().numpy())
    return np.concatenate(out)


def speed(module, images: np.ndarray, fp16: bool) -> float:
    x = torch.from_numpy(images[:32]).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        for _ in range(3):
            module(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            module(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / 10 * 1000


class _Fp16Only(torch.nn.Module):
    """One convolution in fp16 inside an fp32 model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.float16):
            return self.inner(x).float()


def conv_statistics(module, images: np.ndarray) -> list[dict]:
    """Per convolution (graph order), on fp32: largest |bias|, output std, largest |pre-bias sum|."""
    stats = []
    hooks = []
    for _, conv in convolutions(module):
        def hook(conv, args, output, stats=stats):
            y = output.float()
            b = conv.bias.float().view(1, -1, 1, 1) if conv.bias is not None else 0
            stats.append({"bias_max": float(conv.bias.abs().max()) if conv.bias is not None else 0.0,
                          "out_std": float(y.std()), "prebias_max": float((y - b).abs().max())})
        hooks.append(conv.register_forward_hook(hook))
    with torch.inference_mode():
        module(torch.from_numpy(images[:32]).cuda())
    for h in hooks:
        h.remove()
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--attribute", type=int, default=16, help="convolutions to attribute one by one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    images = frames(args.frames)
    prepared = prepare_model(MODEL, "yolox", want_batch=32)

    def fresh():
        return TorchEngine(prepared, 32, fp16=True, recentre=False).module

    reference = scores(TorchEngine(prepared, 32).module, images, fp16=False)
    mask = reference >= 0.25
    card = torch.cuda.get_device_name()
    lines = [f"## fp16 score error, {card}, {datetime.date.today()}, commit {commit()}",
             "", f"{args.frames} frames of the demo clip; {int(mask.sum())} anchors scored >= 0.25 by fp32 (TF32 off). "
             "batch-32 ms is eager (launch-bound), not a speed claim.", "",
             "| fp16 variant | max abs score diff | > 0.02 | > 0.01 | batch-32 ms |", "| --- | --- | --- | --- | --- |"]
    record = {"date": str(datetime.date.today()), "card": card, "commit": commit(), "frames": args.frames,
              "anchors": int(mask.sum()), "variants": {}, "attribution": []}
    calibration = images[: min(64, len(images))]
    variants = [("all layers fp16", lambda m: None),
                ("first 16 convs fp32 (the old default)", lambda m: fp32_layers(m, 16, 0)),
                ("all fp16, recentred on synthetic images (the engine's default)",
                 lambda m: recentre_convolutions(m, calibration_images(8, 416, 416))),
                ("all fp16, recentred on 64 demo frames", lambda m: recentre_convolutions(m, calibration)),
                ("all fp16, recentred 1x1 convs only", lambda m: recentre_convolutions(m, calibration, only_pointwise=True))]
    for name, apply in variants:
        module = fresh()
        apply(module)
        diff = np.abs(scores(module, images, fp16=True) - reference)[mask]
        ms = speed(module, images, fp16=True)
        lines.append(f"| {name} | {diff.max():.4f} | {(diff > 0.02).sum()} | {(diff > 0.01).sum()} | {ms:.2f} |")
        record["variants"][name] = {"max_diff": float(diff.max()), "over_0.02": int((diff > 0.02).sum()),
                                    "over_0.01": int((diff > 0.01).sum()), "batch32_ms": ms}
        print(lines[-1], flush=True)

    stats = conv_statistics(TorchEngine(prepared, 32).module, images)
    lines += ["", "Attribution: one convolution in fp16, everything else fp32", "",
              "| conv | max abs score diff | > 0.02 | max abs bias | output std | max abs pre-bias sum | pre-bias max / output std |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for index in range(min(args.attribute, len(stats))):
        module = TorchEngine(prepared, 32).module  # fp32
        target = convolutions(module)[index][0]
        owner, _, name = target.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        setattr(parent, name, _Fp16Only(getattr(parent, name)))
        diff = np.abs(scores(module, images, fp16=False) - reference)[mask]
        s = stats[index]
        lines.append(f"| {index} | {diff.max():.4f} | {(diff > 0.02).sum()} | {s['bias_max']:.1f} | {s['out_std']:.2f} | "
                     f"{s['prebias_max']:.1f} | {s['prebias_max'] / max(s['out_std'], 1e-9):.0f} |")
        record["attribution"].append({"conv": index, "max_diff": float(diff.max()), **s})
        print(lines[-1], flush=True)
    markdown = "\n".join(lines)
    print(markdown)
    append_results(args.out, "fp16_precision", markdown, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
