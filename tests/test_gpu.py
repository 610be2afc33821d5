"""The GPU data path: lanes, pinned slots, the PyTorch and TensorRT engines.

GPU tests run on a machine with CUDA (`pytest -m gpu`) and skip cleanly elsewhere; TensorRT tests
run only where `tensorrt` imports. The import test runs everywhere: the CPU install must not need
CUDA to load the GPU modules.
"""

import importlib

import numpy as np
import pytest

from conftest import MODEL, PERSON_CLIP, make_config, run_and_collect, run_cli
from reference import iou, unmatched


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


@pytest.mark.parametrize("width,height", [(768, 432), (641, 479), (3, 2), (1, 1), (1919, 1081)])
def test_i420_upload_layout_keeps_the_last_chroma_column_of_odd_frames(width, height):
    """The GPU letterbox's upload packs a CPU-decoded frame's planes as FFmpeg sizes them (chroma is
    ceil(w/2) x ceil(h/2)) and the kernel reads chroma at that pitch; runs without a GPU."""
    import av

    from pipeline.gpu_letterbox import i420_layout

    offsets, sizes = i420_layout(width, height)
    frame = av.VideoFrame(width, height, "yuv420p")
    assert sizes == tuple((plane.width, plane.height) for plane in frame.planes)
    ends = [offset + w * h for offset, (w, h) in zip(offsets, sizes)]
    assert offsets[0] == 0 and ends[0] == offsets[1] and ends[1] == offsets[2]  # packed, no overlap
    # the kernel's chroma size for this frame (`(src_w + 1) / 2`): every column it samples was uploaded
    assert sizes[1] == ((width + 1) // 2, (height + 1) // 2)


def test_compile_cache_keeps_its_lock_while_it_compiles_after_a_bad_artifacts_file(tmp_path):
    """A stale or truncated artifacts file is compiled anew by the process that found it, which must
    hold the lock until its artifacts are written, or every worker of the machine compiles at once.
    (Runs without a GPU: the stand-in has torch.compiler's two calls; the file lock is what is tested.)"""
    import fcntl
    from types import SimpleNamespace

    from engines.torch_engine import _CompileCache

    def truncated(_data):
        raise RuntimeError("truncated artifacts")

    torch = SimpleNamespace(compiler=SimpleNamespace(load_cache_artifacts=truncated,
                                                     save_cache_artifacts=lambda: (b"kernels", None)))
    cache = _CompileCache(tmp_path, "key")
    cache.path.write_bytes(b"trunc")
    assert cache.load(torch) is False  # this process compiles
    with open(cache.path.with_suffix(".lock"), "w") as other_worker:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other_worker, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cache.save(torch)
        fcntl.flock(other_worker, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the artifacts are written
    assert cache.path.read_bytes() == b"kernels"


def test_compile_cache_loads_artifacts_that_are_there_without_waiting_for_the_lock(tmp_path):
    """A host's workers load cached artifacts together: on a 4-GPU host, taking the lock in turn put
    70 workers a minute in line. A file that is there is written whole (by rename), so it is loaded
    while another process holds the lock; with no file, the loader waits for the compiling process
    and then loads what it wrote. (Runs without a GPU: a stand-in for torch.compiler's two calls.)"""
    import fcntl
    import threading
    from types import SimpleNamespace

    from engines.torch_engine import _CompileCache

    loaded = []
    torch = SimpleNamespace(compiler=SimpleNamespace(load_cache_artifacts=loaded.append,
                                                     save_cache_artifacts=lambda: (b"kernels", None)))
    cache = _CompileCache(tmp_path, "key")
    compiling = _CompileCache(tmp_path, "key")
    assert compiling.load(torch) is False  # no file: this one compiles, holding the lock
    waiting = threading.Thread(target=lambda: loaded.append(("waited", cache.load(torch))))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive(), "a loader with no file to load did not wait for the compiling process"
    compiling.save(torch)  # writes the file, drops the lock
    waiting.join(10.0)
    assert loaded == [b"kernels", ("waited", True)]
    with open(cache.path.with_suffix(".lock"), "w") as other_worker:
        fcntl.flock(other_worker, fcntl.LOCK_EX)  # another process holds the lock (compiling another time)
        done = threading.Thread(target=lambda: loaded.append(("found", _CompileCache(tmp_path, "key").load(torch))))
        done.start()
        done.join(5.0)
        assert not done.is_alive() and loaded[-1] == ("found", True), "an existing file waited for the lock"


def test_compiled_artifacts_are_kept_per_gpu_index():
    """Inductor's caches miss for a graph traced on another device index, so one artifacts file for
    all GPUs left the workers on GPUs 1-3 of a 4-GPU host compiling from scratch. GPU 0 keeps the key
    it had (artifacts cached before stay valid). (Runs without a GPU: the key alone.)"""
    from types import SimpleNamespace

    from engines.torch_engine import compile_key

    model = SimpleNamespace(sha256="ab" * 32)
    args = (model, "2.9.0", "NVIDIA H200", (9, 0), True, 16, [1, 2, 4, 8, 16, 32], False)
    keys = [compile_key(*args, device_index=i) for i in range(4)]
    assert len(set(keys)) == 4
    assert keys[0] == compile_key(*args)


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
    assert not (engine.get("compile") and "cannot compile this model" in err), err  # no silent eager fallback
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
    # every layer fp16 through engines/torch_fp16.py (emulated on the CPU only when this was written)
    ({"kind": "torch", "lanes": 2, "max_batch": 8, "fp16": True, "fp16_exact": True, "cuda_graphs": True}, 0.02),
    ({"kind": "torch", "lanes": 2, "max_batch": 8, "fp16": True, "fp16_exact": True, "cuda_graphs": True,
      "compile": True}, 0.02),
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


def _yuv_planes(av_frame):
    h, w = av_frame.height, av_frame.width
    yuv = av_frame.to_ndarray(format="yuv420p")
    return yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("decoder", ["cpu", "nvdec"])
def test_gpu_letterbox_kernel_matches_its_reference(decoder):
    """The kernel's output equals its numpy twin on the same frame: I420 uploaded from the CPU
    decoder, and NV12 left in device memory by NVDEC (compared with the CPU decode of that frame)."""
    import av
    from av.codec.hwaccel import HWAccel

    from pipeline import cuda
    from pipeline.gpu_letterbox import GpuLetterboxer, YuvPlanes, cpu_reference, frame_matrix
    from stages.letterbox import letterbox_geometry

    cuda.set_device(0)
    stream = cuda.Stream(blocking=True)
    out = cuda.DeviceBuffer(416 * 416 * 3)
    host = np.empty((416, 416, 3), np.uint8)
    letterboxer = GpuLetterboxer(0, (416, 416), rgb_order=False, pad_value=114)
    hwaccel = HWAccel("cuda", is_hw_owned=True, allow_software_fallback=False) if decoder == "nvdec" else None
    with av.open(str(PERSON_CLIP)) as cpu_clip, av.open(str(PERSON_CLIP), hwaccel=hwaccel) as clip:
        pairs = zip(cpu_clip.decode(video=0), clip.decode(video=0))
        for i, (cpu_frame, frame) in enumerate(pairs):
            if i % 50:
                continue
            if i > 300:
                break
            y, u, v = _yuv_planes(cpu_frame)
            geo = letterbox_geometry(frame.width, frame.height, 416, 416, "center")
            matrix, full = frame_matrix(cpu_frame)
            if decoder == "nvdec":
                assert frame.format.name == "cuda", "NVDEC did not decode this clip"
                planes = YuvPlanes.from_nv12_frame(frame)
                staging = None
            else:
                staging = cuda.DeviceBuffer(y.size + u.size + v.size)
                for plane, offset in ((y, 0), (u, y.size), (v, y.size + u.size)):
                    cuda.copy_2d_to_device(staging.ptr + offset, plane.shape[1], plane.ctypes.data, plane.shape[1],
                                           plane.shape[1], plane.shape[0], stream)
                planes = YuvPlanes(frame.width, frame.height, staging.ptr, y.shape[1], staging.ptr + y.size,
                                   staging.ptr + y.size + u.size, u.shape[1], 1, matrix, full)
            letterboxer.launch(planes, out.ptr, geo, stream)
            stream.synchronize()
            cuda.copy_2d_to_host(host, out.ptr, 416 * 3, 416 * 3, 416)
            if staging is not None:
                staging.free()
            expected = cpu_reference(y, u, v, (416, 416), geo, matrix, full)
            diff = np.abs(host.astype(int) - expected.astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.05, f"frame {i}: max {diff.max()}, mean {diff.mean():.3f}"
            assert (host[:geo.pad_y] == 114).all() and (host[geo.pad_y + geo.resized_h:] == 114).all()
    out.free()
    stream.destroy()


@pytest.mark.gpu
@gpu
def test_gpu_letterbox_upload_of_an_odd_sized_frame_matches_its_reference():
    """A CPU-decoded frame with odd width and height goes through the stage's own upload: its last
    chroma column and row are read from where they are (the numpy twin reads the same planes)."""
    import av

    from pipeline import cuda
    from pipeline.buffers import HostSlotPool
    from pipeline.gpu_letterbox import cpu_reference, frame_matrix
    from pipeline.model import PRESETS
    from pipeline.queues import BoundedQueue
    from stages.letterbox import GpuLetterboxStage, letterbox_geometry

    cuda.set_device(0)
    with av.open(str(PERSON_CLIP)) as clip:
        frame = next(clip.decode(video=0)).reformat(width=641, height=359, format="yuv420p")
    allocator = cuda.DeviceAllocator()
    pool = HostSlotPool(1, (1, 416, 416, 3), allocator=allocator)
    stage = GpuLetterboxStage(BoundedQueue(1), BoundedQueue(1), pool, PRESETS["yolox"], 0)
    matrix, full = frame_matrix(frame)
    planes = stage._upload(frame, 0, matrix, full)
    slot = pool.acquire()
    geo = letterbox_geometry(641, 359, 416, 416, "top-left")
    stage.letterboxer.launch(planes, slot.array.row_ptr(0), geo, stage.stream)
    stage.stream.synchronize()
    host = np.empty((416, 416, 3), np.uint8)
    cuda.copy_2d_to_host(host, slot.array.row_ptr(0), 416 * 3, 416 * 3, 416)
    y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes)
    expected = cpu_reference(y, u, v, (416, 416), geo, matrix, full)
    diff = np.abs(host.astype(int) - expected.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max {diff.max()}, mean {diff.mean():.3f}"
    stage.on_stop()
    allocator.free()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("input_hw", [(416, 416), (256, 416)])
def test_gpu_letterbox_stage_fills_a_batch_at_the_square_and_a_rectangle(input_hw):
    """The stage itself on a two-frame batch at the slot's own square (a model that stays square,
    or `model.letterbox: square`) and at a rectangle: both rows as their numpy twin. The square
    once failed on every batch (a device slot cannot be sliced on the host)."""
    import av

    from pipeline import cuda
    from pipeline.buffers import HostSlotPool
    from pipeline.gpu_letterbox import cpu_reference, frame_matrix
    from pipeline.model import PRESETS
    from pipeline.queues import BoundedQueue
    from pipeline.record import Frame, FrameBatch

    from stages.letterbox import GpuLetterboxStage

    cuda.set_device(0)
    with av.open(str(PERSON_CLIP)) as clip:
        videos = [f.reformat(format="yuv420p") for _, f in zip(range(2), clip.decode(video=0))]
    allocator = cuda.DeviceAllocator()
    pool = HostSlotPool(1, (2, 416, 416, 3), allocator=allocator)
    outbox = BoundedQueue(1)
    stage = GpuLetterboxStage(BoundedQueue(1), outbox, pool, PRESETS["yolox"], 0)
    frames = [Frame("cam", i, None, 0.0, None, (v.width, v.height), video=v) for i, v in enumerate(videos)]
    planes = [(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in v.planes) for v in videos]
    references = [(tuple(plane.copy() for plane in yuv), frame_matrix(v)) for yuv, v in zip(planes, videos)]
    stage.process(FrameBatch(frames, input_hw=input_hw))
    batch = outbox.get(timeout=5)
    stage.stream.synchronize()
    host = np.empty((2, *input_hw, 3), np.uint8)
    cuda.copy_to_host(host, batch.slot.array.ptr, host.nbytes, stage.stream)
    stage.stream.synchronize()
    for row, ((y, u, v), (matrix, full)) in enumerate(references):
        expected = cpu_reference(y, u, v, input_hw, batch.frames[row].letterbox, matrix, full)
        diff = np.abs(host[row].astype(int) - expected.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, f"row {row}: max {diff.max()}, mean {diff.mean():.3f}"
    stage.on_stop()
    allocator.free()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("camera,runtime", [
    ({"decoder": "nvdec"}, {}),
    ({"decoder": "cpu"}, {"letterbox_device": "gpu"}),
    ({"decoder": "nvdec"}, {"workers": 1}),
])
def test_gpu_letterbox_detections_match_the_cpu_path(tmp_path, cpu_frames, camera, runtime):
    """Decoded by NVDEC (or uploaded as YUV) and letterboxed on the GPU: every frame arrives and the
    detections match the CPU path's. Pixels differ from swscale + cv2.resize by < 1 level on average,
    which moves scores by 0.006 on average and up to ~0.06 on a few frames (measured on the H100:
    NVDEC and the uploaded I420 give identical numbers), so each detection must match within 0.1,
    the scores within 0.01 on average and within 0.1 at the 99th percentile."""
    path, config = make_config(tmp_path, [{"id": "cam", "url": str(PERSON_CLIP), **camera}],
                               engine={"kind": "torch", "lanes": 2, "max_batch": 8},
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60}, runtime=runtime)
    returncode, messages, err = run_and_collect(path, config["publish"]["bind"], b"det/cam/", timeout=300)
    assert returncode == 0, err
    frames = {m["frame"]: m["detections"] for _, m in messages if m["type"] == "detections"}
    assert sorted(frames) == sorted(cpu_frames) == list(range(1394))
    differences = []
    for index, expected in cpu_frames.items():
        problems = unmatched(expected, frames[index], min_iou=0.85, score_tol=0.1, conf=0.3)
        assert not problems, f"frame {index}: {problems}"
        for d in expected:
            partners = [abs(o["score"] - d["score"]) for o in frames[index]
                        if o["class_id"] == d["class_id"] and iou(o["box"], d["box"]) >= 0.85]
            if partners:
                differences.append(min(partners))
    assert len(differences) > 500
    assert np.mean(differences) < 0.01 and np.percentile(differences, 99) < 0.1, \
        f"mean {np.mean(differences):.4f}, p99 {np.percentile(differences, 99):.4f}"


# -- rectangle letterbox (dynamic input shape) on the GPU ------------------------------------------

RECT_SHAPES = [(256, 416), (416, 256)]  # 16:9 and 9:16 cameras at 416


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_lanes_run_every_input_shape_with_a_graph_per_lane_bucket_and_shape(graphs):
    """A shape-dynamic model on torch lanes: the configured shapes are captured at start (one CUDA
    graph per lane, batch bucket and shape), another shape on its first batch; batches of mixed
    shapes come back in order with ONNX Runtime's outputs at the same shape."""
    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from engines.torch_engine import TorchEngine
    from pipeline.lanes import LaneSet
    from pipeline.model import prepare_model

    prepared = prepare_model(MODEL, "yolox", want_batch=8, letterbox="rect")
    assert prepared.shape_dynamic
    reference = OnnxRuntimeEngine(prepared, 8, 8)
    engine = TorchEngine(prepared, 8, cuda_graphs=graphs)
    engine.warm_shapes = list(RECT_SHAPES)
    lane_set = LaneSet(engine, 2)
    if graphs:
        for lane in lane_set.lanes:
            assert set(lane.context.graphs) == {(b, s) for b in (1, 2, 4, 8) for s in RECT_SHAPES}
    rng = np.random.default_rng(9)
    plan = [(8, RECT_SHAPES[0]), (3, RECT_SHAPES[1]), (5, (320, 416)), (1, RECT_SHAPES[0]), (8, (416, 416)), (2, RECT_SHAPES[1])]
    batches = [rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8) for n, hw in plan]
    pending, results = list(batches), []
    while pending or lane_set.in_flight:
        while pending and lane_set.submit(pending[0], tag=len(results) + lane_set.in_flight, timeout=0):
            pending.pop(0)
        tag, outputs, _, release = lane_set.complete()
        results.append((tag, outputs[0].copy()))
        release()
    assert [tag for tag, _ in results] == list(range(len(batches)))
    for (_, out), images in zip(results, batches):
        assert out.shape == (len(images), *prepared.output_shape(images.shape[1:3]))
        assert np.allclose(out, reference.infer(images)[0], rtol=1e-3, atol=2e-3)
    if graphs:  # the unconfigured shapes were captured when they came
        assert {(8, (320, 416)), (8, (416, 416))} <= set().union(*(lane.context.graphs for lane in lane_set.lanes))
    lane_set.close()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dst_hw", RECT_SHAPES)
def test_gpu_letterbox_kernel_writes_the_batch_rectangle(dst_hw):
    """The kernel targets a rectangle inside a square-sized buffer: rows dst_w*3 bytes apart, nothing
    written past it, pixels as its numpy twin at that rectangle."""
    import av

    from pipeline import cuda
    from pipeline.gpu_letterbox import GpuLetterboxer, YuvPlanes, cpu_reference, frame_matrix
    from stages.letterbox import letterbox_geometry

    cuda.set_device(0)
    stream = cuda.Stream(blocking=True)
    out = cuda.DeviceBuffer(416 * 416 * 3)
    letterboxer = GpuLetterboxer(0, (416, 416), rgb_order=False, pad_value=114)
    with av.open(str(PERSON_CLIP)) as clip:
        frame = next(clip.decode(video=0))
    if dst_hw[0] > dst_hw[1]:  # a portrait frame for the portrait rectangle
        frame = frame.reformat(width=432, height=768, format="yuv420p")
    y, u, v = _yuv_planes(frame)
    sentinel = np.full(416 * 416 * 3, 7, np.uint8)
    cuda.copy_to_device(out.ptr, sentinel, sentinel.nbytes, stream)
    staging = cuda.DeviceBuffer(y.size + u.size + v.size)
    for plane, offset in ((y, 0), (u, y.size), (v, y.size + u.size)):
        cuda.copy_2d_to_device(staging.ptr + offset, plane.shape[1], plane.ctypes.data, plane.shape[1], plane.shape[1],
                               plane.shape[0], stream)
    matrix, full = frame_matrix(frame)
    planes = YuvPlanes(frame.width, frame.height, staging.ptr, y.shape[1], staging.ptr + y.size,
                       staging.ptr + y.size + u.size, u.shape[1], 1, matrix, full)
    geo = letterbox_geometry(frame.width, frame.height, dst_hw[1], dst_hw[0], "top-left")
    letterboxer.launch(planes, out.ptr, geo, stream, dst_hw=dst_hw)
    host = np.empty(416 * 416 * 3, np.uint8)
    cuda.copy_to_host(host, out.ptr, host.nbytes, stream)
    stream.synchronize()
    n = dst_hw[0] * dst_hw[1] * 3
    image = host[:n].reshape(*dst_hw, 3)
    expected = cpu_reference(y, u, v, dst_hw, geo, matrix, full)
    diff = np.abs(image.astype(int) - expected.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max {diff.max()}, mean {diff.mean():.3f}"
    assert (host[n:] == 7).all()  # nothing past the rectangle
    staging.free()
    out.free()
    stream.destroy()


@pytest.fixture(scope="module")
def two_shape_cameras(tmp_path_factory):
    """A portrait column of the demo clip (240x432) and the demo clip itself, 120 frames each."""
    from test_rect_letterbox import _encode
    from reference import read_frames

    folder = tmp_path_factory.mktemp("shapes")
    frames = read_frames(PERSON_CLIP, set(range(200, 320)))
    images = [frames[i] for i in sorted(frames)]
    tall = _encode([np.ascontiguousarray(f[:, 330:570]) for f in images], folder / "tall.mp4", (240, 432))
    wide = _encode(images, folder / "wide.mp4", (768, 432))
    return [{"id": "tall", "url": str(tall)}, {"id": "wide", "url": str(wide)}]


def _two_cameras(tmp_path, cameras, engine: dict, name: str, runtime: dict | None = None) -> dict[str, dict]:
    import json

    from conftest import Subscriber, start_cli

    path, config = make_config(tmp_path, cameras, name=f"{name}.yaml", engine=engine, runtime=runtime or {},
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path), "--summary-json", str(tmp_path / f"{name}.json"))
    try:  # until every camera's end message
        messages = subscriber.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == len(cameras), timeout=300)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err
    shapes = json.loads((tmp_path / f"{name}.json").read_text())["batches_by_shape"]
    assert set(shapes) == {"416x256", "256x416"}, shapes
    frames: dict[str, dict] = {}
    for _, m in messages:
        if m["type"] == "detections":
            frames.setdefault(m["camera"], {})[m["frame"]] = m["detections"]
    return frames


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("decoder,score_tol", [("cpu", 0.02), ("nvdec", 0.1)])
def test_gpu_rect_detections_of_a_portrait_and_a_landscape_camera_match_the_cpu_path(tmp_path, two_shape_cameras,
                                                                                     decoder, score_tol):
    """Two camera shapes through the torch engine (fp16, CUDA graphs; with NVDEC the GPU letterbox
    writes the rectangles) against the CPU engine's rect run: every frame, the same boxes."""
    cpu = _two_cameras(tmp_path, two_shape_cameras, {"kind": "onnxruntime", "intra_op_threads": 4, "max_batch": 8}, "cpu")
    cameras = [{**c, "decoder": decoder} for c in two_shape_cameras]
    gpu_run = _two_cameras(tmp_path, cameras, {"kind": "torch", "lanes": 2, "max_batch": 8, "fp16": True, "cuda_graphs": True},
                           "gpu")
    compared = 0
    for camera in ("tall", "wide"):
        assert sorted(gpu_run[camera]) == sorted(cpu[camera]) == list(range(120))
        for index, expected in cpu[camera].items():
            problems = unmatched(expected, gpu_run[camera][index], min_iou=0.85, score_tol=score_tol, conf=0.3)
            assert not problems, f"{camera} frame {index}: {problems}"
            compared += len(expected)
    assert compared > 100


@pytest.mark.gpu
@gpu
def test_compiled_engine_matches_eager_and_caches_its_artifacts(tmp_path):
    """engine.compile: the whole model compiled (no graph left eager), CUDA graphs over it, the
    outputs those of the eager engine, and the artifacts on disk for the next start."""
    from engines.torch_engine import TorchEngine
    from pipeline.lanes import LaneSet
    from pipeline.model import prepare_model

    prepared = prepare_model(MODEL, "yolox", want_batch=2)
    images = np.random.default_rng(0).integers(0, 256, (2, 416, 416, 3), dtype=np.uint8)
    eager = TorchEngine(prepared, 2, cuda_graphs=True)
    expected = LaneSet(eager, 1).run_sync(images)[0]
    compiled = TorchEngine(prepared, 2, cuda_graphs=True, compile=True, cache_dir=tmp_path)
    lanes = LaneSet(compiled, 2)
    assert compiled.compiled, "torch.compile fell back to eager"
    assert list(tmp_path.glob("*.inductor")), "no compiled artifacts written"
    for n in (1, 2):
        out = lanes.run_sync(images[:n])[0]
        assert np.allclose(out, expected[:n], rtol=1e-3, atol=2e-3)
    lanes.close()
    # the next start loads the artifacts and, having nothing to compile, starts no compile pool
    import os

    import torch._inductor.config as inductor_config

    user_threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    inductor_config.compile_threads = None  # as if unset: the cached start must set it
    try:
        again = TorchEngine(prepared, 2, cuda_graphs=True, compile=True, cache_dir=tmp_path)
        assert again.compiled and again._compile_cached
        if user_threads is None:
            assert inductor_config.compile_threads == 1
            assert os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") == "1"
    finally:
        if user_threads is None:
            os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS", None)
