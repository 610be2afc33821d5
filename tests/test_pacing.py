"""A file played as a live camera (`live: true, realtime: true, loop: true`), as the load benchmark
uses it: packets are paced to their timestamps, the file loops by seeking (frame numbers go on,
timestamps start over), and capture time is when each frame was due, so latency stays honest.
"""

import json
import time
from fractions import Fraction

import av

from conftest import PERSON_CLIP, Subscriber, engine_fps, make_config, start_cli


def paced_fps() -> int:
    """The camera's rate: a third of what the engine alone runs on this machine now (2 to 20 fps), so a
    pipeline that works keeps up even on a slow, busy machine and every lost frame is the pipeline's fault."""
    return max(2, min(20, int(engine_fps() / 3)))


def _short_clip(path, fps: int):
    """`fps` frames at `fps`: one second a loop."""
    with av.open(str(PERSON_CLIP)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 384, 216, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i >= fps:
                break
            small = frame.reformat(width=384, height=216, format="yuv420p")
            small.pts, small.time_base = i, Fraction(1, fps)
            for packet in stream.encode(small):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return path


def test_a_paced_looping_file_plays_like_a_camera(tmp_path):
    fps = paced_fps()
    clip = _short_clip(tmp_path / "short.mp4", fps)
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True, "loop": True}],
                               runtime={"shutdown_deadline_s": 60})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    summary_path = tmp_path / "summary.json"
    process = start_cli("--config", str(path), "--summary-json", str(summary_path))
    try:
        first = subscriber.collect(lambda ms: len(ms) >= 1, timeout=60)
        started = time.monotonic()
        time.sleep(max(3.5, 20 / fps))  # about 20 frames: the rate check is not at the mercy of one frame
        window = time.monotonic() - started
        messages = subscriber.collect(lambda ms: False, timeout=0.2)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=60)
        subscriber.close()
    assert first and process.returncode == 0, err[-2000:]
    frames = [m for _, m in messages if m["type"] == "detections"]
    indices = [m["frame"] for m in frames]
    # frame numbers go on across loops (never start over) and nothing is lost silently: a live camera
    # keeps its 2 newest frames, so a moment of a busy machine may drop one, but every gap is counted
    assert indices == sorted(set(indices)) and indices[-1] >= 2 * fps, f"frame numbers (at {fps} fps): {indices}"
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    drops = json.loads(summary_path.read_text())["cameras"]["cam"]["drops"]
    assert len(missing) <= drops.get("queue_full", 0), f"frames {missing} lost without a counted drop: {drops}"
    received = len(frames) - 1  # the first one arrived before the window
    assert 0.85 * fps * window <= received <= 1.15 * fps * window + 2, f"{received} frames in {window:.1f} s at {fps} fps: not paced"
    pts = [m["pts"] for m in frames]
    assert sum(1 for a, b in zip(pts, pts[1:]) if b < a) >= 2, "timestamps start over at each loop"
    latencies = sorted(m["latency_ms"]["total"] for m in frames)
    assert latencies[0] >= 0 and latencies[len(latencies) // 2] < 500
