#!/usr/bin/env python3
"""Fetch the demo model, its labels and the demo clips into ./assets (idempotent).

    python scripts/fetch_assets.py                      # download from the public sources
    python scripts/fetch_assets.py --mirror DIR         # copy from a local mirror folder
                                                        # (DIR/models/..., DIR/videos/...)

Downloads are checked by size and format (an ONNX graph with the expected input and output, a
video PyAV can open), not by a fixed hash: the official YOLOX release file is a different export
of the same weights than the one the mirror carries.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ASSETS = {
    "models/yolox_nano.onnx": (
        "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
        1_000_000,
    ),
    "models/coco_classes.txt": (
        "https://raw.githubusercontent.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/main/model/coco_classes.txt",
        300,
    ),
    "videos/one-by-one-person-detection.mp4": (
        "https://github.com/intel-iot-devkit/sample-videos/raw/master/one-by-one-person-detection.mp4",
        500_000,
    ),
    "videos/bottle-detection.mp4": (
        "https://github.com/intel-iot-devkit/sample-videos/raw/master/bottle-detection.mp4",
        100_000,
    ),
    "videos/car-detection.mp4": (
        "https://github.com/intel-iot-devkit/sample-videos/raw/master/car-detection.mp4",
        500_000,
    ),
}


def check(path: Path, min_size: int) -> str | None:
    """None when the file looks right, else what is wrong."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size < min_size:
        return f"too small ({path.stat().st_size} bytes)"
    if path.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(path))
            dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            out = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        except Exception as exc:
            return f"not an ONNX model ({exc})"
        if dims[1:] != [3, 416, 416] or out[-1] != 85:
            return f"unexpected shapes: input {dims}, output {out}"
    elif path.suffix == ".mp4":
        import av

        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    return "no video stream"
        except av.error.FFmpegError as exc:
            return f"not a readable video ({exc})"
    elif path.suffix == ".txt":
        if len([x for x in path.read_text().splitlines() if x.strip()]) != 80:
            return "not 80 class names"
    return None


def fetch(name: str, url: str, dest: Path, mirror: Path | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, suffix=dest.suffix) as tmp:
        tmp_path = Path(tmp.name)
    try:
        if mirror is not None:
            source = mirror / name
            if not source.is_file():
                raise FileNotFoundError(f"{source}: not in the mirror folder")
            shutil.copyfile(source, tmp_path)
        else:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp_path, "wb") as out:
                shutil.copyfileobj(response, out)
        tmp_path.replace(dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", type=Path, help="copy from this folder instead of downloading")
    parser.add_argument("--dest", type=Path, default=ROOT / "assets", help="where to put them (default: ./assets)")
    args = parser.parse_args()
    failed = 0
    for name, (url, min_size) in ASSETS.items():
        dest = args.dest / name
        if check(dest, min_size) is None:
            print(f"ok       {name}")
            continue
        try:
            fetch(name, url, dest, args.mirror)
        except Exception as exc:
            print(f"FAILED   {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        problem = check(dest, min_size)
        if problem:
            print(f"FAILED   {name}: {problem}", file=sys.stderr)
            dest.unlink(missing_ok=True)
            failed += 1
        else:
            print(f"fetched  {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
