"""Previews and the viewer: pairing, a headless recording, a real window under Xvfb, and a frozen
subscriber that must not slow the pipeline. Everything runs the real CLI over real sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import zmq

from conftest import PERSON_CLIP, ROOT, make_config, run_and_collect, start_cli
from viewer.annotate import class_color
from viewer.stream import LOST_AFTER_FRAMES, CameraStream

PERSON = 0
SHOW_LINE = re.compile(r"show (\S+) frame=(\d+) detections=(-?\d+)")


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def person_clip(tmp_path_factory) -> Path:
    """Three seconds of the demo clip in which the person stands in view the whole time (frames 300-329)."""
    out = tmp_path_factory.mktemp("clip") / "person.mp4"
    with av.open(str(PERSON_CLIP)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 768, 432, "yuv420p"
        stream.bit_rate = 4_000_000
        for i, frame in enumerate(src.decode(video=0)):
            if i >= 330:
                break
            if i >= 300:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="bgr24"), format="bgr24")):
                    dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def outline_fraction(image: np.ndarray, box, scale: float, color, offset=(0, 0), tolerance: int = 60) -> float:
    """Share of points along the box's outline (inside the image) whose colour is `color`."""
    x1, y1, x2, y2 = (v * scale for v in box)
    ox, oy = offset
    points = [(x, y) for x in np.linspace(x1 + 4, x2 - 4, 40) for y in (y1, y2)]
    points += [(x, y) for y in np.linspace(y1 + 4, y2 - 4, 40) for x in (x1, x2)]
    h, w = image.shape[:2]
    hits = total = 0
    for x, y in points:
        px, py = int(round(x + ox)), int(round(y + oy))
        if not (1 <= px < w - 1 and 1 <= py < h - 1):
            continue
        total += 1
        patch = image[py - 1:py + 2, px - 1:px + 2].reshape(-1, 3).astype(int)  # the 2 px line, either side
        if (np.abs(patch - np.array(color)).max(axis=1) <= tolerance).any():
            hits += 1
    return hits / max(total, 1)


def preview_config(tmp_path: Path, clip: Path, **preview) -> tuple[Path, dict]:
    return make_config(tmp_path, [{"id": "cam1", "url": str(clip), "realtime": True}],
                       publish={"wait_subscribers": 3, "preview": {"enabled": True, "max_fps": 30, **preview}})


def shown_frames(log: str) -> list[int]:
    return [int(m.group(2)) for m in SHOW_LINE.finditer(log)]


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args[2:4]} did not exit in {timeout} s:\n{err[-3000:]}")


# -- pairing (pure logic) -------------------------------------------------------------------------
def test_pairs_previews_with_detections_in_either_order_and_survives_restart():
    stream = CameraStream("cam1")
    det = lambda seq, frame: {"type": "detections", "camera": "cam1", "seq": seq, "frame": frame,
                              "capture_time": time.time(), "detections": []}
    prev = lambda seq, frame: {"type": "preview", "camera": "cam1", "seq": seq, "frame": frame}
    assert stream.on_detections(det(10, 100)) == []  # joins mid-stream: seq 10 is no loss
    assert [p.frame for p in stream.on_preview(prev(3, 100), b"jpeg")] == [100]  # detections came first
    assert stream.on_preview(prev(4, 101), b"jpeg") == []  # preview first: it waits
    paired = stream.on_detections(det(11, 101))
    assert [(p.frame, p.detections["frame"]) for p in paired] == [(101, 101)]
    assert stream.drops == 0
    stream.on_preview(prev(6, 103), b"jpeg")  # preview seq 5 lost; detections of 103 will never come
    assert stream.drops == 1
    late = []
    for seq, frame in enumerate(range(104, 104 + LOST_AFTER_FRAMES), start=13):  # detections seq 12 lost
        late += stream.on_detections(det(seq, frame))
    assert [(p.frame, p.detections) for p in late] == [(103, None)]  # shown without detections, not lost
    assert stream.drops == 2 and stream.state == "live"
    stream.on_detections({"type": "end", "camera": "cam1", "seq": 13 + LOST_AFTER_FRAMES})
    assert stream.state == "ended"
    stream.on_detections(det(0, 0))  # the publisher restarted: counters start over, nothing counted lost
    assert (stream.state, stream.restarts, stream.drops) == ("live", 1, 2)
    assert [p.frame for p in stream.on_preview(prev(0, 0), b"jpeg")] == [0]


def test_previews_are_off_by_default_and_on_in_the_demo_config():
    from pipeline.config import load_config, parse_config

    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.publish.preview.enabled
    plain = parse_config({"cameras": [{"id": "a", "url": "x.mp4"}], "model": {"path": "m.onnx", "preset": "yolox"}})
    assert not plain.publish.preview.enabled


# -- headless recording ---------------------------------------------------------------------------
def test_headless_recording_has_the_overlays_where_the_detections_say(tmp_path, person_clip, assets_present):
    config, cfg = preview_config(tmp_path, person_clip)
    endpoint = cfg["publish"]["bind"].replace("*", "127.0.0.1")
    video, snaps = tmp_path / "out.mp4", tmp_path / "snaps"
    env = {"DISPLAY": "", "WAYLAND_DISPLAY": ""}  # no display: recording turns headless by itself
    viewer = start_cli("view", "--connect", endpoint, "--camera", "cam1", "--record", str(video), "--snapshot-dir",
                       str(snaps), "--snapshot-every", "0", "--exit-on-end", "--log-level", "debug", env=env)
    returncode, messages, pipeline_err = run_and_collect(config, endpoint, b"det/cam1/", timeout=120)
    assert returncode == 0, pipeline_err[-2000:]
    _out, err = finish(viewer)
    assert viewer.returncode == 0, err[-2000:]
    detections = {h["frame"]: h for _t, h in messages if h["type"] == "detections"}
    shown = shown_frames(err)
    assert len(shown) >= 20, err[-2000:]  # 30 frames at 10 fps, previews allowed up to 30 fps

    with av.open(str(video)) as container:
        recorded = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(recorded) == len(shown)
    assert recorded[0].shape == (360, 640, 3)  # previews are scaled to publish.preview.width
    scale = 640 / 768
    checked = 0
    for image, frame in zip(recorded, shown):
        for det in detections[frame]["detections"]:
            if det["class_id"] != PERSON:
                continue
            assert outline_fraction(image, det["box"], scale, class_color(PERSON)) >= 0.8, f"frame {frame}"
            # the control: the same outline moved by 20 px finds no box, so the check can fail
            assert outline_fraction(image, det["box"], scale, class_color(PERSON), offset=(20, 20)) < 0.4
            checked += 1
    assert checked >= 20
    snapshot_files = sorted(p.name for p in snaps.glob("cam1_*.png"))
    assert snapshot_files == [f"cam1_{f:06d}.png" for f in sorted(set(shown))]


# -- a real window under Xvfb ---------------------------------------------------------------------
@pytest.fixture
def xvfb():
    """A private X display (Xvfb picks a free number and reports it on a pipe)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb)")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x600x24", "-nolisten", "tcp"],
                              pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    try:
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def capture_screen(display: str, path: Path) -> np.ndarray:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "x11grab", "-video_size", "1024x600", "-i", display,
                    "-frames:v", "1", str(path)], check=True, timeout=30)
    return cv2.imread(str(path))


def find_outline(screen: np.ndarray, width: int, height: int, color, tolerance: int = 40) -> tuple[float, tuple[int, int]]:
    """Where on the screen a width x height rectangle outline of `color` best fits: (share of it found, top-left)."""
    mask = (np.abs(screen.astype(int) - np.array(color)).max(axis=2) <= tolerance).astype(np.float32)
    template = np.zeros((height, width), np.float32)
    cv2.rectangle(template, (0, 0), (width - 1, height - 1), 1.0, 1)
    scores = cv2.matchTemplate(mask, template, cv2.TM_CCORR)
    _min, best, _minloc, where = cv2.minMaxLoc(scores)
    return best / template.sum(), where


def test_window_under_xvfb_shows_the_person_box_and_q_quits(tmp_path, person_clip, xvfb, assets_present):
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg (x11grab) is needed to capture the screen: apt-get install ffmpeg")
    config, cfg = preview_config(tmp_path, person_clip)
    endpoint = cfg["publish"]["bind"]
    env = {"DISPLAY": xvfb, "QT_QPA_PLATFORM": "xcb"}
    viewer = start_cli("view", "--connect", endpoint, "--camera", "cam1", "--log-level", "debug", env=env)
    returncode, messages, pipeline_err = run_and_collect(config, endpoint, b"det/cam1/", timeout=120)
    assert returncode == 0, pipeline_err[-2000:]
    time.sleep(1.5)  # the viewer has drawn the last frame and keeps showing it
    assert viewer.poll() is None, viewer.communicate()[1][-2000:]
    screen = capture_screen(xvfb, tmp_path / "screen.png")
    window = subprocess.run(["xdotool", "search", "--name", "vapipe cam1", "getwindowgeometry", "--shell"],
                            capture_output=True, text=True, env={**os.environ, **env}) if shutil.which("xdotool") else None
    if window is not None:  # q quits (keyboard focus follows the pointer: there is no window manager)
        subprocess.run(["xdotool", "mousemove", "100", "100", "key", "q"], env={**os.environ, **env}, check=True)
    else:
        viewer.send_signal(signal.SIGTERM)
    _out, err = finish(viewer, timeout=10)
    assert viewer.returncode == 0, err[-2000:]

    shown = shown_frames(err)
    assert shown, err[-2000:]
    detections = {h["frame"]: h for _t, h in messages if h["type"] == "detections"}
    people = [d for d in detections[shown[-1]]["detections"] if d["class_id"] == PERSON]
    assert people, f"frame {shown[-1]} has no person"
    scale = 640 / 768
    x1, y1, x2, y2 = (v * scale for v in people[0]["box"])
    found, (x, y) = find_outline(screen, int(round(x2 - x1)) + 1, int(round(y2 - y1)) + 1, class_color(PERSON))
    assert found >= 0.8, f"no {class_color(PERSON)} outline of the person's size on screen (best {found:.2f})"
    origin = (0, 0)
    if window is not None and window.returncode == 0:
        geometry = dict(line.split("=", 1) for line in window.stdout.split())
        origin = (int(geometry["X"]), int(geometry["Y"]))
    assert abs(x - (origin[0] + x1)) <= 3 and abs(y - (origin[1] + y1)) <= 3, (x, y, origin, (x1, y1))


# -- a frozen viewer never slows the pipeline -----------------------------------------------------
class Reader:
    """A subscriber that reads everything as fast as it comes, in a thread: (topic, header, parts) kept."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 1_000_000)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.messages: list[tuple[bytes, dict, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            if self.socket.poll(100):
                parts = self.socket.recv_multipart()
                self.messages.append((parts[0], json.loads(parts[1]), len(parts)))

    def close(self, linger_s: float = 2.0) -> None:
        deadline = time.monotonic() + linger_s  # what is still on its way, then stop
        while time.monotonic() < deadline and not any(h["type"] == "end" for _t, h, _n in self.messages):
            time.sleep(0.05)
        self.stop.set()
        self.thread.join(5)
        self.socket.close(0)


def _side_by_side(tmp_path: Path, order: list[str], seconds: float = 7) -> dict:
    """Two identical pipelines with previews, run at once for `seconds` (both see the same machine load):
    "frozen" has a subscriber that stops reading after its first preview beside one that keeps reading,
    "healthy" only the one that keeps reading. Returns name -> (summary, CPU seconds used, what its reader got)."""
    camera = [{"id": "cam1", "url": str(PERSON_CLIP), "loop": True}]
    # a small send queue: the frozen subscriber's is full within a second, so its messages really are dropped
    publish = {"send_hwm": 50, "preview": {"enabled": True, "max_fps": 15, "width": 640}}
    # a slow machine drains what is queued at its own speed (seconds); one blocked by the frozen
    # subscriber never does
    runtime = {"shutdown_deadline_s": 30}
    configs = {name: make_config(tmp_path, camera, f"{name}-{order[0]}.yaml", engine={"intra_op_threads": 1},
                                 publish={**publish, "wait_subscribers": 2 if name == "frozen" else 1}, runtime=runtime)
               for name in order}
    frozen = zmq.Context.instance().socket(zmq.SUB)
    frozen.setsockopt(zmq.RCVHWM, 4)
    frozen.setsockopt(zmq.RCVBUF, 1024)  # and the smallest kernel buffer: it is full in seconds, not minutes
    frozen.setsockopt(zmq.SUBSCRIBE, b"")
    frozen.connect(configs["frozen"][1]["publish"]["bind"])
    readers = {name: Reader(configs[name][1]["publish"]["bind"]) for name in order}
    summaries = {name: tmp_path / f"{name}-{order[0]}.json" for name in order}
    runs = {name: start_cli("--config", str(configs[name][0]), "--summary-json", str(summaries[name])) for name in order}
    try:
        got_preview = False
        deadline = time.monotonic() + 120
        while not got_preview and time.monotonic() < deadline:  # read until a preview came, then freeze
            if frozen.poll(200):
                got_preview = len(frozen.recv_multipart()) == 3
        assert got_preview, "the subscriber never received a preview frame"
        time.sleep(seconds)
        for process in runs.values():
            process.send_signal(signal.SIGINT)
        out = {}
        for name, process in runs.items():
            _pid, status, usage = os.wait4(process.pid, 0)  # the child's own CPU time, not the machine's
            process.returncode = os.waitstatus_to_exitcode(status)
            assert process.returncode == 0, f"{name} did not drain: {process.stderr.read()[-2000:]}"
            process.stderr.close()
            process.stdout.close()
            readers[name].close()
            out[name] = (json.loads(summaries[name].read_text()), usage.ru_utime + usage.ru_stime, readers[name].messages)
        return out
    finally:
        frozen.close(0)
        for process in runs.values():
            if process.poll() is None:
                process.kill()
        for reader in readers.values():
            reader.stop.set()


def test_frozen_subscriber_with_previews_does_not_slow_the_pipeline(tmp_path, assets_present):
    """A subscriber that stops reading costs the pipeline nothing and the other subscribers nothing: the same
    pipeline with and without one, side by side, twice with the start order swapped."""
    rounds = [_side_by_side(tmp_path, ["frozen", "healthy"]), _side_by_side(tmp_path, ["healthy", "frozen"])]
    frames = {name: sum(r[name][0]["frames"] for r in rounds) for name in ("frozen", "healthy")}
    cpu = {name: sum(r[name][1] for r in rounds) for name in ("frozen", "healthy")}
    per_cpu = {name: frames[name] / cpu[name] for name in frames}
    print(f"frames {frames}; frames per CPU second {per_cpu}")
    for r in rounds:
        summary, _cpu, got = r["frozen"]
        assert summary["previews_sent"] >= 10, summary  # previews really went out, while the subscriber was frozen
        # the subscriber that kept reading lost nothing to the frozen one: every detection, in order, and the end
        seqs = [h["seq"] for _t, h, _n in got if h["type"] == "detections"]
        assert seqs == list(range(summary["frames"])), (len(seqs), summary["frames"])
        assert sum(n == 3 for _t, _h, n in got) >= 10 and got[-1][1]["type"] == "end"
    # the cost: frames per CPU second, within 10% (CPU time does not depend on how busy the machine is;
    # a publisher that retried sends to the frozen subscriber would burn it)
    assert per_cpu["frozen"] >= 0.9 * per_cpu["healthy"], per_cpu
    # and nothing waited on the frozen subscriber: a publisher blocked by it stalls once its queue of 50 is
    # full (about a third of the frames of the healthy one); two processes sharing a busy machine differ by
    # up to ~20% in wall-clock throughput
    assert frames["frozen"] >= 0.65 * frames["healthy"], frames
