"""Worker processes (`runtime.workers`): one config and one endpoint, cameras spread over processes.

Real processes, a real ZeroMQ proxy and subscriber, the real model: every camera's frames arrive
in order through the supervisor's endpoint, the same clip gives the same detections in two
different workers, a failing worker stops the run with a non-zero exit that names it, and a
signal drains every worker.
"""

import signal
import time

from conftest import PERSON_CLIP, SHORT_FRAMES, Subscriber, make_config, run_cli, start_cli
def _run_until_ends(path, endpoint: str, cameras: int, signal_after=None):
    """Start the CLI with a subscriber on every `det/` topic; optionally SIGTERM it once `signal_after`
    is true of the messages; collect until every camera's end message: (exit code, messages, stderr)."""
    subscriber = Subscriber(endpoint, [b"det/"])
    process = start_cli("--config", str(path))
    try:
        if signal_after is not None:
            subscriber.collect(signal_after, timeout=120)
            process.send_signal(signal.SIGTERM)
        messages = subscriber.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == cameras, timeout=240)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    return process.returncode, messages, err


def test_cameras_spread_over_workers_arrive_in_order_on_one_endpoint(tmp_path, short_clips):
    people, bottles = short_clips
    cameras = [{"id": "a", "url": str(people)}, {"id": "b", "url": str(people)}, {"id": "c", "url": str(bottles)}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1},
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60}, runtime={"workers": 2})
    returncode, messages, err = _run_until_ends(path, config["publish"]["bind"], 3)
    assert returncode == 0, err
    assert "worker 0/2" in err and "worker 1/2" in err  # a and c in worker 0, b in worker 1
    frames: dict[str, list] = {"a": [], "b": [], "c": []}
    for _, message in messages:
        if message["type"] == "detections":
            frames[message["camera"]].append(message)
    assert [m["frame"] for m in frames["a"]] == list(range(SHORT_FRAMES))
    assert [m["frame"] for m in frames["b"]] == list(range(SHORT_FRAMES))
    assert [m["frame"] for m in frames["c"]] == list(range(SHORT_FRAMES))
    # the same clip in two processes: the same boxes (the engine is deterministic)
    assert [m["detections"] for m in frames["a"]] == [m["detections"] for m in frames["b"]]
    assert sum(any(d["label"] == "person" for d in m["detections"]) for m in frames["a"]) > SHORT_FRAMES // 2
    assert sum(any(d["label"] == "bottle" for d in m["detections"]) for m in frames["c"]) > 50


def test_a_failing_worker_stops_the_run_and_is_named(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video\x00" * 5000)
    cameras = [{"id": "good", "url": str(PERSON_CLIP), "loop": True}, {"id": "bad", "url": str(broken)}]
    path, _ = make_config(tmp_path, cameras, engine={"lanes": 1}, runtime={"workers": 2})
    started = time.monotonic()
    result = run_cli("--config", str(path), timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "worker 1 (cameras bad) exited with" in result.stderr, result.stderr
    assert "broken.mp4" in result.stderr
    assert time.monotonic() - started < 100  # the looping camera's worker was stopped, not waited for


def test_sigterm_drains_every_worker(tmp_path):
    cameras = [{"id": f"cam{i}", "url": str(PERSON_CLIP), "loop": True, "realtime": True} for i in range(3)]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, runtime={"workers": 3})
    every_camera = {"cam0", "cam1", "cam2"}
    returncode, messages, err = _run_until_ends(path, config["publish"]["bind"], 3,
                                                signal_after=lambda ms: {m["camera"] for _, m in ms} == every_camera)
    assert returncode == 0, err
    assert {m["camera"] for _, m in messages if m["type"] == "end"} == every_camera
