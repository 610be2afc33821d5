"""Shared test helpers: where the assets are, free ports, configs, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("ASSETS_DIR", ROOT.parent / "shared" / "assets")).resolve()
MODEL = ASSETS / "models" / "yolox_nano.onnx"
LABELS = ASSETS / "models" / "coco_classes.txt"
PERSON_CLIP = ASSETS / "videos" / "one-by-one-person-detection.mp4"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(tmp_path: Path, cameras: list[dict], name: str = "test.yaml", **sections) -> tuple[Path, dict]:
    """Write a config (the demo model, a free port) and return its path and the dict written."""
    config = {
        "cameras": cameras,
        "model": {"path": str(MODEL), "preset": "yolox", "labels": str(LABELS)},
        "engine": {"kind": "onnxruntime", "intra_op_threads": 2, "max_batch": 4, "batch_timeout_ms": 10},
        "publish": {"bind": f"tcp://127.0.0.1:{free_port()}"},
        "runtime": {"status_interval_s": 1},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path, config


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


class Subscriber:
    """A real ZeroMQ SUB socket collecting decoded headers per topic."""

    def __init__(self, endpoint: str, topics: list[bytes]):
        import zmq

        self.zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
        self.messages: list[tuple[bytes, dict]] = []

    def collect(self, until, timeout: float = 120.0) -> list[tuple[bytes, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(200):
                parts = self.socket.recv_multipart()
                self.messages.append((parts[0], json.loads(parts[1])))
                if until(self.messages):
                    break
        return self.messages

    def close(self) -> None:
        self.socket.close(0)


@pytest.fixture
def assets_present():
    if not MODEL.is_file() or not PERSON_CLIP.is_file():
        pytest.fail(f"test assets missing under {ASSETS} (set ASSETS_DIR or run scripts/fetch_assets.py)")
