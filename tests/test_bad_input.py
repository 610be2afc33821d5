"""Bad input never crashes or hangs: one clear line naming the file/key/camera, the right exit code."""

import socket


from conftest import PERSON_CLIP, Subscriber, free_port, make_config, run_cli


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def write(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "cameras: [\n  - id: a\nmodel: {")
    assert_one_line_error(run_cli("--config", str(path)), 2, str(path), "invalid YAML", "line ")


def test_unknown_key(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP), "fps_limit": 5}])
    assert_one_line_error(run_cli("--config", str(path)), 2, str(path), "cameras[0].fps_limit", "unknown key")


def test_wrong_type(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], engine={"max_batch": "eight"})
    assert_one_line_error(run_cli("--config", str(path)), 2, "engine.max_batch", "integer", "'eight'")


def test_missing_required_key(tmp_path):
    path = write(tmp_path, f"cameras:\n  - id: a\n    url: {PERSON_CLIP}\n")
    assert_one_line_error(run_cli("--config", str(path)), 2, "model", "required")


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("--config", str(tmp_path / "nope.yaml")), 2, "nope.yaml", "not found")


def test_unset_environment_variable(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "a", "url": "rtsp://${CAM_USER_NOT_SET}@127.0.0.1/x"}])
    assert_one_line_error(run_cli("--config", str(path)), 2, "cameras[0].url", "CAM_USER_NOT_SET")


def test_missing_model(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], model={"path": str(tmp_path / "none.onnx")})
    assert_one_line_error(run_cli("--config", str(path)), 2, "model.path", "none.onnx", "not found")


def test_model_that_is_not_onnx(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not a protobuf \x00\xff" * 100)
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], model={"path": str(fake)})
    assert_one_line_error(run_cli("--config", str(path)), 2, "model.path", "model.onnx", "not a readable ONNX model")


def test_labels_that_do_not_match_the_model(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("person\ncar\n")
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], model={"labels": str(labels)})
    assert_one_line_error(run_cli("--config", str(path)), 2, "model.labels", "2 names", "80 classes")


def test_video_that_does_not_exist(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "lobby", "url": str(tmp_path / "missing.mp4")}])
    assert_one_line_error(run_cli("--config", str(path)), 2, "cameras[0].url", "lobby", "missing.mp4", "not found")


def test_file_that_is_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 1000)
    path, _ = make_config(tmp_path, [{"id": "lobby", "url": str(junk)}])
    assert_one_line_error(run_cli("--config", str(path)), 1, "camera lobby", "junk.mp4", "cannot open")


def _run_and_collect(tmp_path, clip, camera="cam"):
    path, config = make_config(tmp_path, [{"id": camera, "url": str(clip)}], publish={"wait_subscribers": 1})
    subscriber = Subscriber(config["publish"]["bind"], [f"det/{camera}/".encode()])
    try:
        result = run_cli("--config", str(path), timeout=120)
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
    assert messages[-1][1]["type"] == "end"
    frames = [m["frame"] for m in detections]
    assert 200 < len(frames) < 1394
    assert frames == list(range(len(frames)))  # everything before the damage, in order


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


def test_publisher_port_in_use(tmp_path):
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], publish={"bind": f"tcp://127.0.0.1:{port}"})
        result = run_cli("--config", str(path), timeout=60)
    assert_one_line_error(result, 1, "publish.bind", f"tcp://127.0.0.1:{port}", "in use")
