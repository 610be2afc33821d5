"""engine.kind triton against a real Triton Inference Server (PyTriton's bundled tritonserver, started
here from .venv-triton) serving the repository `run.py export-triton` writes: the same detections as
the onnxruntime engine, one-line errors when the server or model is missing, a server killed mid-run
and started again (the run recovers, counts every frame it lost and publishes none twice), a server
that hangs (requests time out; a live camera keeps its newest frames meanwhile)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import MODEL, PERSON_CLIP, ROOT, Subscriber, cut_clip, engine_fps, free_port, make_config, run_and_collect, \
    run_cli, small_clip, start_cli

sys.path.insert(0, str(ROOT / "scripts"))
from pytriton_server import PyTritonServer  # noqa: E402

TOKEN = "test-token"  # PyTriton guards the shared-memory API with this header; the engine sends it from config
HEADERS = {"triton-grpc-protocol-triton-access-token": TOKEN}
MODEL_NAME = "yolox_nano"
CLIP_FRAMES = 120  # the equality check: people walking through, in a time a slow machine affords


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """What a user does first: export the demo config's model as a Triton model repository."""
    tmp = tmp_path_factory.mktemp("triton-repo")
    config, _ = make_config(tmp, [{"id": "cam1", "url": str(PERSON_CLIP)}], engine={"max_batch": 4, "lanes": 2})
    result = run_cli("export-triton", "--config", str(config), "--out", str(tmp / "models"))
    assert result.returncode == 0, result.stderr
    assert f"model '{MODEL_NAME}'" in result.stdout
    return tmp / "models"


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    reason = PyTritonServer.unavailable()
    if reason:
        pytest.skip(f"no Triton test server: {reason}")
    server = PyTritonServer(repository, MODEL_NAME, tmp_path_factory.mktemp("pytriton"), token=TOKEN)
    server.start_retrying(timeout=90)
    yield server
    server.stop()


def triton_engine(server, **triton) -> dict:
    return {"kind": "triton", "max_batch": 4, "lanes": 2,
            "triton": {"url": server.url, "headers": HEADERS, "shared_memory": "system", **triton}}


@pytest.mark.parametrize("triton, expected", [
    ({"url": "grpc://127.0.0.1:8001"}, "engine.triton.url: Value error, expected the server's gRPC endpoint as HOST:PORT"),
    ({"url": "127.0.0.1:70000"}, "engine.triton.url: Value error, expected the server's gRPC endpoint as HOST:PORT"),
    ({"headers": {"Authorization": "x"}}, "engine.triton.headers.Authorization.[key]: String should match pattern"),
    ({"backoff_base_s": 9, "backoff_cap_s": 1}, "engine.triton: Value error, backoff_base_s (9.0) is above backoff_cap_s"),
    ({"shared_memory": "cuda"}, "engine.triton.shared_memory: Input should be 'auto', 'system' or 'none'"),
    ({"retries": 3}, "engine.triton.retries: unknown key"),
])
def test_config_mistakes_are_one_line(tmp_path, triton, expected):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    path, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP)}], engine={"kind": "triton", "triton": triton})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)


def test_export_writes_a_repository_triton_understands(repository):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from pipeline.model import prepare_model

    config = text_format.Parse((repository / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (MODEL_NAME, "onnxruntime", 4)
    assert config.HasField("dynamic_batching")
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_CPU")]
    (image,) = config.input
    assert (image.name, model_config_pb2.DataType.Name(image.data_type), list(image.dims)) == \
        ("images_u8", "TYPE_UINT8", [416, 416, 3])
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [3549, 85])]
    # the graph served is the prepared one: uint8 NHWC in, preprocessing inside
    assert (repository / MODEL_NAME / "1" / "model.onnx").read_bytes() == prepare_model(MODEL, "yolox", 4).onnx_bytes


def _tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed: the plan variant is built instead")
def test_tensorrt_variant_without_tensorrt_is_one_line_exit_2(tmp_path):
    config, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP)}])
    result = run_cli("export-triton", "--config", str(config), "--out", str(tmp_path / "models"), "--tensorrt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: export-triton --tensorrt: TensorRT is not installed")
    assert (tmp_path / "models" / MODEL_NAME / "1" / "model.onnx").is_file()  # the onnxruntime model is there


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _tensorrt_installed(), reason="TensorRT is not installed")
def test_tensorrt_variant_is_a_plan_for_the_tensorrt_backend(tmp_path):
    import tensorrt as trt
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP)}],
                            engine={"fp16": True, "plan_cache_dir": str(tmp_path / "plans")})
    result = run_cli("export-triton", "--config", str(config), "--out", str(tmp_path / "models"), "--tensorrt", timeout=900)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / f"{MODEL_NAME}_tensorrt"
    parsed = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (parsed.backend, parsed.max_batch_size) == ("tensorrt", 4)
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in parsed.instance_group] == ["KIND_GPU"]
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((folder / "1" / "model.plan").read_bytes())
    assert engine is not None and engine.num_optimization_profiles == 1
    assert tuple(engine.get_tensor_profile_shape("images_u8", 0)[2]) == (4, 416, 416, 3)


def test_detections_equal_the_onnxruntime_engine(server, tmp_path):
    clip = cut_clip(PERSON_CLIP, tmp_path / "people.mp4", 200, CLIP_FRAMES)
    results = {}
    for kind in ("onnxruntime", "triton"):
        engine = triton_engine(server) if kind == "triton" else {"kind": "onnxruntime"}
        # the served model is square (export-triton), so the onnxruntime run letterboxes the same way
        path, config = make_config(tmp_path, [{"id": "cam1", "url": str(clip)}], name=f"{kind}.yaml", engine=engine,
                                   publish={"wait_subscribers": 1, "wait_timeout_s": 20},
                                   model={"letterbox": "square"})
        summary = tmp_path / f"{kind}.json"
        code, messages, err = run_and_collect(path, config["publish"]["bind"], b"det/cam1/", "--summary-json", str(summary))
        assert code == 0, err
        assert messages[-1][1]["reason"] == "eof"
        results[kind] = {m["frame"]: m["detections"] for _, m in messages if m["type"] == "detections"}
        assert json.loads(summary.read_text())["stages"]["infer"]["drops"] == {}
    assert "triton: model 'yolox_nano'" in err and "system shared memory" in err  # the zero-copy path ran
    reference, served = results["onnxruntime"], results["triton"]
    assert sorted(served) == sorted(reference) == list(range(CLIP_FRAMES))
    # the same graph in the same ONNX Runtime build, one thread a call on both sides (its outputs do not
    # depend on the batch an image is in): identical detections, not merely close ones
    differ = [frame for frame in reference if served[frame] != reference[frame]]
    assert not differ, f"frame {differ[0]}: {served[differ[0]]} != {reference[differ[0]]} ({len(differ)} frames differ)"
    assert sum(len(d) for d in reference.values()) > CLIP_FRAMES // 2  # people really were in the frames compared


def test_server_or_model_missing_at_start_is_one_line_exit_2(server, tmp_path):
    nobody = {"kind": "triton", "triton": {"url": f"127.0.0.1:{free_port()}", "connect_timeout_s": 2}}
    path, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP)}], name="down.yaml", engine=nobody)
    result = run_cli("--config", str(path), "--check", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "INFO" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: engine.triton.url: no Triton server answers at 127.0.0.1:"), \
        result.stderr
    wrong = triton_engine(server, model_name="no_such_model")
    path, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP)}], name="model.yaml", engine=wrong)
    result = run_cli("--config", str(path), "--check", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "INFO" not in line]
    assert len(lines) == 1 and "engine.triton.model_name" in lines[0] and "'no_such_model'" in lines[0], result.stderr


def test_frozen_server_times_out_and_each_frame_is_published_once(server, tmp_path):
    """A server that stops answering (SIGSTOP: a hung host) must not hang the run: requests time out
    and are retried. The server then works through the requests the client gave up on as well, so
    the same batch is answered twice; it must be published once."""
    frames = 100
    clip = cut_clip(PERSON_CLIP, tmp_path / "frozen.mp4", 200, frames)
    # a timeout well above a batch's time on this machine now: only the freeze makes requests time out
    timeout_s = round(max(1.0, 6 * 4 / engine_fps()), 1)
    engine = triton_engine(server, request_timeout_s=timeout_s, retry_s=60, backoff_base_s=0.1, backoff_cap_s=0.5)
    path, config = make_config(tmp_path, [{"id": "cam1", "url": str(clip)}], engine=engine,
                               publish={"wait_subscribers": 1, "wait_timeout_s": 20})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam1/"])
    process = start_cli("--config", str(path), "--summary-json", str(summary))
    try:
        assert len(subscriber.collect(lambda ms: len(ms) >= 12, timeout=120)) >= 12
        server.freeze()
        time.sleep(timeout_s + 3)  # past the requests' timeout
        server.thaw()
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=240)
        _, err = process.communicate(timeout=60)
    finally:
        server.thaw()
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err
    assert "not answering (Deadline Exceeded)" in err and "answers again" in err, err[-2000:]
    detections = [m for _, m in messages if m["type"] == "detections"]
    assert [m["frame"] for m in detections] == list(range(frames))  # every frame once, in order
    assert json.loads(summary.read_text())["stages"]["infer"]["drops"] == {}


def test_live_camera_keeps_its_newest_frames_while_the_server_hangs(server, tmp_path):
    """While the server does not answer, a live camera must not queue a backlog: its oldest frames are
    dropped (counted), and once the server answers again the frames published are current ones."""
    fps = max(2, min(10, int(engine_fps() / 3)))  # well below what this machine infers now: every gap is the outage's
    clip = small_clip(tmp_path / "live.mp4", 4 * fps, fps)
    engine = triton_engine(server, request_timeout_s=round(max(1.0, 6 * 4 / fps / 3), 1), retry_s=60, backoff_base_s=0.1,
                           backoff_cap_s=0.5)
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(clip), "live": True, "realtime": True, "loop": True}],
                               engine=engine, runtime={"shutdown_deadline_s": 30})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam/"])
    process = start_cli("--config", str(path), "--summary-json", str(summary))
    frozen_s = 5.0
    try:
        assert len(subscriber.collect(lambda ms: len(ms) >= 2 * fps, timeout=120)) >= 2 * fps
        server.freeze()
        time.sleep(frozen_s)
        server.thaw()
        before = len(subscriber.messages)
        subscriber.collect(lambda ms: len(ms) >= before + 3 * fps, timeout=120)
    finally:
        server.thaw()
        process.terminate()
        _, err = process.communicate(timeout=60)
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    frames = [m for _, m in subscriber.messages if m["type"] == "detections"]
    indices = [m["frame"] for m in frames]
    assert indices == sorted(set(indices)), "a frame published twice or out of order"
    # the outage shows as one jump in frame numbers (the frames that went stale), not as a backlog
    jump = max(b - a for a, b in zip(indices, indices[1:]))
    assert jump >= 0.5 * frozen_s * fps, f"no frames skipped over a {frozen_s} s outage at {fps} fps: {indices}"
    stats = json.loads(summary.read_text())
    missing = len(set(range(indices[-1] + 1)) - set(indices))
    counted = stats["cameras"]["cam"]["drops"].get("queue_full", 0) + sum(stats["stages"]["infer"]["drops"].values())
    assert missing <= counted, f"{missing} frames missing, {counted} drops counted: {stats['cameras']['cam']['drops']}"
    assert max(m["latency_ms"]["total"] for m in frames[-fps:]) < 3000, "still working through a backlog"


# Last in the module: it kills and restarts the module's server.
def test_server_killed_mid_run_recovers_and_counts_what_it_lost(server, tmp_path):
    frames = 300
    clip = cut_clip(PERSON_CLIP, tmp_path / "long.mp4", 200, frames)
    # a batch is given up after 2 s of retries: the outage (a restart takes 10-20 s) costs some batches
    engine = triton_engine(server, retry_s=2, backoff_base_s=0.1, backoff_cap_s=0.5, request_timeout_s=10)
    path, config = make_config(tmp_path, [{"id": "cam1", "url": str(clip)}], engine=engine,
                               publish={"wait_subscribers": 1, "wait_timeout_s": 20})
    summary = tmp_path / "summary.json"
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam1/"])
    process = start_cli("--config", str(path), "--summary-json", str(summary))
    try:
        before = subscriber.collect(lambda ms: len(ms) >= 12, timeout=120)
        assert len(before) >= 12, "no detections before the kill"
        server.kill()
        killed_at = len(subscriber.messages)
        time.sleep(1.0)
        server.start_retrying(timeout=90)
        messages = subscriber.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=240)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err
    assert messages[-1][1]["type"] == "end"
    detections = [m for _, m in messages if m["type"] == "detections"]
    published = [m["frame"] for m in detections]
    assert published == sorted(set(published)), "a frame published twice or out of order"
    assert [m["seq"] for m in detections] == list(range(len(detections)))
    stats = json.loads(summary.read_text())
    lost = stats["stages"]["infer"]["drops"].get("engine_unavailable", 0)
    assert stats["cameras"]["cam1"]["frames"] == frames and stats["cameras"]["cam1"]["end_reason"] == "eof"
    assert lost > 0, f"the outage lost nothing: {stats['stages']['infer']}"
    assert len(published) + lost == frames, f"{len(published)} published + {lost} counted lost != {frames} frames"
    assert "not answering" in err and "answers again" in err and "registered" in err
    # recovered: frames after the gap were inferred and published, people detected in them again
    gap_end = max(i for i, (a, b) in enumerate(zip(published, published[1:])) if b - a > 1) + 1
    after = detections[gap_end:]
    assert gap_end >= killed_at - 1 and len(after) > 0
    assert any(d["label"] == "person" for m in after for d in m["detections"])
