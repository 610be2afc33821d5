"""A file played as a live camera (`live: true, realtime: true, loop: true`), as the load benchmark
uses it: packets are paced to their timestamps, the file loops by seeking (frame numbers go on,
timestamps start over), and capture time is when each frame was due, so latency stays honest.
"""

import threading
import time
from fractions import Fraction

import av
import pytest

from conftest import PERSON_CLIP, Subscriber, make_config, start_cli

FPS = 20
FRAMES = 20  # one second a loop


def _short_clip(path):
    with av.open(str(PERSON_CLIP)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 384, 216, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i >= FRAMES:
                break
            small = frame.reformat(width=384, height=216, format="yuv420p")
            small.pts, small.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(small):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return path


def test_a_paced_looping_file_plays_like_a_camera(tmp_path):
    clip = _short_clip(tmp_path / "short.mp4")
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True, "loop": True}])
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    process = start_cli("--config", str(path))
    try:
        first = subscriber.collect(lambda ms: len(ms) >= 1, timeout=60)
        started = time.monotonic()
        time.sleep(3.5)
        window = time.monotonic() - started
        messages = subscriber.collect(lambda ms: False, timeout=0.2)
    finally:
        process.terminate()
        process.communicate(timeout=30)
        subscriber.close()
    assert first
    frames = [m for _, m in messages if m["type"] == "detections"]
    indices = [m["frame"] for m in frames]
    assert indices == list(range(len(indices))), "frame numbers go on across loops, none lost"
    received = len(frames) - 1  # the first one arrived before the window
    assert 0.85 * FPS * window <= received <= 1.15 * FPS * window + 2, f"{received} frames in {window:.1f} s: not paced"
    pts = [m["pts"] for m in frames]
    assert sum(1 for a, b in zip(pts, pts[1:]) if b < a) >= 2, "timestamps start over at each loop"
    latencies = sorted(m["latency_ms"]["total"] for m in frames)
    assert latencies[0] >= 0 and latencies[len(latencies) // 2] < 500


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_pacing_ignores_a_wall_clock_step(tmp_path, monkeypatch, step_s):
    """An NTP step of the wall clock right after the first packet neither bursts a paced file
    (forwards) nor freezes it (backwards): pacing runs on the monotonic clock."""
    import types

    from pipeline.config import CameraConfig
    from pipeline.queues import BoundedQueue
    from stages import source as source_module

    clip = _short_clip(tmp_path / "short.mp4")  # 20 frames at 20 fps: one second paced
    calls = []

    def stepped_wall_clock() -> float:
        calls.append(1)
        return time.time() + (step_s if len(calls) > 1 else 0.0)

    monkeypatch.setattr(source_module, "time", types.SimpleNamespace(
        time=stepped_wall_clock, monotonic=time.monotonic, perf_counter=time.perf_counter, sleep=time.sleep))
    queue = BoundedQueue(100)
    stage = source_module.SourceStage(CameraConfig(id="cam", url=str(clip), realtime=True), queue, threading.Event())
    started = time.monotonic()
    stage.start()
    assert stage.join(timeout=60), "frozen: the paced file waits for the wall clock to come back"
    took = time.monotonic() - started
    assert len(queue) == FRAMES
    assert took >= 0.7 * (FRAMES - 1) / FPS, f"{FRAMES} frames in {took:.2f} s: a burst, not paced"
