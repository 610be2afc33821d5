"""Shared test helpers: where the assets are, free ports, configs, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
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
BOTTLE_CLIP = ASSETS / "videos" / "bottle-detection.mp4"
SHORT_FRAMES = 240  # frames in each of `short_clips`

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
        "engine": {"kind": "onnxruntime", "intra_op_threads": 1, "lanes": 2, "max_batch": 4, "batch_timeout_ms": 10},
        "publish": {"bind": f"tcp://127.0.0.1:{free_port()}"},
        "runtime": {"status_interval_s": 1},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path, config


def engine_fps(batch: int = 1, runs: int = 5) -> float:
    """Frames a second the test configs' engine (ONNX Runtime, one single-threaded call, the demo model)
    runs on this machine right now, median of `runs`.

    Machines here differ by 4x in speed and are shared: a test that feeds a live source pays it below
    this capacity (or sizes its load from it), so its verdict means the same on a slow or busy machine."""
    import statistics

    import numpy as np

    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from pipeline.model import prepare_model

    model = prepare_model(MODEL, "yolox", batch)
    engine = OnnxRuntimeEngine(model, batch, intra_op_threads=1)
    images = np.zeros((batch, *model.input_hw, 3), np.uint8)
    engine.infer(images)  # first call: allocations
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.infer(images)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start_cli(*args: str, env: dict | None = None, own_group: bool = False) -> subprocess.Popen:
    """The CLI in a subprocess; `own_group`: in a process group of its own, as a shell starts a job
    (so that a test can signal the whole group, as the terminal's Ctrl-C does)."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            process_group=0 if own_group else None)


class Subscriber:
    """A real ZeroMQ SUB socket collecting decoded headers per topic."""

    def __init__(self, endpoint: str, topics: list[bytes], hwm: int = 100000, rcvbuf: int | None = None):
        import zmq

        self.zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        if rcvbuf is not None:  # a small kernel buffer: a subscriber that stops reading is really behind
            self.socket.setsockopt(zmq.RCVBUF, rcvbuf)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
        self.messages: list[tuple[bytes, dict]] = []

    def collect(self, until, timeout: float = 120.0, process: subprocess.Popen | None = None) -> list[tuple[bytes, dict]]:
        """Receive until `until(messages)` or `timeout`; with `process`, also once it has exited and nothing
        more is queued (a run that failed at its start is not waited on for the whole timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(200):
                parts = self.socket.recv_multipart()
                self.messages.append((parts[0], json.loads(parts[1])))
                if until(self.messages):
                    break
            elif process is not None and process.poll() is not None:
                break
        return self.messages

    def close(self) -> None:
        self.socket.close(0)


def first_frames(messages: list[tuple[bytes, dict]]) -> dict[str, float]:
    """Each camera's first detections message (of a Subscriber's list): its capture time."""
    first = {}
    for _, message in messages:
        if message["type"] == "detections":
            first.setdefault(message["camera"], message["capture_time"])
    return first


def run_and_collect(config_path: Path, endpoint: str, topic: bytes, *args: str, timeout: float = 240):
    """Run the CLI with a subscriber on `topic` (the config should wait for it) until the camera's end
    message: (exit code, [(topic, header)], stderr)."""
    subscriber = Subscriber(endpoint, [topic])
    process = start_cli("--config", str(config_path), *args)
    try:
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=timeout, process=process)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    return process.returncode, messages, err


def small_clip(path: Path, frames: int, fps: int, size: tuple[int, int] = (384, 216)) -> Path:
    """A small real clip written with PyAV: the first `frames` frames of the demo clip, scaled to
    `size`, with timestamps at `fps`."""
    import av
    from fractions import Fraction

    width, height = size
    with av.open(str(PERSON_CLIP)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i >= frames:
                break
            small = frame.reformat(width=width, height=height, format="yuv420p")
            small.pts, small.time_base = i, Fraction(1, fps)
            for packet in stream.encode(small):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return path


def cut_clip(source: Path, out: Path, start: int, frames: int = SHORT_FRAMES) -> Path:
    """Frames [start, start + frames) of `source`, re-encoded at its size and 25 fps."""
    import av

    with av.open(str(source)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=25)
        stream.width, stream.height = src.streams.video[0].width, src.streams.video[0].height
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for i, frame in enumerate(src.decode(video=0)):
            if i >= start + frames:
                break
            if i >= start:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="bgr24"), format="bgr24")):
                    dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


@pytest.fixture(scope="session")
def short_clips(tmp_path_factory) -> tuple[Path, Path]:
    """(people walking through, bottles): SHORT_FRAMES-frame cuts of the demo clips, for tests that run
    several cameras to their end; the same checks as on the whole clips, in a time a slow machine affords."""
    folder = tmp_path_factory.mktemp("short-clips")
    return cut_clip(PERSON_CLIP, folder / "people.mp4", 200), cut_clip(BOTTLE_CLIP, folder / "bottles.mp4", 0)


def needs_torch_and_model() -> None:
    """At the top of a CPU test module of the torch engine's module rewrites: skip the module where
    torch or onnx2torch is not installed (CI installs neither) or the demo model is missing."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx2torch")
    if not MODEL.is_file():
        pytest.skip("needs the demo model (scripts/test.sh fetches the assets)", allow_module_level=True)


@pytest.fixture
def assets_present():
    if not MODEL.is_file() or not PERSON_CLIP.is_file():
        pytest.fail(f"test assets missing under {ASSETS} (set ASSETS_DIR or run scripts/fetch_assets.py)")


RTSP_SERVER = ROOT / "tests" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's Python: it has the GStreamer `gi` bindings


class RtspServer:
    """tests/rtsp_server.py in a subprocess: a real RTSP server on 127.0.0.1 that a test can kill,
    restart (same port) or freeze (SIGSTOP), like a camera that goes away or hangs."""

    def __init__(self, fps: int = 25, size: str = "320x240", clip: Path | None = None, port: int | None = None,
                 key_int: int | None = None):
        self.fps, self.size, self.clip, self.key_int = fps, size, clip, key_int
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def url(self, mount: str = "live", credentials: str = "") -> str:
        return f"rtsp://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}/{mount}"

    def start(self, timeout: float = 15.0) -> "RtspServer":
        args = [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", str(self.port), "--fps", str(self.fps), "--size", self.size]
        if self.clip:
            args += ["--clip", str(self.clip)]
        if self.key_int:
            args += ["--key-int", str(self.key_int)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("ready"):
                self._prepare_live(deadline)
                return self
            if not line and self.process.poll() is not None:
                break
        err = self.process.stderr.read() if self.process.poll() is not None else ""
        self.kill()
        pytest.fail(f"RTSP test server did not start on port {self.port}: {err.strip()[-500:]} "
                    "(needs python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,bad,ugly}; "
                    "see scripts/test.sh)")

    def _prepare_live(self, deadline: float) -> None:
        """One client on /live first: the server prepares the shared media for it (and keeps it
        prepared, tests/rtsp_server.py). Several cameras that connect at the same moment to a
        media not yet prepared race in gst-rtsp-server (seen: EPERM, then the server aborts),
        which real cameras do not; the tests are about the pipeline, not about that race."""
        import av

        while time.monotonic() < deadline:
            try:
                with av.open(self.url(), options={"rtsp_transport": "tcp", "timeout": "5000000"}, timeout=5) as c:
                    next(c.decode(video=0))
                return
            except (av.FFmpegError, OSError, StopIteration):
                time.sleep(0.2)
        self.kill()
        pytest.fail(f"RTSP test server on port {self.port} never served a frame on /live")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot die otherwise
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def rtsp_server():
    """A factory: `rtsp_server(fps=..., clip=...)` starts a server; all are killed at teardown."""
    servers: list[RtspServer] = []

    def start(**kwargs) -> RtspServer:
        server = RtspServer(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
