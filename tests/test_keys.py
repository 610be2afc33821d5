"""Keys on the publisher (ZeroMQ CURVE): only a subscriber with an admitted key receives anything.

Keys made by the real `run.py keys`, the real CLI publishing, three real SUB sockets: one in the
clear, one with a key pair the publisher does not admit, one with the right keys. Then `run.py
subscribe` with the keys, in one process and through worker processes' proxy, and the key
material never in a log line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import zmq

from conftest import ROOT, engine_fps, make_config, run_cli, small_clip, start_cli


def subscriber(endpoint: str, server_key=None, client_key=None) -> zmq.Socket:
    from pipeline.keys import secure_client

    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    secure_client(socket, server_key, client_key)
    socket.setsockopt(zmq.SUBSCRIBE, b"det/")
    socket.connect(endpoint)
    return socket


def received(socket: zmq.Socket, seconds: float) -> int:
    count, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if socket.poll(int(left * 1000) + 1):
            socket.recv_multipart()
            count += 1
    return count


def test_only_a_subscriber_with_an_admitted_key_receives(tmp_path):
    keys = tmp_path / "keys"
    made = run_cli("keys", "--dir", str(keys), "--client", "viewer")
    assert made.returncode == 0, made.stderr
    stranger = tmp_path / "stranger"  # a well-formed key pair the publisher never admitted
    assert run_cli("keys", "--dir", str(stranger), "--client", "stranger").returncode == 0
    fps = int(max(2, min(10, engine_fps() / 3)))
    clip = small_clip(tmp_path / "paced.mp4", 30, fps)
    path, config = make_config(tmp_path, [{"id": "door", "url": str(clip), "loop": True, "realtime": True}],
                               publish={"keys": {"server": str(keys / "server.key_secret"), "clients": str(keys / "clients")}},
                               runtime={"status_interval_s": 5})
    endpoint = config["publish"]["bind"]
    plain = subscriber(endpoint)
    wrong = subscriber(endpoint, keys / "server.key", stranger / "stranger.key_secret")
    right = subscriber(endpoint, keys / "server.key", keys / "viewer.key_secret")
    process = start_cli("--config", str(path))
    try:
        assert right.poll(120_000), "the subscriber with the right key received nothing"
        right.recv_multipart()
        # the same few seconds for all three: the right one keeps receiving, the others get nothing
        counts = {"right": received(right, 3.0), "plain": received(plain, 0.1), "wrong": received(wrong, 0.1)}
        assert counts["right"] >= 3 and counts["plain"] == 0 and counts["wrong"] == 0, counts
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), "subscribe", "--connect", endpoint, "--count", "2",
                                 "--timeout", "60", "--summary", "--server-key", str(keys / "server.key"),
                                 "--client-key", str(keys / "viewer.key_secret")], capture_output=True, text=True, timeout=90)
        assert result.returncode == 0 and result.stdout.count("door frame=") == 2, result.stderr
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        for socket in (plain, wrong, right):
            socket.close(0)
    assert process.returncode == 0, err[-2000:]
    secrets = [line.split('"')[1] for f in (keys / "server.key_secret", keys / "viewer.key_secret")
               for line in f.read_text().splitlines() if "secret-key" in line]
    assert len(secrets) == 2 and not any(secret in err for secret in secrets)


def test_keys_through_worker_processes(tmp_path):
    """With workers the supervisor's proxy is what subscribers reach: it holds the keys."""
    keys = tmp_path / "keys"
    assert run_cli("keys", "--dir", str(keys)).returncode == 0
    clip = small_clip(tmp_path / "paced.mp4", 30, 5)
    path, config = make_config(tmp_path, [{"id": "door", "url": str(clip), "loop": True, "realtime": True}],
                               engine={"lanes": 1},
                               publish={"keys": {"server": str(keys / "server.key_secret"), "clients": str(keys / "clients")}},
                               runtime={"workers": 1, "status_interval_s": 5})
    endpoint = config["publish"]["bind"]
    plain = subscriber(endpoint)
    right = subscriber(endpoint, keys / "server.key", keys / "client.key_secret")
    process = start_cli("--config", str(path))
    try:
        assert right.poll(180_000), "the subscriber with the right key received nothing"
        message = json.loads(right.recv_multipart()[1])
        assert message["camera"] == "door"
        assert received(plain, 0.5) == 0
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=90)
    finally:
        process.kill()
        plain.close(0), right.close(0)
    assert process.returncode == 0, err[-2000:]


def test_reachable_endpoints_need_keys_or_insecure(tmp_path):
    """Beyond loopback without keys (publisher) or a token (HTTP) is a one-line config error."""
    cameras = [{"id": "door", "url": str(tmp_path / "x.mp4")}]
    path, _ = make_config(tmp_path, cameras, publish={"bind": "tcp://0.0.0.0:5599"})
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: publish.bind: tcp://0.0.0.0:5599 can be reached from other "
                                     "hosts: set publish.keys (make them with `run.py keys`) or publish.insecure: true")
    path, _ = make_config(tmp_path, cameras, runtime={"metrics_bind": "0.0.0.0:9464"})
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2 and "runtime.metrics_bind: 0.0.0.0:9464 can be reached from other hosts" in result.stderr
    path, _ = make_config(tmp_path, cameras, runtime={"metrics_bind": "0.0.0.0:9464", "api_token": "short-secret"})
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2 and "runtime.api_token: Value error, must be 16 to 4096 characters" in result.stderr
    assert "short-secret" not in result.stderr  # never echoed
    clip = small_clip(tmp_path / "clip.mp4", 5, 5)
    path, _ = make_config(tmp_path, [{"id": "door", "url": str(clip)}],
                          publish={"keys": {"server": str(tmp_path / "none.key_secret"), "clients": str(tmp_path)}})
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: publish.keys.server: {tmp_path / 'none.key_secret'}: file not found (make keys with `run.py keys`)")
