"""A file played as a live camera (`live: true, realtime: true, loop: true`), as the load benchmark
uses it: packets are paced to their timestamps, the file loops by seeking (frame numbers go on,
timestamps start over), and capture time is when each frame was due, so latency stays honest.
"""

import json
import threading
import time

import pytest

from conftest import Subscriber, engine_fps, first_frames, make_config, start_cli, small_clip


def paced_fps() -> int:
    """The camera's rate: a third of what the engine alone runs on this machine now (2 to 20 fps), so a
    pipeline that works keeps up even on a slow, busy machine and every lost frame is the pipeline's fault."""
    return max(2, min(20, int(engine_fps() / 3)))


def test_a_paced_looping_file_plays_like_a_camera(tmp_path):
    fps = paced_fps()
    clip = small_clip(tmp_path / "short.mp4", fps, fps)
    # the run waits for the subscriber: a frame published before its subscription reached the publisher
    # is dropped by ZeroMQ, not by the pipeline, and could not be counted (frame 0, once in a CI run)
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True, "loop": True}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60}, runtime={"shutdown_deadline_s": 60})
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


def test_a_decoder_slow_to_open_is_start_up_not_lag(tmp_path):
    """The time a camera's decoder takes to open (NVDEC: seconds, with a hundred cameras opening at
    once after the workers' go) is not lateness: a paced camera's clock starts at its first frame, so
    nothing is skipped and every frame is published. (A 4-GPU load run skipped 3 to 23 s of every
    camera at start before this.) The slow opening is the test-only VAPIPE_TEST_DECODER_START_DELAY."""
    fps = paced_fps()
    frames_in_clip = 3 * fps
    clip = small_clip(tmp_path / "short.mp4", frames_in_clip, fps)
    max_lag_s, open_delay_s = 1.0, 2.5
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True,
                                           "max_lag_s": max_lag_s}], publish={"wait_subscribers": 1, "wait_timeout_s": 60},
                               runtime={"shutdown_deadline_s": 60})  # every frame counts from 0: see the test above
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    summary_path = tmp_path / "summary.json"
    process = start_cli("--config", str(path), "--summary-json", str(summary_path),
                        env={"VAPIPE_TEST_DECODER_START_DELAY": str(open_delay_s)})
    last = frames_in_clip - 1
    try:  # the first pass of the clip, to its last frame
        messages = subscriber.collect(lambda ms: any(m["type"] == "detections" and m["frame"] >= last for _, m in ms),
                                      timeout=120)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=60)
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    drops = json.loads(summary_path.read_text())["cameras"]["cam"]["drops"]
    assert drops.get("late", 0) == 0 and "skipped" not in err, f"the decoder's opening counted as lag: {drops}"
    indices = [m["frame"] for _, m in messages if m["type"] == "detections"]
    missing = sorted(set(range(frames_in_clip)) - set(indices))
    assert len(missing) <= drops.get("queue_full", 0), f"frames {missing} lost: {drops}"


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_pacing_ignores_a_wall_clock_step(tmp_path, monkeypatch, step_s):
    """An NTP step of the wall clock right after the first packet neither bursts a paced file
    (forwards) nor freezes it (backwards): pacing runs on the monotonic clock."""
    import types

    from pipeline.config import CameraConfig
    from pipeline.queues import BoundedQueue
    from stages import source as source_module

    fps = frames = 20
    clip = small_clip(tmp_path / "short.mp4", fps, fps)  # 20 frames at 20 fps: one second paced
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
    assert len(queue) == frames
    assert took >= 0.7 * (frames - 1) / fps, f"{frames} frames in {took:.2f} s: a burst, not paced"


def test_a_camera_that_falls_behind_skips_to_a_keyframe_and_counts_it(tmp_path):
    """cameras[].max_lag_s: the pipeline frozen for 4 s (SIGSTOP: a starved host) leaves a paced camera
    4 s behind its timestamps. It must skip to a keyframe instead of decoding the backlog, so it is live
    again at once; the skipped frames keep their frame numbers (a gap) and are counted as late drops."""
    import os
    import signal

    fps = paced_fps()
    clip = small_clip(tmp_path / "short.mp4", 4 * fps, fps)  # mpeg4: a keyframe every 12 frames
    max_lag_s, freeze_s = 1.0, 4.0
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True, "loop": True,
                                           "max_lag_s": max_lag_s}], runtime={"shutdown_deadline_s": 60})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    summary_path = tmp_path / "summary.json"
    process = start_cli("--config", str(path), "--summary-json", str(summary_path))
    try:
        assert subscriber.collect(lambda ms: len(ms) >= 2, timeout=60)
        os.kill(process.pid, signal.SIGSTOP)
        frozen = time.time()
        time.sleep(freeze_s)
        os.kill(process.pid, signal.SIGCONT)
        resumed = time.time()
        time.sleep(max(3.0, 30 / fps))
        messages = subscriber.collect(lambda ms: False, timeout=0.2)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        _out, err = process.communicate(timeout=60)
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    frames = [m for _, m in messages if m["type"] == "detections"]
    drops = json.loads(summary_path.read_text())["cameras"]["cam"]["drops"]
    assert drops.get("late", 0) >= 1, f"no frame skipped after a {freeze_s:g} s freeze: {drops}"
    assert "skipped" in err and "late drops" in err, err[-2000:]
    # every frame number that never arrived is a counted drop (late, or a full queue)
    indices = [m["frame"] for m in frames]
    missing = set(range(min(indices), max(indices) + 1)) - set(indices)
    assert len(missing) <= sum(drops.values()), (sorted(missing), drops)
    # the backlog was skipped, not decoded: few of the frames due while frozen were published (at most the
    # ones due in the first max_lag_s and up to the keyframe it resumed at)
    due_while_frozen = [m for m in frames if frozen + max_lag_s + 0.5 < m["capture_time"] < resumed - 0.5]
    assert len(due_while_frozen) <= 12 + 1, f"{len(due_while_frozen)} frames of the frozen seconds were decoded"
    # and the camera is live again: what was captured after the catch-up arrives in well under max_lag_s
    after = sorted(m["latency_ms"]["total"] for m in frames if m["capture_time"] > resumed + 1.0)
    assert after and after[len(after) // 2] < 500, after


@pytest.mark.parametrize("preroll_timeout_s", [None, 1.0], ids=["default", "timeout-1s"])
def test_the_preroll_starts_every_camera_together(tmp_path, preroll_timeout_s):
    """runtime.preroll_timeout_s: before the run starts, every camera is opened and its first frame
    decoded and held, so a camera whose decoder is slow to open (4 s here, the test-only hook; NVDEC with
    hundreds opening at once: 20-76 s) starts with the others instead of seconds after them while they
    run ahead. With a timeout shorter than that opening, the run starts without it, a warning names
    it, and it starts when it opens."""
    fps = paced_fps()
    clip = small_clip(tmp_path / "short.mp4", 3 * fps, fps)
    open_delay_s = 4.0
    cameras = [{"id": camera, "url": str(clip), "live": True, "realtime": True, "loop": True} for camera in ("fast", "slow")]
    runtime = {"shutdown_deadline_s": 60, **({"preroll_timeout_s": preroll_timeout_s} if preroll_timeout_s else {})}
    path, config = make_config(tmp_path, cameras, publish={"wait_subscribers": 1, "wait_timeout_s": 60}, runtime=runtime)
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path), env={"VAPIPE_TEST_DECODER_START_DELAY": f"slow={open_delay_s:g}"})
    try:
        messages = subscriber.collect(lambda ms: set(first_frames(ms)) == {"fast", "slow"}, timeout=120, process=process)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=60)
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    first = first_frames(messages)
    assert set(first) == {"fast", "slow"}, err[-2000:]
    gap = first["slow"] - first["fast"]
    if preroll_timeout_s is None:
        assert abs(gap) < 1.5, f"the slow camera started {gap:.1f} s after the other"
        assert "preroll: 2 camera(s) opened" in err, err[-2000:]
    else:
        assert "preroll: 1 of 2 camera(s) still opening after 1 s (runtime.preroll_timeout_s): slow" in err, err[-2000:]
        assert gap > 1.5, f"the run waited for the slow camera past the preroll's timeout (gap {gap:.1f} s)"
