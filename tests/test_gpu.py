"""The GPU data path: lanes, pinned slots, the PyTorch and TensorRT engines.

GPU tests run on a machine with CUDA (`pytest -m gpu`) and skip cleanly elsewhere; TensorRT tests
run only where `tensorrt` imports. The import test runs everywhere: the CPU install must not need
CUDA to load the GPU modules.
"""

import importlib

import numpy as np
import pytest

from conftest import MODEL, PERSON_CLIP, make_config, run_and_collect, run_cli
from reference import unmatched


def _gpu_ready() -> bool:
    try:
        from pipeline import cuda

        import torch  # noqa: F401
        import onnx2torch  # noqa: F401
    except Exception:
        return False
    return cuda.available()


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs an NVIDIA GPU with cuda-python, torch and onnx2torch")


def test_gpu_modules_import_without_cuda():
    for name in ("pipeline.cuda", "pipeline.lanes", "engines.torch_engine", "engines.tensorrt_engine"):
        importlib.import_module(name)


def test_tensorrt_missing_is_one_clear_line(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    path, _ = make_config(tmp_path, [{"id": "a", "url": str(PERSON_CLIP)}], engine={"kind": "tensorrt"})
    result = run_cli("--config", str(path), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "TensorRT is not installed" in errors[0], result.stderr


def _frames(tmp_path, engine: dict, name: str) -> dict[int, list[dict]]:
    """Run the CLI with this engine on the demo clip; the detections a real subscriber received."""
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(PERSON_CLIP)}], name=f"{name}.yaml", engine=engine,
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60})
    returncode, messages, err = run_and_collect(path, config["publish"]["bind"], b"det/cam/", timeout=300)
    assert returncode == 0, err
    return {m["frame"]: m["detections"] for _, m in messages if m["type"] == "detections"}


@pytest.fixture(scope="module")
def cpu_frames(tmp_path_factory):
    return _frames(tmp_path_factory.mktemp("cpu"), {"kind": "onnxruntime", "intra_op_threads": 8, "max_batch": 8}, "cpu")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("engine,score_tol", [
    ({"kind": "torch", "lanes": 2, "max_batch": 8}, 0.01),
    ({"kind": "torch", "lanes": 3, "max_batch": 8, "fp16": True, "cuda_graphs": True}, 0.02),
    ({"kind": "torch", "lanes": 1, "max_batch": 1}, 0.01),
])
def test_gpu_detections_match_the_cpu_engine(tmp_path, cpu_frames, engine, score_tol):
    cpu = cpu_frames
    gpu_frames = _frames(tmp_path, engine, "gpu")
    assert sorted(gpu_frames) == sorted(cpu) == list(range(1394))
    compared = 0
    for index, expected in cpu.items():
        problems = unmatched(expected, gpu_frames[index], min_iou=0.9, score_tol=score_tol, conf=0.3)
        assert not problems, f"frame {index}: {problems}"
        compared += len(expected)
    assert compared > 500


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lanes", [1, 2, 4])
@pytest.mark.parametrize("graphs", [False, True])
def test_lanes_return_every_batch_in_order_with_the_right_outputs(lanes, graphs):
    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from engines.torch_engine import TorchEngine
    from pipeline.lanes import LaneSet
    from pipeline.model import prepare_model

    prepared = prepare_model(MODEL, "yolox", want_batch=8)
    reference = OnnxRuntimeEngine(prepared, 8, 8)
    engine = TorchEngine(prepared, 8, cuda_graphs=graphs)
    lane_set = LaneSet(engine, lanes)
    rng = np.random.default_rng(lanes)
    sizes = [8, 3, 1, 8, 5, 2, 8, 7]
    batches = [rng.integers(0, 256, (n, 416, 416, 3), dtype=np.uint8) for n in sizes]
    pending, results = list(batches), []
    while pending or lane_set.in_flight:
        while pending and lane_set.submit(pending[0], tag=len(results) + lane_set.in_flight, timeout=0):
            pending.pop(0)
        tag, outputs, timing, release = lane_set.complete()
        results.append((tag, outputs[0].copy(), timing))
        release()
    assert [tag for tag, _, _ in results] == list(range(len(batches)))
    for (tag, out, timing), images in zip(results, batches):
        assert out.shape == (len(images), 3549, 85) and timing.batch == len(images)
        assert timing.h2d_start <= timing.h2d_end <= timing.compute_end <= timing.d2h_end
        assert np.allclose(out, reference.infer(images)[0], rtol=1e-3, atol=2e-3)
    lane_set.close()


@pytest.mark.gpu
@gpu
def test_pinned_slots_are_page_locked():
    from pipeline import cuda

    allocator = cuda.PinnedAllocator()
    array = allocator((4, 416, 416, 3), np.uint8)
    rt = cuda._rt()
    attributes = cuda.check(rt.cudaPointerGetAttributes(array.ctypes.data), "cudaPointerGetAttributes")
    assert attributes.type == rt.cudaMemoryType.cudaMemoryTypeHost
    allocator.free()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_plan_cache_and_detections(tmp_path, cpu_frames):
    pytest.importorskip("tensorrt")
    if not _gpu_ready():
        pytest.skip("needs a GPU")
    engine = {"kind": "tensorrt", "lanes": 2, "max_batch": 8, "fp16": True, "plan_cache_dir": str(tmp_path / "plans")}
    first = _frames(tmp_path, engine, "trt1")
    plans = list((tmp_path / "plans").glob("*.plan"))
    assert len(plans) == 1
    stamp = plans[0].stat().st_mtime
    second = _frames(tmp_path, engine, "trt2")  # loads the cached plan
    assert plans[0].stat().st_mtime == stamp
    cpu = cpu_frames
    for frames in (first, second):
        for index, expected in cpu.items():
            assert not unmatched(expected, frames[index], min_iou=0.9, score_tol=0.02, conf=0.3)
    _frames(tmp_path, {**engine, "fp16": False}, "trt3")  # another precision: another key, a new plan
    assert len(list((tmp_path / "plans").glob("*.plan"))) == 2
