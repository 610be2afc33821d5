"""Broker outputs (publish.sinks) against real brokers: redis-server and mosquitto started by the test.

A run's every message lands in the camera's Redis stream and on its MQTT topic, in order; a broker
killed mid-run costs the pipeline nothing (frames per second hold on ZeroMQ), the sink counts its
drops, and messages flow again once the broker is back on its port.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from brokers import Mosquitto, MqttCollector, RedisServer
from conftest import Subscriber, engine_fps, make_config, run_cli, small_clip, start_cli

pytestmark = pytest.mark.usefixtures("assets_present")


@pytest.fixture
def brokers():
    redis_server, mosquitto = RedisServer().start(), Mosquitto().start()
    yield redis_server, mosquitto
    redis_server.close()
    mosquitto.close()


def stream(redis_server: RedisServer, camera: str) -> list[dict]:
    return [json.loads(fields[b"message"]) for _id, fields in redis_server.client().xrange(f"vapipe:det:{camera}")]


def sinks(redis_server, mosquitto, buffer: int = 10_000, qos: int = 1) -> list[dict]:
    return [{"kind": "redis", "url": redis_server.url, "buffer": buffer, "reconnect_cap_s": 0.5},
            {"kind": "mqtt", "url": mosquitto.url, "qos": qos, "buffer": buffer, "reconnect_cap_s": 1}]


def test_every_message_reaches_redis_stream_and_mqtt(tmp_path, brokers):
    redis_server, mosquitto = brokers
    clip = small_clip(tmp_path / "clip.mp4", frames=60, fps=25)
    mqtt = MqttCollector(mosquitto.host, mosquitto.port, "vapipe/det/#")
    config, _ = make_config(tmp_path, [{"id": "cam1", "url": str(clip)}, {"id": "cam10", "url": str(clip)}],
                            publish={"sinks": sinks(redis_server, mosquitto)})
    summary = tmp_path / "summary.json"
    result = run_cli("--config", str(config), "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr[-2000:]
    deadline = time.monotonic() + 10
    while len(mqtt.messages) < 2 * 61 and time.monotonic() < deadline:
        time.sleep(0.05)
    mqtt.close()
    for camera in ("cam1", "cam10"):
        entries = stream(redis_server, camera)
        assert [m["seq"] for m in entries] == list(range(61)), f"{camera}: the stream lost or reordered messages"
        assert [m["type"] for m in entries] == ["detections"] * 60 + ["end"]
        assert entries[-1]["reason"] == "eof"
        assert entries[0]["schema"].startswith("vapipe.detections/1")
        on_topic = [json.loads(payload) for topic, payload in mqtt.messages if topic == f"vapipe/det/{camera}"]
        assert on_topic == entries, f"{camera}: MQTT did not carry the same messages as the stream"
    sink_stats = json.loads(summary.read_text())["sinks"]
    assert set(sink_stats) == {"sinks[0].redis", "sinks[1].mqtt"}
    for stats in sink_stats.values():
        assert stats["sent"] == 122 and stats["drops"] == {} and stats["buffered"] == 0, stats


class Frames:
    """ZeroMQ detections with their arrival times, read on a thread."""

    def __init__(self, endpoint: str):
        self.subscriber = Subscriber(endpoint, [b"det/"])
        self.arrivals: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        socket = self.subscriber.socket
        while not self._stop.is_set():
            if socket.poll(50):
                self.arrivals.append((time.monotonic(), json.loads(socket.recv_multipart()[1])))

    def count(self, start: float, end: float) -> int:
        return sum(1 for t, m in list(self.arrivals) if start <= t < end and m["type"] == "detections")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.subscriber.close()


def test_dead_broker_costs_counted_drops_not_fps(tmp_path, brokers):
    redis_server, mosquitto = brokers
    # a live camera at a rate this machine sustains with room to spare, so a stall would show
    fps = max(4, min(15, round(engine_fps() / 3)))
    clip = small_clip(tmp_path / "live.mp4", frames=50, fps=fps)
    buffer = 2 * fps  # two seconds of messages: a 4 s outage must overflow it
    config, written = make_config(tmp_path, [{"id": "cam1", "url": str(clip), "realtime": True, "live": True,
                                              "loop": True}],
                                  publish={"sinks": sinks(redis_server, mosquitto, buffer=buffer, qos=0)})
    mqtt = MqttCollector(mosquitto.host, mosquitto.port, "vapipe/det/#")
    frames = Frames(written["publish"]["bind"])
    summary = tmp_path / "summary.json"
    process = start_cli("--config", str(config), "--summary-json", str(summary))
    try:
        deadline = time.monotonic() + 60
        while len(stream(redis_server, "cam1")) < 2 * fps and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(stream(redis_server, "cam1")) >= 2 * fps, "no messages reached Redis"
        before_start = time.monotonic()
        time.sleep(3)
        before = frames.count(before_start, time.monotonic())

        redis_server.kill()
        mosquitto.kill()
        outage_start = time.monotonic()
        time.sleep(4)
        outage_end = time.monotonic()
        during = frames.count(outage_start, outage_end)
        rate_before, rate_during = before / 3, during / (outage_end - outage_start)
        assert rate_during >= 0.8 * rate_before, (f"fps fell from {rate_before:.1f} to {rate_during:.1f} "
                                                 "while the brokers were down")

        redis_server.start()  # same port, empty: what arrives now was sent after the restart
        mosquitto.start()
        came_back = time.time()
        deadline = time.monotonic() + 20
        resumed = []
        while time.monotonic() < deadline:
            resumed = [m for m in stream(redis_server, "cam1") if m.get("capture_time", 0) > came_back]
            mqtt_resumed = [p for _t, p in list(mqtt.messages) if json.loads(p)["capture_time"] > came_back]
            if resumed and mqtt_resumed:
                break
            time.sleep(0.1)
        assert resumed, "no message reached Redis after it came back"
        assert mqtt_resumed, "no message reached MQTT after the broker came back"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        frames.close()
        mqtt.close()
    assert process.returncode == 0, err[-2000:]
    stats = json.loads(summary.read_text())["sinks"]
    for name, sink in stats.items():
        lost = sum(sink["drops"].values())
        assert lost >= fps, f"{name}: a 4 s outage with a {buffer}-message buffer must drop messages: {sink}"
        assert sink["drops"].get("buffer_full", 0) >= fps, sink
    assert "sinks[0].redis" in err and "unavailable" in err, "the outage is logged"


def test_unreachable_broker_from_the_start_costs_only_its_messages(tmp_path):
    """No broker at all: the run still ends at its own pace, exit 0, every message counted as not delivered."""
    from conftest import free_port

    clip = small_clip(tmp_path / "clip.mp4", frames=20, fps=25)
    config, _ = make_config(tmp_path, [{"id": "cam1", "url": str(clip)}],
                            publish={"sinks": [{"kind": "redis", "url": f"redis://:secret@127.0.0.1:{free_port()}/0",
                                                "timeout_s": 0.5}]},
                            runtime={"shutdown_deadline_s": 1})
    summary = tmp_path / "summary.json"
    result = run_cli("--config", str(config), "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(summary.read_text())["sinks"]["sinks[0].redis"]
    assert stats["sent"] == 0 and stats["drops"] == {"shutdown": 21}, stats
    assert "sinks[0].redis: redis://***@127.0.0.1" in result.stderr and "secret" not in result.stderr


@pytest.mark.parametrize("sink, error", [
    ({"kind": "kafka", "url": "x"}, "publish.sinks[0]: Input tag 'kafka' found using 'kind' does not match"),
    ({"kind": "mqtt", "url": "mqtt://h", "qos": 3}, "publish.sinks[0].mqtt.qos: Input should be 0, 1 or 2"),
    ({"kind": "redis", "url": "redis://h", "buffer": 0}, "publish.sinks[0].redis.buffer: Input should be greater"),
    ({"kind": "redis", "url": "tcp://h"}, "publish.sinks[0].redis.url: String should match pattern"),
])
def test_sink_config_errors_name_the_key(tmp_path, sink, error):
    config, _ = make_config(tmp_path, [{"id": "cam1", "url": "rtsp://127.0.0.1:1/x"}], publish={"sinks": [sink]})
    result = run_cli("--config", str(config), "--check", timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {config}: {error}"), result.stderr
