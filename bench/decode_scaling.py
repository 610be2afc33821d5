#!/usr/bin/env python3
"""Where the CPU side of the pipeline runs out: decode, colour conversion and letterbox of 1080p
H.264 in N Python threads (one camera each), without the rest of the pipeline.

    python bench/decode_scaling.py [--clip FILE] [--cameras 1,4,8,16] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.letterbox import letterbox_into  # noqa: E402
from stages.source import to_bgr  # noqa: E402


def one_camera(clip: Path, threads: int, work: str, counts: list, index: int) -> None:
    slot = np.empty((416, 416, 3), np.uint8)
    n = 0
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        for frame in container.decode(stream):
            if work != "decode":
                image = to_bgr(frame, "opencv" if work.startswith("opencv") else "swscale")
                if work.endswith("letterbox"):
                    letterbox_into(image, slot, "top-left")
            n += 1
    counts[index] = n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--cameras", default="1,4,8,16")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    print("| work per frame | FFmpeg threads per camera | cameras | total fps |")
    print("| --- | --- | --- | --- |")
    for work in ("decode", "swscale bgr24", "opencv bgr", "opencv bgr + letterbox"):
        for threads in map(int, args.threads.split(",")):
            for cameras in map(int, args.cameras.split(",")):
                counts = [0] * cameras
                workers = [threading.Thread(target=one_camera, args=(args.clip, threads, work, counts, i)) for i in range(cameras)]
                started = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                print(f"| {work} | {threads} | {cameras} | {sum(counts) / (time.perf_counter() - started):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
