"""Live cameras against a real RTSP server on 127.0.0.1 (tests/rtsp_server.py, GStreamer).

Each test starts what a user starts (the server, the real CLI or the Pipeline), does what happens
to real cameras (the server dies, freezes, never answers; the pipeline or a subscriber is slow)
and checks what a user sees: ZeroMQ messages, the summary JSON, log lines, the exit code.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import zmq

from conftest import PERSON_CLIP, make_config, start_cli

pytestmark = pytest.mark.usefixtures("assets_present")


class Collector:
    """A real SUB socket read on a thread: every header with its arrival time."""

    def __init__(self, endpoint: str, topics: list[bytes] = (b"det/",)):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
        self.messages: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(50):
                parts = self.socket.recv_multipart()
                self.messages.append((time.time(), json.loads(parts[1])))

    def frames(self, camera: str, since: float = 0.0) -> list[dict]:
        return [m for t, m in list(self.messages) if m["camera"] == camera and m["type"] == "detections"
                and m["capture_time"] >= since]

    def wait_for(self, camera: str, since: float = 0.0, count: int = 1, timeout: float = 30.0) -> float | None:
        """Seconds until `count` frames of `camera` captured after `since` arrived, or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if len(self.frames(camera, since)) >= count:
                return time.monotonic() - started
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close(0)


def live_camera(cam_id: str, url: str, **overrides) -> dict:
    camera = {"id": cam_id, "url": url, "open_timeout_s": 2, "read_timeout_s": 2, "stall_timeout_s": 2,
              "reconnect_base_s": 0.2, "reconnect_cap_s": 1.0}
    camera.update(overrides)
    return camera


def stop_cli(proc, timeout: float = 15.0) -> tuple[int, str, float]:
    """SIGTERM the CLI; return its exit code, its stderr and how long it took to exit."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err, time.monotonic() - started


def max_gap(frames: list[dict]) -> float:
    times = [m["publish_time"] for m in frames]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


@pytest.mark.slow
def test_server_killed_and_restarted_five_times(tmp_path, rtsp_server):
    flaky_server = rtsp_server(fps=15)
    healthy_server = rtsp_server(fps=15)
    config, data = make_config(tmp_path, [live_camera("flaky", flaky_server.url()),
                                          live_camera("healthy", healthy_server.url())])
    summary_path = tmp_path / "summary.json"
    collector = Collector(data["publish"]["bind"])
    proc = start_cli("--config", str(config), "--summary-json", str(summary_path))
    try:
        assert collector.wait_for("flaky", count=5) is not None, "flaky camera never delivered"
        assert collector.wait_for("healthy", count=5) is not None, "healthy camera never delivered"
        healthy_from = time.time()
        recoveries = []
        for _cycle in range(5):
            flaky_server.kill()
            time.sleep(1.0)
            flaky_server.start()
            back = time.time()
            recoveries.append(collector.wait_for("flaky", since=back, timeout=10.0))
            time.sleep(0.5)
        healthy_until = time.time()
        code, err, _took = stop_cli(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
    assert code == 0, err[-2000:]
    assert all(r is not None and r < 3.0 for r in recoveries), f"seconds to read again after each return: {recoveries}"
    healthy = [m for m in collector.frames("healthy", healthy_from) if m["capture_time"] <= healthy_until]
    assert len(healthy) > 15 * (healthy_until - healthy_from) * 0.8, "healthy camera lost its rate"
    assert max_gap(healthy) < 0.5, f"healthy camera had a gap of {max_gap(healthy):.2f} s"
    summary = json.loads(summary_path.read_text())
    print(f"recoveries {recoveries} healthy max gap {max_gap(healthy):.3f}s", summary["cameras"])
    assert summary["cameras"]["flaky"]["reconnects"] >= 5
    assert summary["cameras"]["healthy"]["reconnects"] == 0
