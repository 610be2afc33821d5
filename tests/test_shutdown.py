"""Shutdown and signals (README: Shutdown and signals), with real processes, real signals and real
ZeroMQ subscribers: no signal, failure or exit may hang a run or lose what it accepted.

One test per way a run used to hang or lose messages (issue 17): Ctrl-C and a systemd stop in
worker mode, a stop while workers start, a killed supervisor, a stage that fails mid-run, a
subscriber that is behind when a run ends, stops during the model load and the subscriber wait,
subscriber counting in worker mode, and subscription notices under load. Cameras loop and are
stopped by signals; every wait is for a condition, with deadlines generous enough for a slow,
busy machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from conftest import ASSETS, PERSON_CLIP, Subscriber, make_config, start_cli, small_clip

CAR_CLIP = ASSETS / "videos" / "car-detection.mp4"  # 377 frames
CAR_FRAMES = 377


class Run:
    """The CLI in a subprocess, its stderr read as it comes (log lines to wait for, worker pids)."""

    def __init__(self, path, *args: str, env: dict | None = None, own_group: bool = False):
        self.process = start_cli("--config", str(path), *args, env=env, own_group=own_group)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        self._reader.join(timeout=5)
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        pytest.fail(f"no {text!r} in the log after {timeout} s:\n" + "\n".join(self.lines[-30:]))

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.process.poll()

    def worker_pids(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := re.search(r"worker \d+/\d+ \(pid (\d+)", line))]

    def close(self) -> None:
        for pid in self.worker_pids():  # never leave a worker behind, whatever the test found
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not: it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def ends(messages) -> set[str]:
    return {m["camera"] for _, m in messages if m["type"] == "end"}


def looping_cameras(count: int) -> list[dict]:
    # paced (10 fps) and looped: light on the CPU, and running until a signal stops them
    return [{"id": f"cam{i}", "url": str(PERSON_CLIP), "loop": True, "realtime": True} for i in range(count)]


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["ctrl-c", "systemd-stop"])
def test_a_stop_that_reaches_every_process_drains_every_worker(tmp_path, how):
    """The terminal's Ctrl-C sends SIGINT to the whole process group; a systemd stop sends SIGTERM
    to every process of the unit. Either way it is one stop: every camera's tail and `end` arrive."""
    path, config = make_config(tmp_path, looping_cameras(2), engine={"lanes": 1},
                               runtime={"workers": 2, "shutdown_deadline_s": 10})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    run = Run(path, own_group=True)
    try:
        seen = subscriber.collect(lambda ms: {m["camera"] for _, m in ms} == {"cam0", "cam1"}, timeout=180)
        assert {m["camera"] for _, m in seen} == {"cam0", "cam1"}, run.stderr
        if how == "ctrl-c":
            os.killpg(run.process.pid, signal.SIGINT)
        else:
            for pid in [run.process.pid, *run.worker_pids()]:
                os.kill(pid, signal.SIGTERM)
        messages = subscriber.collect(lambda ms: ends(ms) == {"cam0", "cam1"}, timeout=120)
        code = run.wait(120)
    finally:
        run.close()
        subscriber.close()
    assert code == 0, run.stderr
    assert ends(messages) == {"cam0", "cam1"}, run.stderr


# 2 -------------------------------------------------------------------------------------------
def test_a_stop_while_workers_are_starting_stops_every_worker(tmp_path):
    path, _ = make_config(tmp_path, looping_cameras(4), engine={"lanes": 1}, runtime={"workers": 4})
    run = Run(path)
    try:
        run.wait_for_line("worker 0/4 (pid")
        run.process.send_signal(signal.SIGTERM)
        code = run.wait(90)
        workers = run.worker_pids()
        assert code is not None, f"still running 90 s after SIGTERM:\n{run.stderr}"
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 30), "a worker outlived its supervisor"
    finally:
        run.close()
    assert code == 0, run.stderr
    assert workers and "exited with" not in run.stderr


# 3 -------------------------------------------------------------------------------------------
def test_workers_exit_when_the_supervisor_is_killed(tmp_path):
    path, config = make_config(tmp_path, looping_cameras(2), engine={"lanes": 1}, runtime={"workers": 2})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    run = Run(path)
    try:
        seen = subscriber.collect(lambda ms: {m["camera"] for _, m in ms} == {"cam0", "cam1"}, timeout=180)
        assert {m["camera"] for _, m in seen} == {"cam0", "cam1"}, run.stderr
        workers = run.worker_pids()
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        run.process.kill()  # as the OOM killer or kill -9 would
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 30), \
            f"workers still running 30 s after their supervisor was killed:\n{run.stderr}"
    finally:
        run.close()
        subscriber.close()


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["letterbox", "infer", "postprocess"])
def test_a_stage_that_fails_mid_run_stops_the_run_and_says_why(tmp_path, stage):
    """A stage stops on a PipelineError (a CudaError in the GPU letterbox or a lane would; here the
    documented fault-injection point): the error is logged at once, the stages after it drain and
    every camera gets its `end`, nothing upstream blocks, the run exits 1 on its own, and every
    frame a camera handed on is either published or counted as dropped."""
    path, config = make_config(tmp_path, looping_cameras(2), engine={"lanes": 2})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    run = Run(path, "--summary-json", str(summary), env={"VAPIPE_FAULT": f"{stage}:3"})
    try:
        messages = subscriber.collect(lambda ms: ends(ms) == {"cam0", "cam1"}, timeout=180)
        code = run.wait(120)
    finally:
        run.close()
        subscriber.close()
    assert code == 1, f"exit code {code}:\n{run.stderr}"
    lines = run.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "fault injected" in errors[0], run.stderr
    failed_at = next(i for i, line in enumerate(lines) if f"stage {stage} failed" in line)
    done_at = next(i for i, line in enumerate(lines) if " done: " in line)
    assert failed_at < done_at, "the error is logged when it happens, not only at exit"
    assert ends(messages) == {"cam0", "cam1"}
    stages = json.loads(summary.read_text())["stages"]
    accepted = sum(s["frames_out"] for name, s in stages.items() if name.startswith("source."))
    dropped = sum(sum(s["drops"].values()) for name, s in stages.items() if not name.startswith("source."))
    assert accepted > 0 and stages[stage]["drops"].get("error", 0) > 0, stages
    assert stages["publish"]["frames_out"] + dropped == accepted, stages


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_a_subscriber_briefly_behind_at_the_end_gets_every_message_and_end(tmp_path, workers):
    """The subscriber reads nothing from before the run starts until a few seconds after its last
    message (or until the process has exited, which it must not do while its queue still holds
    messages): the tail waits in the publisher's queue, and the context's termination must give
    it the linger (30 s here)."""
    # previews of every frame (a viewer's load): megabytes, more than the kernel's socket buffers hold
    preview = {"enabled": True, "max_fps": 120, "width": 640, "jpeg_quality": 95}
    path, config = make_config(tmp_path, [{"id": "cars", "url": str(CAR_CLIP)}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 120, "preview": preview},
                               runtime={"workers": workers, "shutdown_deadline_s": 30})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cars/", b"preview/cars/"], hwm=1, rcvbuf=1024)
    run = Run(path)
    try:
        run.wait_for_line(" done: ", timeout=300)  # the last message is out: still not one read
        run.wait(5)  # briefly behind: 5 s, less if the process exits (losing what it still held)
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=60)
        code = run.wait(90)
    finally:
        run.close()
        subscriber.close()
    assert code == 0, run.stderr
    frames = [m["frame"] for _, m in messages if m["type"] == "detections"]
    assert frames == list(range(CAR_FRAMES)), f"{len(frames)} of {CAR_FRAMES} detections"
    assert messages[-1][1]["type"] == "end"


# 6 -------------------------------------------------------------------------------------------
def test_a_stop_while_workers_load_the_model_is_a_clean_stop(tmp_path):
    path, _ = make_config(tmp_path, looping_cameras(2), engine={"lanes": 1}, runtime={"workers": 2})
    run = Run(path)
    try:
        run.wait_for_line("worker 1/2 (pid")  # both started, neither has its model yet
        run.process.send_signal(signal.SIGTERM)
        code = run.wait(90)
    finally:
        run.close()
    assert code == 0, run.stderr
    assert "exited with" not in run.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stop_ends_the_wait_for_subscribers(tmp_path, workers):
    path, _ = make_config(tmp_path, looping_cameras(2), engine={"lanes": 1},
                          publish={"wait_subscribers": 1, "wait_timeout_s": 120}, runtime={"workers": workers})
    run = Run(path)
    try:
        run.wait_for_line("running ", timeout=180)  # loaded: in the wait (no subscriber will come)
        stopped = time.monotonic()
        run.process.send_signal(signal.SIGTERM)
        code = run.wait(90)
        took = time.monotonic() - stopped
    finally:
        run.close()
    assert code == 0, f"exit code {code} {took:.0f} s after SIGTERM (the wait is 120 s):\n{run.stderr}"


def test_worker_mode_counts_every_subscriber_and_leaves_nothing_in_tmp(tmp_path):
    """Two subscribers of the same topic, connected before the run starts: the workers see that
    topic once (XSUB passes its set on to a late publisher), the supervisor sees both."""
    clip = small_clip(tmp_path / "short.mp4", 20, 20)
    cameras = [{"id": "a", "url": str(clip)}, {"id": "b", "url": str(clip)}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1},
                               publish={"wait_subscribers": 2, "wait_timeout_s": 60}, runtime={"workers": 2})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    subscribers = [Subscriber(config["publish"]["bind"], [b"det/"]) for _ in range(2)]
    run = Run(path, env={"TMPDIR": str(tmp)})
    try:
        received = [s.collect(lambda ms: ends(ms) == {"a", "b"}, timeout=180) for s in subscribers]
        code = run.wait(60)
    finally:
        run.close()
        for subscriber in subscribers:
            subscriber.close()
    assert code == 0, run.stderr
    assert "subscribers after" not in run.stderr, "waited out the timeout: a subscriber was not counted"
    for messages in received:
        for camera in ("a", "b"):
            assert [m["frame"] for _, m in messages if m["camera"] == camera and m["type"] == "detections"] == list(range(20))
    assert list(tmp.glob("vapipe-*")) == [], "a worker-mode run left its folder behind"


# 7 -------------------------------------------------------------------------------------------
def test_subscription_notices_are_read_while_the_publisher_is_busy(tmp_path):
    """A looping, unpaced camera keeps the publisher busy (never idle for long); a subscriber that
    joins mid-run is seen while it is busy (the status line counts the notices read)."""
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(PERSON_CLIP), "loop": True}],
                               engine={"max_batch": 1},  # frames reach the publisher one by one, never a pause
                               publish={"wait_subscribers": 1, "wait_timeout_s": 120},
                               runtime={"shutdown_deadline_s": 60})  # a backlogged pipeline drains slowly here
    summary = tmp_path / "summary.json"
    first = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    second = None
    run = Run(path, "--summary-json", str(summary))
    try:
        assert len(first.collect(lambda ms: len(ms) >= 5, timeout=180)) >= 5, run.stderr
        second = Subscriber(config["publish"]["bind"], [b"det/cam/"])
        assert len(second.collect(lambda ms: len(ms) >= 20, timeout=60)) >= 20
        run.wait_for_line("subscriptions=2 ", timeout=60)  # while the camera still runs: read under load
        run.process.send_signal(signal.SIGTERM)
        code = run.wait(90)
    finally:
        run.close()
        first.close()
        if second is not None:
            second.close()
    assert code == 0, run.stderr
    result = json.loads(summary.read_text())
    assert result.get("subscriptions") == 2, result.get("subscriptions")
    assert not any("send_full" in s["drops"] for s in result["stages"].values())  # a counter that could not count
