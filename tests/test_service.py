"""Operating it as a service: Prometheus metrics, health, and cameras added and removed while others run.

The real CLI in a subprocess, a real HTTP client (urllib) against its HTTP server, real ZeroMQ
subscribers, real clips. What a subscriber received is compared with what /metrics says (parsed
with prometheus-client's own parser); the cameras that keep running through an add, a remove and
a SIGHUP must lose no frame (their frame indexes and seq stay contiguous). Cameras are paced below
the capacity this machine has right now (engine_fps), so the verdict holds on a slow, busy one.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Subscriber, engine_fps, free_port, make_config, small_clip, start_cli

TOKEN = "a-test-token-0123456789"


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 60) -> tuple[int, str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(base: str, process, token: str | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            status, body = http("GET", f"{base}/readyz", token=token, timeout=5)
            if status == 200:
                return json.loads(body)
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail("never ready")


def scrape(base: str, token: str | None = None) -> dict[tuple, float]:
    """/metrics parsed by prometheus-client: (sample name, sorted labels) -> value."""
    status, text = http("GET", f"{base}/metrics", token=token)
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def paced_fps(cameras: int) -> int:
    """Frames a second per paced camera: well below what this machine infers now, 2..10."""
    return int(max(2, min(10, engine_fps() / (3 * cameras))))


def detections(messages, camera: str) -> list[dict]:
    return [m for _, m in messages if m["camera"] == camera and m["type"] == "detections"]


def test_metrics_health_and_api_errors_with_a_token(tmp_path):
    """One run: /metrics counts exactly what a subscriber received, /healthz needs no token and the
    rest do (401), and bad API requests get a 4xx with one clear line."""
    fps = paced_fps(2)
    short = small_clip(tmp_path / "short.mp4", 60, 25)
    paced = small_clip(tmp_path / "paced.mp4", 30, fps)
    port = free_port()
    path, config = make_config(tmp_path, [{"id": "short", "url": str(short)},
                                          {"id": "paced", "url": str(paced), "loop": True, "realtime": True}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60},
                               runtime={"metrics_bind": f"127.0.0.1:{port}", "api_token": TOKEN, "status_interval_s": 5})
    base = f"http://127.0.0.1:{port}"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path))
    try:
        wait_ready(base, process, TOKEN)
        # (a file's end message goes out when the run ends: wait for its frames)
        messages = subscriber.collect(lambda ms: len(detections(ms, "short")) == 60)
        deadline = time.monotonic() + 60
        while json.loads(http("GET", f"{base}/readyz", token=TOKEN)[1])["cameras_not_running"] != {"short": "ended"}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        received = len(detections(subscriber.collect(lambda ms: False, timeout=0.5), "short"))
        assert received == 60
        samples = scrape(base, TOKEN)
        assert samples[("vapipe_published_messages_total", (("camera", "short"), ("kind", "detections")))] == received
        assert samples[("vapipe_camera_frames_total", (("camera", "short"),))] == 60
        assert samples[("vapipe_capture_to_publish_seconds_count", (("camera", "short"),))] == received
        assert samples[("vapipe_camera_state", (("camera", "short"), ("state", "ended")))] == 1
        assert samples[("vapipe_camera_state", (("camera", "paced"), ("state", "running")))] == 1
        assert samples[("vapipe_subscriptions_total", ())] >= 1
        for stage in ("source", "batch", "letterbox", "infer", "postprocess", "publish"):
            assert samples[("vapipe_stage_latency_seconds_count", (("stage", stage),))] > 0, stage
        assert ("vapipe_lanes_busy", ()) in samples and ("vapipe_queue_depth", (("queue", "batched"),)) in samples

        # health: no token for liveness; everything else needs it
        assert http("GET", f"{base}/healthz") == (200, "ok\n")
        for method, where in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/cameras"), ("DELETE", "/cameras/paced")):
            status, body = http(method, base + where, token=None)
            assert status == 401 and "bearer token" in json.loads(body)["error"], (where, body)
            assert http(method, base + where, token="wrong-" + TOKEN)[0] == 401
        ready = json.loads(http("GET", f"{base}/readyz", token=TOKEN)[1])
        assert ready["ready"] and ready["model_loaded"] and ready["cameras_not_running"] == {"short": "ended"}

        # bad requests: 4xx, one line naming what is wrong
        bad = {
            "unknown key": ({"id": "x", "url": str(paced), "fps_limit": 5}, 400, "POST /cameras: fps_limit: unknown key"),
            "bad URL": ({"id": "x", "url": "ftp://cam/1"}, 400, "POST /cameras: url: Value error, unsupported URL scheme 'ftp'"),
            "missing file": ({"id": "x", "url": str(tmp_path / "none.mp4")}, 400, "url: camera x:"),
            "bad id": ({"id": "a b", "url": str(paced)}, 400, "POST /cameras: id: String should match pattern"),
            "duplicate id": ({"id": "paced", "url": str(paced)}, 409, "camera paced: a camera with this id exists already"),
            "not an object": ([1, 2], 400, "POST /cameras: expected a JSON object"),
        }
        for name, (body, status, starts) in bad.items():
            got, text = http("POST", f"{base}/cameras", body, token=TOKEN)
            error = json.loads(text)["error"]
            assert got == status and error.startswith(starts) and "\n" not in error, (name, got, error)
        got, text = http("POST", f"{base}/cameras", b'{"id": "x",', token=TOKEN)
        assert got == 400 and json.loads(text)["error"].startswith("POST /cameras: the body is not JSON"), text
        assert http("DELETE", f"{base}/cameras/nobody", token=TOKEN) == (404, '{"error": "camera nobody: no such camera"}')
        got, text = http("DELETE", f"{base}/cameras/paced", token=TOKEN)  # the last one still running
        assert got == 409 and "last camera" in json.loads(text)["error"], text
        got, text = http("GET", f"{base}/cameras/x/y", token=TOKEN)
        assert got == 404 and "no such endpoint" in text
        assert http("PUT", f"{base}/cameras", {}, token=TOKEN)[0] == 405
        cameras = json.loads(http("GET", f"{base}/cameras", token=TOKEN)[1])["cameras"]
        assert [(c["id"], c["state"]) for c in cameras] == [("short", "ended"), ("paced", "running")]

        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    assert TOKEN not in err


def test_cameras_added_removed_and_reloaded_while_others_run(tmp_path):
    """POST adds a camera, DELETE removes one (its queued frames published, then its end "removed"),
    SIGHUP applies an edited config; the cameras that run throughout lose no frame."""
    fps = paced_fps(4)
    paced = small_clip(tmp_path / "paced.mp4", 30, fps)
    port = free_port()
    camera = {"url": str(paced), "loop": True, "realtime": True}
    path, config = make_config(tmp_path, [{"id": "a", **camera}, {"id": "b", **camera}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60},
                               runtime={"metrics_bind": f"127.0.0.1:{port}", "status_interval_s": 5})
    base = f"http://127.0.0.1:{port}"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])

    def frames_of(camera_id: str, at_least: int):
        return subscriber.collect(lambda ms: len(detections(ms, camera_id)) >= at_least, timeout=120)

    process = start_cli("--config", str(path))
    try:
        wait_ready(base, process)
        frames_of("b", 3)
        status, body = http("POST", f"{base}/cameras", {"id": "c", **camera})
        assert status == 201 and json.loads(body)["id"] == "c", body
        frames_of("c", 3)
        status, body = http("DELETE", f"{base}/cameras/a")
        assert status == 200, body
        removed = json.loads(body)
        messages = subscriber.collect(lambda ms: any(m["type"] == "end" and m["camera"] == "a" for _, m in ms), timeout=60)
        end = next(m for _, m in messages if m["type"] == "end" and m["camera"] == "a")
        assert end["reason"] == "removed"
        got = [m["frame"] for m in detections(messages, "a")]
        assert got == list(range(len(got))) and end["seq"] == len(got)  # every frame its queue accepted
        assert removed["frames"] - 1 <= len(got) <= removed["frames"]  # at most the one refused as it stopped
        # SIGHUP: the file now has b, c (as it was added) and d; a stays removed, d is added
        config["cameras"] = [{"id": "b", **camera}, {"id": "c", **camera}, {"id": "d", **camera}]
        path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        frames_of("d", 3)
        cameras = json.loads(http("GET", f"{base}/cameras")[1])["cameras"]
        assert sorted(c["id"] for c in cameras) == ["b", "c", "d"]
        frames_of("b", len(detections(subscriber.messages, "b")) + 3)  # b still flowing after all that
        process.send_signal(signal.SIGTERM)
        messages = subscriber.collect(lambda ms: {m["camera"] for _, m in ms if m["type"] == "end"} >= {"b", "c", "d"},
                                      timeout=120)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    for camera_id in ("b", "c", "d"):  # ran through the changes: nothing lost, nothing out of order
        got = detections(messages, camera_id)
        assert [m["frame"] for m in got] == list(range(len(got))), camera_id
        assert [m["seq"] for m in got] == list(range(len(got))), camera_id
    assert "SIGHUP: config re-read: added ['d']" in err, err[-3000:]


def test_workers_one_metrics_endpoint_and_new_cameras_on_the_least_loaded(tmp_path):
    fps = paced_fps(4)
    paced = small_clip(tmp_path / "paced.mp4", 30, fps)
    port = free_port()
    camera = {"url": str(paced), "loop": True, "realtime": True}
    path, config = make_config(tmp_path, [{"id": i, **camera} for i in ("a", "b", "c")], engine={"lanes": 1},
                               runtime={"workers": 2, "metrics_bind": f"127.0.0.1:{port}", "status_interval_s": 5})
    base = f"http://127.0.0.1:{port}"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path))
    try:
        ready = wait_ready(base, process, timeout=180)
        assert ready["workers"] == {"0": "up", "1": "up"}
        status, body = http("POST", f"{base}/cameras", {"id": "d", **camera})  # worker 0 has a, c; worker 1 has b
        assert status == 201 and json.loads(body)["worker"] == 1, body
        subscriber.collect(lambda ms: len(detections(ms, "d")) >= 3, timeout=120)
        samples = scrape(base)
        # every metric the sample Grafana dashboard (docs/) plots is served
        dashboard = (ROOT / "docs" / "grafana-dashboard.json").read_text()
        text = http("GET", f"{base}/metrics")[1]
        missing = {name for name in re.findall(r"vapipe_[a-z_]+", dashboard) if f"# TYPE {name}" not in text
                   and f"# TYPE {name.removesuffix('_total').removesuffix('_bucket')}" not in text}
        assert not missing, missing
        assert samples[("vapipe_worker_up", (("worker", "0"),))] == samples[("vapipe_worker_up", (("worker", "1"),))] == 1
        placed = {labels[0][1]: dict(labels)["worker"] for (name, labels) in samples if name == "vapipe_camera_frames_total"}
        assert placed == {"a": "0", "c": "0", "b": "1", "d": "1"}
        assert samples[("vapipe_stage_latency_seconds_count", (("stage", "infer"), ("worker", "1")))] > 0
        cameras = json.loads(http("GET", f"{base}/cameras")[1])["cameras"]
        assert sorted((c["id"], c["worker"]) for c in cameras) == [("a", 0), ("b", 1), ("c", 0), ("d", 1)]
        status, body = http("DELETE", f"{base}/cameras/a")
        assert status == 200 and json.loads(body)["worker"] == 0, body
        messages = subscriber.collect(lambda ms: any(m["type"] == "end" and m["camera"] == "a" for _, m in ms), timeout=60)
        assert next(m for _, m in messages if m["type"] == "end" and m["camera"] == "a")["reason"] == "removed"
        # SIGHUP to the supervisor: the file's cameras become b, c, e (d, added by the API, is not in it)
        config["cameras"] = [{"id": i, **camera} for i in ("b", "c", "e")]
        path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        subscriber.collect(lambda ms: len(detections(ms, "e")) >= 3, timeout=120)
        cameras = json.loads(http("GET", f"{base}/cameras")[1])["cameras"]
        assert sorted((c["id"], c["worker"]) for c in cameras) == [("b", 1), ("c", 0), ("e", 0)]  # d went, e on the emptier
        process.send_signal(signal.SIGTERM)
        messages = subscriber.collect(lambda ms: {m["camera"] for _, m in ms if m["type"] == "end"} >= {"a", "b", "c", "d", "e"},
                                      timeout=120)
        _, err = process.communicate(timeout=90)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    for camera_id in ("b", "c", "d"):
        got = [m["frame"] for m in detections(messages, camera_id)]
        assert got == list(range(len(got))), camera_id


def test_a_camera_added_while_the_run_waits_for_subscribers_starts_once(tmp_path):
    """POST /cameras before the stages start (the run waits for its subscriber; a worker waits for the
    others): the camera joins and starts with the rest, once. Starting it there too ran two decoders
    on one camera: duplicated frame numbers, or a worker killed by SIGSEGV."""
    paced = small_clip(tmp_path / "paced.mp4", 30, paced_fps(2))
    late = small_clip(tmp_path / "late.mp4", 40, 25)
    port = free_port()
    path, config = make_config(tmp_path, [{"id": "paced", "url": str(paced), "loop": True, "realtime": True}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 120},
                               runtime={"metrics_bind": f"127.0.0.1:{port}"})
    base = f"http://127.0.0.1:{port}"
    process = start_cli("--config", str(path))
    subscriber = None
    try:
        deadline = time.monotonic() + 120
        while True:  # the model loaded: the run now waits for its subscriber, stages not started
            assert process.poll() is None and time.monotonic() < deadline, "never waited for a subscriber"
            try:
                if json.loads(http("GET", f"{base}/readyz", timeout=5)[1]).get("model_loaded"):
                    break
            except (urllib.error.URLError, ConnectionError, ValueError):
                pass
            time.sleep(0.2)
        status, body = http("POST", f"{base}/cameras", {"id": "late", "url": str(late)})
        assert status == 201, body
        subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
        # a file's end message goes out when the run ends: its 40 frames, then the stop
        messages = subscriber.collect(lambda ms: len(detections(ms, "late")) >= 40, timeout=120)
        time.sleep(1.0)  # a duplicated decoder would still be publishing
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        messages = subscriber.collect(lambda ms: False, timeout=0.5)  # everything received so far
    finally:
        process.kill()
        if subscriber is not None:
            subscriber.close()
    assert process.returncode == 0, err[-2000:]
    frames = [m["frame"] for m in detections(messages, "late")]
    assert frames == list(range(40)), frames
