#!/usr/bin/env python3
"""How far fp16 moves YOLOX-Nano's scores, and which layers to keep in fp32 (GPU machine).

Runs letterboxed demo frames through the PyTorch engine's converted module in fp32 (TF32 off)
and in fp16 autocast variants; prints, per variant, the largest score difference on anchors the
fp32 run scores >= 0.25, how many differ by more than 0.02, and the speed of a batch of 32.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.torch_engine import TorchEngine, fp32_layers  # noqa: E402
from pipeline.model import prepare_model  # noqa: E402
from stages.letterbox import letterbox_into  # noqa: E402

ASSETS = Path(os.environ.get("ASSETS_DIR", ROOT.parent / "shared" / "assets"))


def frames(count: int) -> np.ndarray:
    out = np.empty((count, 416, 416, 3), np.uint8)
    with av.open(str(ASSETS / "videos" / "one-by-one-person-detection.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == count:
                break
            letterbox_into(f.to_ndarray(format="bgr24"), out[i], "top-left")
    return out


def scores(engine: TorchEngine, images: np.ndarray) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32]).cuda()
            with torch.autocast("cuda", dtype=torch.float16, enabled=engine.fp16):
                y = engine.module(x).float()
            out.append((y[..., 4:5] * y[..., 5:]).amax(-1).cpu().numpy())
    return np.concatenate(out)


def speed(engine: TorchEngine, images: np.ndarray) -> float:
    x = torch.from_numpy(images[:32]).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=engine.fp16):
        for _ in range(3):
            engine.module(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            engine.module(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / 10 * 1000


def main() -> int:
    images = frames(320)
    prepared = prepare_model(ASSETS / "models" / "yolox_nano.onnx", "yolox", want_batch=32)
    reference = scores(TorchEngine(prepared, 32), images)
    mask = reference >= 0.25
    print(f"anchors scored >= 0.25 in fp32: {int(mask.sum())} over {len(images)} frames")
    print("| fp16 variant | max abs score diff | > 0.02 | > 0.01 | batch-32 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, first, last in [("all layers fp16", 0, 0), ("first 2 convs fp32", 2, 0), ("first 6 convs fp32", 6, 0),
                              ("first 8 convs fp32", 8, 0), ("first 12 convs fp32", 12, 0), ("first 16 convs fp32", 16, 0),
                              ("prediction convs fp32", 0, 9), ("first 8 + prediction convs fp32", 8, 9)]:
        engine = TorchEngine(prepared, 32, fp16=True, fp32_first_convs=0)
        fp32_layers(engine.module, first, last)
        diff = np.abs(scores(engine, images) - reference)[mask]
        print(f"| {name} | {diff.max():.4f} | {(diff > 0.02).sum()} | {(diff > 0.01).sum()} | {speed(engine, images):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
