"""What the benchmark scripts share: where the assets are, the commit, and a timed pipeline run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import parse_config  # noqa: E402
from pipeline.graph import Pipeline  # noqa: E402

ASSETS = Path(os.environ.get("ASSETS_DIR", ROOT.parent / "shared" / "assets"))
MODEL = ASSETS / "models" / "yolox_nano.onnx"
LABELS = ASSETS / "models" / "coco_classes.txt"
CLIP = ASSETS / "videos" / "one-by-one-person-detection.mp4"


def commit() -> str:
    """BENCH_COMMIT when set (the tree travelled to another machine), else the checkout's commit."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or os.environ.get("BENCH_COMMIT", "unknown")


def project_paths(value):
    """`value` with every absolute path in it made relative to the project (a path outside it keeps
    only its name): results are committed, and a machine's own folders mean nothing elsewhere."""
    if isinstance(value, dict):
        return {key: project_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [project_paths(item) for item in value]
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/")):
        path = Path(value)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return value


def append_results(out: Path, stem: str, markdown: str, record: dict) -> None:
    """Append a run to `<out>/<stem>.md` (the table) and `<out>/<stem>.jsonl` (its numbers, paths
    relative to the project)."""
    import json

    record = project_paths(record)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.md", "a", encoding="utf-8") as f:
        f.write("\n" + markdown + "\n")
    with open(out / f"{stem}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def timed_pipeline(config: dict) -> tuple[float, Pipeline]:
    """Run the real pipeline on `config` (a config mapping) to its end: (frames published per second, pipeline)."""
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    pipeline = Pipeline(parse_config({"publish": {"bind": "tcp://127.0.0.1:0"}, **config}, "bench.yaml"))
    started = time.perf_counter()
    pipeline.start()
    pipeline.wait()
    elapsed = time.perf_counter() - started
    return pipeline.publish.metrics.frames_out / elapsed, pipeline
