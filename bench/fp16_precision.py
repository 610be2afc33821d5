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
3. a candidate fix that does NOT work in eager mode (kept as the measurement that shows it):
   recentring, the calibrated input mean taken out of each convolution's input and folded, in
   fp32, into a bias map (exact in real numbers). The error comes from fp16's rounding of the
   large, nearly constant input channels when the previous layer writes them, which recentring
   after the write cannot undo;
4. the fix at the write (engines/torch_fp16.py): activations stored minus a per-channel constant
   (folded exactly into the biases), the raw pixels centred on 128, conv 0's weights split into two
   fp16 halves. bench/fp16_emulate.py measures it on the CPU by emulating fp16.

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
from engines.torch_fp16 import calibration_images, centre_pixels, make_fp16_exact, shift_activations  # noqa: E402
from engines.torch_engine import TorchEngine, _replace, convolutions, fp32_layers  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402


def recentre_convolutions(module, images: np.ndarray, only_pointwise: bool = False) -> int:
    """Make every convolution's fp16 sums small, exactly: conv(x) + b = conv(x - m) + B.

    YOLOX's BatchNorm was folded over inputs with large means (raw 0-255 pixels first, then
    positive SiLU outputs), so the folded bias cancels a large pre-bias sum, and in fp16 that sum's
    rounding error (not the small result) is what the next layer sees. `m` is each input channel's
    mean over `images` (fp32 run); B = conv(m everywhere, zero padding) + b is computed in fp32 once,
    a per-pixel map so that the padded borders stay exact. Weights are also scaled by a power of
    two towards 1 (the input divided by the same), which keeps raw-pixel weights out of fp16's
    subnormal range. Returns how many convolutions were changed.
    """
    import torch
    import torch.nn.functional as F

    class Recentred(torch.nn.Module):
        def __init__(self, conv, mean, hw):
            super().__init__()
            self.conv = conv
            scale = 2.0 ** -round(float(np.log2(max(conv.weight.detach().abs().max().item(), 1e-30))))
            self.register_buffer("weight", conv.weight.detach() * scale)
            self.register_buffer("input_mean", mean.view(1, -1, 1, 1))
            self.register_buffer("input_mean_half", mean.view(1, -1, 1, 1).half())
            self.inv_scale = 1.0 / scale
            self.hw = hw
            bias_map = self._bias_map(hw)
            self.register_buffer("bias_map", bias_map)
            self.register_buffer("bias_map_half", bias_map.half())

        def _bias_map(self, hw):
            c = self.conv
            with torch.autocast("cuda", enabled=False):
                constant = self.input_mean.float().expand(1, -1, *hw)
                out = F.conv2d(constant, c.weight.float(), None, c.stride, c.padding, c.dilation, c.groups)
                return out + (c.bias.float().view(1, -1, 1, 1) if c.bias is not None else 0)

        def forward(self, x):
            c = self.conv
            mean = self.input_mean_half if x.dtype == torch.float16 else self.input_mean
            centred = (x - mean) * self.inv_scale
            y = F.conv2d(centred, self.weight, None, c.stride, c.padding, c.dilation, c.groups)
            if tuple(x.shape[-2:]) == self.hw:
                return y + (self.bias_map_half if y.dtype == torch.float16 else self.bias_map)
            return y + self._bias_map(tuple(x.shape[-2:])).to(y.dtype)  # another size: computed per call

    convs = convolutions(module)
    if only_pointwise:
        convs = [(t, c) for t, c in convs if c.kernel_size == (1, 1)]
    inputs: dict[str, list] = {}
    hooks = []
    for target, conv in convs:
        def hook(conv, args, target=target):
            x = args[0].float()
            inputs.setdefault(target, []).append((x.mean(dim=(0, 2, 3)), tuple(x.shape[-2:])))
        hooks.append(conv.register_forward_pre_hook(hook))
    device = next(module.parameters()).device
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cuda", enabled=False):
        for i in range(0, len(images), 8):
            module(torch.from_numpy(np.ascontiguousarray(images[i : i + 8])).to(device))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for target, conv in convs:
            seen = inputs.get(target)
            if not seen:
                continue
            mean = torch.stack([m for m, _ in seen]).mean(0)
            _replace(module, target, Recentred(conv, mean, seen[0][1]))
    return len(inputs)


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
        return TorchEngine(prepared, 32, fp16=True, fp32_first_convs=0).module

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
                ("first 16 convs fp32 (the default)", lambda m: fp32_layers(m, 16, 0)),
                ("all fp16, recentred on synthetic images",
                 lambda m: recentre_convolutions(m, calibration_images(8, 416, 416))),
                ("all fp16, recentred on 64 demo frames", lambda m: recentre_convolutions(m, calibration)),
                ("all fp16, recentred 1x1 convs only", lambda m: recentre_convolutions(m, calibration, only_pointwise=True)),
                ("all fp16, centred pixels (split conv-0 weights) + shifted activations (synthetic calibration)",
                 lambda m: (centre_pixels(m), shift_activations(m, calibration_images(8, 416, 416)))),
                ("all fp16, engine.fp16_exact (the above, every SiLU output centred, convs 1-9 split)",
                 lambda m: make_fp16_exact(m, (416, 416)))]
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
