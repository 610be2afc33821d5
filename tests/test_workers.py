"""Worker processes (`runtime.workers`): one config and one endpoint, cameras spread over processes.

Real processes, a real ZeroMQ proxy and subscriber, the real model: every camera's frames arrive
in order through the supervisor's endpoint, the same clip gives the same detections in two
different workers, a failing worker stops the run with a non-zero exit that names it, a
signal drains every worker, the workers start together, and a silent worker is named.
"""

import json
import os
import re
import signal
import threading
import time
import urllib.request

from conftest import PERSON_CLIP, SHORT_FRAMES, Subscriber, first_frames, free_port, make_config, start_cli
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


def _read_stderr(process) -> tuple[list[str], threading.Thread]:
    """The run's stderr lines as they come (a thread reads them into the list)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    return lines, reader


def test_a_failing_worker_stops_the_run_and_is_named(tmp_path):
    """A worker that dies mid-run (killed, as the OOM killer would) stops the others; the run exits
    non-zero naming it, and the cameras cut off get no ordinary ("eof") end. An unreadable file
    cannot be the cause any more: files are probed before any worker starts (test_bad_input_table)."""
    cameras = [{"id": "good", "url": str(PERSON_CLIP), "loop": True}, {"id": "doomed", "url": str(PERSON_CLIP), "loop": True}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, runtime={"workers": 2})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path))
    lines, reader = _read_stderr(process)
    try:
        # both workers publish, then worker 1 (camera doomed) is killed
        subscriber.collect(lambda ms: {m["camera"] for _, m in ms} == {"good", "doomed"}, timeout=180)
        pid = next(int(m.group(1)) for m in (re.search(r"worker 1/2 \(pid (\d+)", line) for line in list(lines)) if m)
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        returncode = process.wait(120)
        messages = subscriber.collect(lambda ms: False, timeout=2)  # what the worker sent before it exited
    finally:
        process.kill()
        subscriber.close()
    reader.join(10)
    err = "".join(lines)
    assert returncode != 0, err
    assert "Traceback" not in err
    assert "worker 1 (cameras doomed) exited with -9" in err, err
    assert time.monotonic() - started < 100  # the looping camera's worker was stopped, not waited for
    # worker 0 drains and says why camera good ended (or, past its shutdown deadline, says nothing)
    ends = [m for _, m in messages if m["type"] == "end"]
    assert {m["camera"] for m in ends} <= {"good"} and all(m["reason"] != "eof" for m in ends), ends


def test_sigterm_drains_every_worker(tmp_path):
    cameras = [{"id": f"cam{i}", "url": str(PERSON_CLIP), "loop": True, "realtime": True} for i in range(3)]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, runtime={"workers": 3})
    every_camera = {"cam0", "cam1", "cam2"}
    returncode, messages, err = _run_until_ends(path, config["publish"]["bind"], 3,
                                                signal_after=lambda ms: {m["camera"] for _, m in ms} == every_camera)
    assert returncode == 0, err
    assert {m["camera"] for _, m in messages if m["type"] == "end"} == every_camera


def _two_workers_one_slow(tmp_path, short_clips, delay_s: float, slow_decoder: bool = False,
                          **runtime) -> tuple[list, str, dict]:
    """Cameras a and b on workers 0 and 1, worker 1 `delay_s` slow through a test-only hook: it says ready
    that late (VAPIPE_TEST_READY_DELAY) or, with `slow_decoder`, its camera b's decoder is that slow to
    open (VAPIPE_TEST_DECODER_START_DELAY). The messages until both cameras end, the run's stderr, and
    its summary's `start` record."""
    hook = ({"VAPIPE_TEST_DECODER_START_DELAY": f"b={delay_s:g}"} if slow_decoder
            else {"VAPIPE_TEST_READY_DELAY": f"1:{delay_s:g}"})
    people, bottles = short_clips
    cameras = [{"id": "a", "url": str(people)}, {"id": "b", "url": str(bottles)}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, publish={"wait_subscribers": 1, "wait_timeout_s": 60},
                               runtime={"workers": 2, **runtime})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path), "--summary-json", str(summary),
                        env=hook)
    try:
        messages = subscriber.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == 2, timeout=240, process=process)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err
    return messages, err, json.loads(summary.read_text())["start"]


def test_workers_start_together_once_the_slowest_is_ready(tmp_path, short_clips):
    """Worker 1 says ready 6 s after worker 0 (the test-only hook stands in for a worker loading
    compiled artifacts on a starved host): no camera's first frame is captured before the last
    worker said ready, so no camera builds a backlog while the others load."""
    messages, err, start = _two_workers_one_slow(tmp_path, short_clips, 6)
    assert start["ready_at"]["1"] - start["ready_at"]["0"] > 2, start  # the hook made worker 1 the slow one
    assert re.search(r"all 2 workers ready in [\d.]+ s \(slowest: worker 1, [\d.]+ s\)", err), err
    last_ready = max(start["ready_at"].values())
    first = first_frames(messages)
    assert set(first) == {"a", "b"}
    assert all(captured > last_ready for captured in first.values()), (first, start)


def test_a_worker_prerolls_its_cameras_before_it_says_ready(tmp_path, short_clips):
    """Camera b's decoder takes 5 s to open (NVDEC with a hundred cameras opening at once after the go
    took 20-76 s on a 4-GPU host): its worker opens it and holds its first frame before saying ready
    (runtime.preroll_timeout_s), so both cameras start together at the go instead of b 5 s late while a
    runs ahead."""
    messages, err, start = _two_workers_one_slow(tmp_path, short_clips, 5, slow_decoder=True)
    assert start["ready_at"]["1"] - start["ready_at"]["0"] > 3, start  # the opening is inside worker 1's ready
    first = first_frames(messages)
    assert set(first) == {"a", "b"}
    assert abs(first["a"] - first["b"]) < 1.5, first
    assert "preroll: 1 camera(s) opened" in err, err[-3000:]


def test_subscribers_get_the_whole_wait_once_the_workers_are_ready(tmp_path, short_clips):
    """publish.wait_timeout_s counts from the workers' ready, as in one process it counts from the
    engine's load: worker 1 loads for 20 s (the test-only hook), the wait is 10 s, and a subscriber
    that connects just after the workers are ready still gets every frame of both cameras. (The wait
    counted from the supervisor's start ran out while the workers loaded, and the run began with no
    subscriber.)"""
    people, bottles = short_clips
    cameras = [{"id": "a", "url": str(people)}, {"id": "b", "url": str(bottles)}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, publish={"wait_subscribers": 1, "wait_timeout_s": 10},
                               runtime={"workers": 2})
    process = start_cli("--config", str(path), env={"VAPIPE_TEST_READY_DELAY": "1:20"})
    lines, reader = _read_stderr(process)
    subscriber = None
    try:
        deadline = time.monotonic() + 240
        while not any("workers ready" in line for line in list(lines)) and time.monotonic() < deadline:
            time.sleep(0.1)
        subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
        messages = subscriber.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == 2, timeout=240, process=process)
        returncode = process.wait(60)
    finally:
        process.kill()
        if subscriber is not None:
            subscriber.close()
    reader.join(10)
    err = "".join(lines)
    assert returncode == 0, err
    assert "starting anyway" not in err, err
    for camera in ("a", "b"):
        frames = [m["frame"] for _, m in messages if m["type"] == "detections" and m["camera"] == camera]
        assert frames == list(range(SHORT_FRAMES)), (camera, frames, err[-2000:])


def test_past_the_start_timeout_the_ready_workers_start(tmp_path, short_clips):
    """Worker 1 is ready 20 s late, runtime.start_timeout_s is 6: a warning names it, worker 0's
    camera starts without it, and worker 1's camera starts when it is ready; both play to the end."""
    messages, err, start = _two_workers_one_slow(tmp_path, short_clips, 20, start_timeout_s=6)
    assert re.search(r"workers not ready after 6 s \(runtime.start_timeout_s\): worker\(s\) (0 \(cameras a\), )?"
                     r"1 \(cameras b\); starting the ready ones", err), err
    ready_at = start["ready_at"]
    frames: dict[str, list] = {"a": [], "b": []}
    for _, message in messages:
        if message["type"] == "detections":
            frames[message["camera"]].append(message)
    assert frames["a"][0]["capture_time"] < ready_at["1"]  # worker 0 did not wait for worker 1
    assert [m["frame"] for m in frames["a"]] == [m["frame"] for m in frames["b"]] == list(range(SHORT_FRAMES))


def test_a_silent_worker_is_named_and_shows_where_it_was(tmp_path):
    """A worker stopped (SIGSTOP) for longer than runtime.worker_silence_s: one warning names it, its
    pid and its cameras; once it runs again its threads' stacks reach the log and the supervisor says
    it speaks again; it is not killed, and the run still drains and exits 0."""
    cameras = [{"id": "steady", "url": str(PERSON_CLIP), "loop": True, "realtime": True},
               {"id": "frozen", "url": str(PERSON_CLIP), "loop": True, "realtime": True}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1},
                               runtime={"workers": 2, "worker_silence_s": 3, "shutdown_deadline_s": 10,
                                        "metrics_bind": f"127.0.0.1:{free_port()}"})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path), "--summary-json", str(summary))
    lines, reader = _read_stderr(process)
    try:
        subscriber.collect(lambda ms: {m["camera"] for _, m in ms} == {"steady", "frozen"}, timeout=180)
        pid = next(int(m.group(1)) for m in (re.search(r"worker 1/2 \(pid (\d+)", line) for line in list(lines)) if m)
        # each worker's CPU thread pools get its share of the cores (unless the user chose)
        environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
        share = os.environ.get("OMP_NUM_THREADS") or str(max(1, os.cpu_count() // 2))
        assert environ.get("OMP_NUM_THREADS") == share, environ.get("OMP_NUM_THREADS")
        os.kill(pid, signal.SIGSTOP)
        time.sleep(8)
        warned = "".join(lines)
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while "speaks again" not in "".join(lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        url = f"http://{config['runtime']['metrics_bind']}/metrics"
        metrics = urllib.request.urlopen(url, timeout=30).read().decode()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(120)
    finally:
        process.kill()
        subscriber.close()
    reader.join(10)
    err = "".join(lines)
    assert returncode == 0, err
    assert f"worker 1 (pid {pid}, cameras frozen) silent for" in warned, err  # while it was stopped
    assert err.count(f"worker 1 (pid {pid}, cameras frozen) silent for") == 1, err  # one warning a silence
    again = re.search(rf"worker 1 \(pid {pid}\) speaks again after ([\d.]+) s silent", err)
    assert again and float(again.group(1)) > 5, err
    # the stack dump, written by the worker after SIGCONT: every thread, the beat thread among them
    dump = err.find("most recent call first", err.index("cameras frozen) silent for"))
    assert dump > 0 and "in _beat" in err[dump:], err
    assert 'vapipe_worker_silences_total{worker="1"} 1' in metrics, metrics
    silences = json.loads(summary.read_text())["silences"]
    assert [(s["worker"], s["pid"], s["cameras"]) for s in silences if s["worker"] == 1] == [(1, pid, "frozen")]
