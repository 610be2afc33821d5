"""Bad input that still runs: what a user sees when a file is damaged, a URL says file://, or a
single frame loops. Bad input that must be refused (one line, exit 2) is the table in
tests/test_bad_input_table.py.
"""

import json
import re
import signal
import threading
import time


from conftest import PERSON_CLIP, Subscriber, make_config, run_cli, start_cli, small_clip


def _run_and_collect(tmp_path, clip, camera="cam", url=None):
    path, config = make_config(tmp_path, [{"id": camera, "url": url or str(clip)}], publish={"wait_subscribers": 1})
    subscriber = Subscriber(config["publish"]["bind"], [f"det/{camera}/".encode()])
    try:
        result = run_cli("--config", str(path), "--summary-json", str(tmp_path / "summary.json"), timeout=240)
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=10)
    finally:
        subscriber.close()
    return result, [m for _, m in messages if m["type"] == "detections"], messages


def test_truncated_video_publishes_frames_before_the_damage(tmp_path):
    data = PERSON_CLIP.read_bytes()
    clip = tmp_path / "truncated.mp4"
    clip.write_bytes(data[: len(data) * 2 // 5])  # the index (moov) is at the front: 40% of the samples survive
    result, detections, messages = _run_and_collect(tmp_path, clip)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert messages[-1][1]["type"] == "end" and messages[-1][1]["reason"] == "eof"
    frames = [m["frame"] for m in detections]
    assert 200 < len(frames) < 1394
    assert frames == list(range(len(frames)))  # everything before the damage, in order
    # FFmpeg ends such a file without an error: the loss is said, and counted in the summary
    missing = 1394 - len(frames)
    assert f"read {len(frames)} of the 1394 frames the file declares, {missing} missing" in result.stderr
    camera = json.loads((tmp_path / "summary.json").read_text())["cameras"]["cam"]
    assert (camera["frames_declared"], camera["frames_missing"], camera["end_reason"]) == (1394, missing, "eof")


def test_corrupted_middle_is_skipped_and_the_rest_is_processed(tmp_path):
    data = bytearray(PERSON_CLIP.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 40000] = bytes(40000)  # a hole of zeros inside the sample data
    clip = tmp_path / "corrupt.mp4"
    clip.write_bytes(bytes(data))
    result, detections, _ = _run_and_collect(tmp_path, clip)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "undecodable packet skipped" in result.stderr  # the loss is logged and counted
    frames = [m["frame"] for m in detections]
    assert frames == sorted(frames)
    assert len(frames) > 1000  # frames after the hole were decoded and published too
    camera = json.loads((tmp_path / "summary.json").read_text())["cameras"]["cam"]
    assert camera["frames_missing"] == 1394 - len(frames)  # what the hole cost, in the summary
    if camera["frames_missing"] > 0.02 * 1394:
        assert "frames the file declares" in result.stderr


def test_a_file_url_plays_exactly_like_a_path(tmp_path):
    clip = small_clip(tmp_path / "my clip.mp4", 40, 25, size=(192, 108))
    url = "file://" + str(clip).replace(" ", "%20")  # as a browser or file manager writes it
    result, detections, messages = _run_and_collect(tmp_path, clip, url=url)
    assert result.returncode == 0, result.stderr
    assert [m["frame"] for m in detections] == list(range(40))  # no frame dropped, played once, not looped
    assert messages[-1][1]["type"] == "end" and messages[-1][1]["reason"] == "eof"
    camera = json.loads((tmp_path / "summary.json").read_text())["cameras"]["cam"]
    assert (camera["state"], camera["reconnects"], camera["frames_missing"]) == ("ended", 0, 0)


def test_a_looped_single_frame_is_paced_and_a_stopped_camera_says_so(tmp_path):
    """One frame at 2 fps, loop + realtime: two frames a second, not as fast as the CPU goes.
    Also: a wildcard port is logged as the port it got, and a camera ended by a signal sends an
    end message with reason "stopped", not "eof"."""
    clip = small_clip(tmp_path / "still.mp4", 1, 2, size=(192, 108))
    path, _ = make_config(tmp_path, [{"id": "still", "url": str(clip), "loop": True, "realtime": True}],
                          publish={"bind": "tcp://127.0.0.1:*"})
    process = start_cli("--config", str(path))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    subscriber = None
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline and process.poll() is None:
            found = [re.search(r"publishing on tcp://127\.0\.0\.1:(\d+)", line) for line in list(lines)]
            port = next((m.group(1) for m in found if m), None)
            time.sleep(0.1)
        assert port, "".join(lines)
        subscriber = Subscriber(f"tcp://127.0.0.1:{port}", [b"det/still/"])
        assert subscriber.collect(lambda ms: len(ms) >= 1, timeout=60), "".join(lines)
        started = time.monotonic()
        subscriber.collect(lambda ms: False, timeout=4.0)
        window = time.monotonic() - started
        process.send_signal(signal.SIGTERM)
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=60)
        assert process.wait(60) == 0, "".join(lines)
    finally:
        process.kill()
        if subscriber is not None:
            subscriber.close()
    frames = [m for _, m in messages if m["type"] == "detections"]
    indices = [m["frame"] for m in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # every loop published, in order
    assert len(frames) - 1 <= 2 * window + 3, f"{len(frames) - 1} frames in {window:.1f} s: not paced"
    assert len(frames) - 1 >= 3, "the single frame loops"
    assert messages[-1][1]["type"] == "end" and messages[-1][1]["reason"] == "stopped"


def test_a_camera_cut_off_by_a_failure_gets_no_ordinary_end(tmp_path):
    """Only a file read to its end gets reason "eof"; when the run fails, the others are cut off."""
    from pipeline.config import load_config
    from pipeline.errors import SourceError
    from pipeline.graph import Pipeline

    path, _ = make_config(tmp_path, [{"id": "good", "url": str(PERSON_CLIP)}, {"id": "other", "url": str(PERSON_CLIP)}])
    pipeline = Pipeline(load_config(path))
    try:
        good, other = pipeline.sources
        good.end_reason = "eof"  # as after reading its file to the end
        other.end_reason = "stopped"  # stopped by the run
        assert (pipeline.end_reason("good"), pipeline.end_reason("other")) == ("eof", "stopped")
        other.failure, other.end_reason = SourceError("camera other: cannot open"), "failed"
        assert (pipeline.end_reason("good"), pipeline.end_reason("other")) == ("eof", "failed")
        good.end_reason = "stopped"  # cut off mid-file because the other camera failed
        assert pipeline.end_reason("good") == "failed"
    finally:
        pipeline.socket.close(0)
