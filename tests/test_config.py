"""Configuration: defaults, interpolation, paths, and the checks a typo runs into."""

from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError

BASE = {"cameras": [{"id": "cam1", "url": "clip.mp4"}], "model": {"path": "m.onnx", "preset": "yolox"}}


def test_defaults_and_relative_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cameras:\n  - id: cam1\n    url: clip.mp4\nmodel: {path: m.onnx, preset: yolox}\n")
    config = load_config(path)
    assert config.cameras[0].url == str(tmp_path / "clip.mp4")
    assert config.model.path == tmp_path / "m.onnx"
    assert not config.cameras[0].is_live and config.cameras[0].rtsp_transport == "tcp"
    assert config.engine.kind == "onnxruntime" and config.publish.bind.startswith("tcp://127.0.0.1")


def test_env_interpolation_with_default(monkeypatch):
    monkeypatch.setenv("CAM_PASS", "s3cret")
    data = {**BASE, "cameras": [{"id": "c", "url": "rtsp://admin:${CAM_PASS}@${CAM_HOST:-10.0.0.9}/s"}]}
    config = parse_config(data, "x.yaml")
    assert config.cameras[0].url == "rtsp://admin:s3cret@10.0.0.9/s"
    assert config.cameras[0].is_live


@pytest.mark.parametrize("change,message", [
    ({"cameras": []}, "cameras: List should have at least 1 item"),
    ({"cameras": [{"id": "a/b", "url": "x"}]}, "cameras[0].id: String should match pattern"),
    ({"cameras": [{"id": "a", "url": "x"}, {"id": "a", "url": "y"}]}, "camera id 'a' is used twice"),
    ({"model": {"path": "m", "preset": "yolov9"}}, "model.preset: Input should be"),
    ({"engine": {"max_batch": 0}}, "engine.max_batch: Input should be greater than or equal to 1"),
    ({"cameras": [{"id": "a", "url": "x", "rtsp_transport": "http"}]}, "cameras[0].rtsp_transport"),
    ({"cameras": [{"id": "a", "url": "ftp://h/x.mp4"}]}, "cameras[0].url: Value error, unsupported URL scheme 'ftp'"),
    ({"runtime": {"host_slots": 10**7}}, "runtime.host_slots: Input should be less than or equal to 64"),
    ({"runtime": {"workers": 257}}, "runtime.workers: Input should be less than or equal to 256"),
    ({"runtime": {"start_timeout_s": 0}}, "runtime.start_timeout_s: Input should be greater than 0"),
    ({"runtime": {"worker_silence_s": "soon"}}, "runtime.worker_silence_s: Input should be a valid number"),
    ({"model": {"path": "m", "preset": "yolox", "classes": []}}, "model.classes: List should have at least 1 item"),
    ({"engine": {"kind": "torch", "fp16_exact": True}}, "engine: Value error, fp16_exact rewrites the torch engine's fp16"),
    ({"engine": {"kind": "tensorrt", "fp16": True, "fp16_exact": True}}, "engine: Value error, fp16_exact rewrites"),
])
def test_mistakes_name_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        parse_config({**BASE, **change}, "cfg.yaml")
    assert str(error.value).startswith("cfg.yaml: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_file_url_is_a_file_path():
    config = parse_config({**BASE, "cameras": [{"id": "a", "url": "file:///videos/my%20clip.mp4"}]}, "cfg.yaml")
    assert config.cameras[0].url == "/videos/my clip.mp4"
    assert config.cameras[0].is_file and not config.cameras[0].is_live


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["a"], "cfg.yaml")


def test_the_server_example_config_is_valid(monkeypatch):
    monkeypatch.setenv("CAM_USER", "u")
    monkeypatch.setenv("CAM_PASS", "p")
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "server.yaml")
    assert config.letterbox_on_gpu and config.runtime.workers == 1
    assert all(camera.decoder == "nvdec" for camera in config.cameras)


def test_nvdec_needs_a_gpu_engine():
    data = {"cameras": [{"id": "a", "url": "rtsp://h/s", "decoder": "nvdec"}], "model": {"path": "m.onnx", "preset": "yolox"}}
    with pytest.raises(ConfigError, match=r"^c.yaml: cameras\[0\].decoder: nvdec needs a GPU engine"):
        parse_config(data, "c.yaml")
    data["engine"] = {"kind": "torch"}
    assert parse_config(data, "c.yaml").letterbox_on_gpu
    data["runtime"] = {"letterbox_device": "cpu"}  # NVDEC's frames never reach the host: refused, not failing per batch
    with pytest.raises(ConfigError, match=r"^c.yaml: runtime.letterbox_device: cpu cannot letterbox NVDEC frames"):
        parse_config(data, "c.yaml")


def test_a_many_gpu_host_gets_its_workers():
    """4 GPUs x 144 cameras at 8 a worker is 72 workers (the cap was 64, which stopped the 4-GPU load run)."""
    config = parse_config({**BASE, "runtime": {"workers": 72, "worker_devices": [0, 1, 2, 3]}}, "cfg.yaml")
    assert config.runtime.workers == 72 and config.runtime.worker_devices == [0, 1, 2, 3]
    assert config.runtime.start_timeout_s == 600 and config.runtime.worker_silence_s == 15  # generous defaults


def test_fp16_exact_is_off_by_default_and_needs_torch_fp16():
    assert not parse_config(BASE, "c.yaml").engine.fp16_exact  # not yet run on a GPU
    config = parse_config({**BASE, "engine": {"kind": "torch", "fp16": True, "fp16_exact": True}}, "c.yaml")
    assert config.engine.fp16_exact
