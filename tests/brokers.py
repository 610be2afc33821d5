"""Real brokers for the tests: redis-server and mosquitto (Debian packages, installed by scripts/test.sh),
each started on a free port, killable and restartable on the same port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import free_port


def _wait_port(host: str, port: int, process: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}: {process.stderr.read()[-500:] if process.stderr else ''}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


class Broker:
    """A broker process on a fixed port; `kill` (SIGKILL, like a crash) and `start` again on the same port."""

    what = "broker"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", prefix: list[str] = ()):
        self.host, self.port = host, port or free_port()
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", NAME]
        self.process: subprocess.Popen | None = None
        self.folder = tempfile.mkdtemp(prefix=f"vapipe-{self.what}-")

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Broker":
        self.process = subprocess.Popen(self.prefix + self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, cwd=self.folder)
        _wait_port(self.host, self.port, self.process, self.what)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisServer(Broker):
    what = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian package redis-server; see scripts/test.sh)")
        return [binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", self.folder]

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)


class Mosquitto(Broker):
    what = "mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not shutil.os.path.exists(binary):
            pytest.fail("mosquitto is not installed (Debian package mosquitto; see scripts/test.sh)")
        conf = f"{self.folder}/mosquitto.conf"
        with open(conf, "w") as f:
            f.write(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\n")
        return [binary, "-c", conf]


class MqttCollector:
    """A real MQTT subscriber (paho) on a thread: every message with its topic, in arrival order."""

    def __init__(self, url_host: str, port: int, topic: str, qos: int = 1):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{free_port()}")
        subscribed = []
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=qos)
        self.client.on_subscribe = lambda *args: subscribed.append(True)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(url_host, port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not subscribed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert subscribed, "MQTT test subscriber: no SUBACK within 10 s"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
