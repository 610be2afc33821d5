"""The bad-input promise, checked as a whole: every row is one hostile but realistic input to the
real CLI, and the answer must be one line `error: ...` naming the file/key/camera/argument, the
exit code README states (2: fix this before the run can go on), and no traceback.

Each row: id, how to build the input (a function of a temporary folder returning the CLI
arguments), the exit code, the words the error line must hold, and whether to run it again with
`--check` (which must catch everything a run would refuse before it starts). Inputs that still
run (a truncated file, a file:// URL, a looped single frame) are in tests/test_bad_input.py.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest

from conftest import LABELS, MODEL, PERSON_CLIP, free_port, make_config, run_cli

TIMEOUT = 120  # per command: rows fail in about a second, but CI machines may be slow and busy


# -- inputs ---------------------------------------------------------------------------------------
def config(tmp_path: Path, cameras: list[dict] | None = None, name: str = "bad.yaml", **sections) -> list[str]:
    path, _ = make_config(tmp_path, cameras or [{"id": "cam", "url": str(PERSON_CLIP)}], name=name, **sections)
    return ["--config", str(path)]


def raw_config(tmp_path: Path, text: str, name: str = "bad.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return ["--config", str(path)]


def camera(tmp_path: Path, url: str, **options) -> list[str]:
    return config(tmp_path, [{"id": "lobby", "url": url, **options}])


def file_camera(tmp_path: Path, name: str, data: bytes, **sections) -> list[str]:
    bad = tmp_path / name
    bad.write_bytes(data)
    return config(tmp_path, [{"id": "lobby", "url": str(bad)}], **sections)


def relative_path_no_suffix(tmp_path: Path) -> list[str]:
    """A config saved without a suffix: its relative paths are still taken from its own folder."""
    (tmp_path / "site").mkdir()
    return raw_config(tmp_path, f"cameras:\n  - id: a\n    url: missing.mp4\nmodel: {{path: {MODEL}, preset: yolox}}\n",
                      name="site/camera")


def audio_only(tmp_path: Path) -> Path:
    """A real media file with an audio stream and no video (PyAV)."""
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 8000, i * 1024, Fraction(1, 8000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def good_and_bad(tmp_path: Path, **sections) -> list[str]:
    """One good file camera beside an unreadable one: the good one must not be cut off mid-run."""
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 1000)
    return config(tmp_path, [{"id": "good", "url": str(PERSON_CLIP)}, {"id": "broken", "url": str(junk)}], **sections)


def edited_model(tmp_path: Path, edit: Callable) -> list[str]:
    """The demo model edited with the `onnx` package, as a user's exporter might have left it."""
    import onnx

    model = onnx.load(str(MODEL))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return config(tmp_path, model={"path": str(path), "labels": None})


def _reroute_output(model, op: str, *extra_inputs: str, domain: str = "", **attrs) -> None:
    """Append node `op` after the model's output (which keeps its name)."""
    from onnx import helper

    name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if o == name else o for o in node.output]
    model.graph.node.append(helper.make_node(op, [f"{name}_raw", *extra_inputs], [name], domain=domain, **attrs))


def rows_100(model) -> None:
    """A YOLOX-shaped [1, 100, 85] output: 100 rows where the 416x416 grid has 3549."""
    from onnx import numpy_helper

    for name, value in (("starts", 0), ("ends", 100), ("axes", 1)):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"slice_{name}"))
    _reroute_output(model, "Slice", "slice_starts", "slice_ends", "slice_axes")
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 100


def custom_op(model) -> None:
    from onnx import helper

    _reroute_output(model, "MyCustomOp", domain="com.example.custom")
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))


def opset_99(model) -> None:
    model.opset_import[0].version = 99


def labels(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "labels.txt"
    path.write_bytes(data)
    return config(tmp_path, model={"labels": str(path)})


def unreadable_played_live(tmp_path: Path) -> list[str]:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(5000))
    return camera(tmp_path, str(junk), live=True, realtime=True, loop=True)


def not_onnx(tmp_path: Path) -> list[str]:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not a protobuf \x00\xff" * 100)
    return config(tmp_path, model={"path": str(fake)})


_held: list[socket.socket] = []  # sockets a row keeps open while its command runs


def port_in_use(tmp_path: Path, **sections) -> list[str]:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    _held.append(blocker)
    return config(tmp_path, publish={"bind": f"tcp://127.0.0.1:{blocker.getsockname()[1]}"}, **sections)


def regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[Path], list[str]]
    code: int
    words: tuple[str, ...]
    check: bool = True  # run again with --check (commands other than `run` have none)
    skip: str | None = None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


ROWS = [
    # the config file itself
    Row("yaml-malformed", lambda t: raw_config(t, "cameras: [\n  - id: a\nmodel: {"), 2, ("bad.yaml", "invalid YAML", "line ")),
    Row("yaml-not-a-mapping", lambda t: raw_config(t, "- a\n- b\n"), 2, ("bad.yaml", "expected a mapping")),
    Row("yaml-not-utf8", lambda t: raw_config(t, b"cameras: \xff\xfe\n"), 2, ("bad.yaml", "cannot read config file")),
    Row("config-missing", lambda t: ["--config", str(t / "nope.yaml")], 2, ("nope.yaml", "not found")),
    Row("key-unknown", lambda t: config(t, [{"id": "a", "url": str(PERSON_CLIP), "fps_limit": 5}]), 2,
        ("bad.yaml", "cameras[0].fps_limit", "unknown key")),
    Row("key-wrong-type", lambda t: config(t, engine={"max_batch": "eight"}), 2, ("engine.max_batch", "integer", "'eight'")),
    Row("key-missing", lambda t: raw_config(t, f"cameras:\n  - id: a\n    url: {PERSON_CLIP}\n"), 2, ("model", "required")),
    Row("env-unset", lambda t: camera(t, "rtsp://${CAM_USER_NOT_SET}@127.0.0.1/x"), 2, ("cameras[0].url", "CAM_USER_NOT_SET")),
    Row("camera-id-twice", lambda t: config(t, [{"id": "a", "url": str(PERSON_CLIP)}, {"id": "a", "url": str(PERSON_CLIP)}]),
        2, ("camera id 'a' is used twice",)),
    Row("relative-path-no-suffix", relative_path_no_suffix, 2, ("cameras[0].url", "site/missing.mp4", "file not found")),
    # sizes, counts and times: each has a bound, and the error says it
    Row("host-slots-1e7", lambda t: config(t, runtime={"host_slots": 10_000_000}), 2, ("runtime.host_slots", "less than or equal to 64")),
    Row("queue-size-1e9", lambda t: config(t, runtime={"queue_size": 10**9}), 2, ("runtime.queue_size", "less than or equal to 256")),
    Row("send-hwm-1e12", lambda t: config(t, publish={"send_hwm": 1e12}), 2, ("publish.send_hwm", "less than or equal to 1000000")),
    Row("opencv-threads-1e12", lambda t: config(t, runtime={"opencv_threads": 1e12}), 2,
        ("runtime.opencv_threads", "less than or equal to 1024")),
    Row("intra-op-threads-1e12", lambda t: config(t, engine={"intra_op_threads": 1e12}), 2,
        ("engine.intra_op_threads", "less than or equal to 1024")),
    Row("wait-timeout-1e300", lambda t: config(t, publish={"wait_timeout_s": 1e300}), 2,
        ("publish.wait_timeout_s", "less than or equal to 3600")),
    Row("reconnect-base-1e300", lambda t: camera(t, "rtsp://127.0.0.1:9/x", reconnect_base_s=1e300), 2,
        ("cameras[0].reconnect_base_s", "less than or equal to 3600")),
    Row("reconnect-cap-1e300", lambda t: camera(t, "rtsp://127.0.0.1:9/x", reconnect_cap_s=1e300), 2,
        ("cameras[0].reconnect_cap_s", "less than or equal to 3600")),
    Row("timeout-inf", lambda t: raw_config(t, f"cameras:\n  - {{id: a, url: {PERSON_CLIP}, open_timeout_s: .inf}}\n"
                                               f"model: {{path: {MODEL}, preset: yolox}}\n"), 2,
        ("cameras[0].open_timeout_s", "finite number")),
    Row("max-batch-0", lambda t: config(t, engine={"max_batch": 0}), 2, ("engine.max_batch", "greater than or equal to 1")),
    # what a camera's URL may be
    Row("url-ftp", lambda t: camera(t, "ftp://example.com/clip.mp4"), 2, ("cameras[0].url", "unsupported URL scheme 'ftp'")),
    Row("url-bogus", lambda t: camera(t, "bogus://x"), 2, ("cameras[0].url", "unsupported URL scheme 'bogus'")),
    Row("url-file-with-host", lambda t: camera(t, f"file://somehost{PERSON_CLIP}"), 2, ("cameras[0].url", "file:///absolute/path")),
    Row("url-file-missing", lambda t: camera(t, f"file://{t}/missing.mp4"), 2, ("cameras[0].url", "lobby", "missing.mp4", "not found")),
    # videos: every file is probed before the run starts, by --check too
    Row("video-missing", lambda t: camera(t, str(t / "missing.mp4")), 2, ("cameras[0].url", "lobby", "missing.mp4", "not found")),
    Row("video-zero-bytes", lambda t: file_camera(t, "empty.mp4", b""), 2, ("cameras[0].url", "lobby", "empty.mp4", "empty")),
    Row("video-not-a-video", lambda t: file_camera(t, "junk.mp4", b"\x00not a video" * 1000), 2,
        ("cameras[0].url", "lobby", "junk.mp4", "cannot be read as a video")),
    Row("video-text-renamed", lambda t: file_camera(t, "notes.mp4", b"meeting notes\n" * 200), 2,
        ("cameras[0].url", "notes.mp4", "cannot be read as a video")),
    Row("video-audio-only", lambda t: camera(t, str(audio_only(t))), 2, ("cameras[0].url", "audio.mp4", "no video stream", "audio")),
    Row("video-unreadable-beside-good", good_and_bad, 2, ("cameras[1].url", "broken", "junk.mp4")),
    Row("video-unreadable-beside-good-workers", lambda t: good_and_bad(t, runtime={"workers": 2}), 2,
        ("cameras[1].url", "broken", "junk.mp4")),
    Row("video-unreadable-played-live", unreadable_played_live, 2, ("cameras[0].url", "junk.mp4")),
    # the model, its labels and classes
    Row("model-missing", lambda t: config(t, model={"path": str(t / "none.onnx")}), 2, ("model.path", "none.onnx", "not found")),
    Row("model-not-onnx", not_onnx, 2, ("model.path", "model.onnx", "not a readable ONNX model")),
    Row("model-rows-not-grid", lambda t: edited_model(t, rows_100), 2, ("model.path", "100 rows", "needs 3549", "yolox")),
    Row("model-custom-op", lambda t: edited_model(t, custom_op), 2, ("model.path", "ONNX Runtime cannot load", "MyCustomOp")),
    Row("model-opset-99", lambda t: edited_model(t, opset_99), 2, ("model.path", "ONNX Runtime cannot load", "Opset 99")),
    Row("model-wrong-preset", lambda t: config(t, model={"preset": "yolov8"}), 2, ("model.path", "does not match layout 'yolov8'")),
    Row("labels-count", lambda t: labels(t, b"person\ncar\n"), 2, ("model.labels", "2 names", "80 classes")),
    Row("labels-not-utf8", lambda t: labels(t, LABELS.read_text().encode("utf-16")), 2, ("model.labels", "labels.txt", "UTF-8")),
    Row("labels-missing", lambda t: config(t, model={"labels": str(t / "nope.txt")}), 2, ("model.labels", "nope.txt", "cannot read")),
    Row("classes-empty", lambda t: config(t, model={"classes": []}), 2, ("model.classes", "at least 1 item")),
    Row("classes-999", lambda t: config(t, model={"classes": [0, 999]}), 2, ("model.classes", "999", "80 classes")),
    # engines that are not installed
    Row("engine-torch-missing", lambda t: config(t, engine={"kind": "torch"}), 2, ("engine.kind is torch", "not installed"),
        skip="torch is installed" if _installed("torch") and _installed("onnx2torch") else None),
    Row("engine-tensorrt-missing", lambda t: config(t, engine={"kind": "tensorrt"}), 2, ("engine.kind is tensorrt", "not installed"),
        skip="tensorrt is installed" if _installed("tensorrt") else None),
    # the publisher's endpoint
    Row("bind-port-in-use", port_in_use, 2, ("publish.bind", "in use")),
    Row("bind-port-in-use-workers", lambda t: port_in_use(t, runtime={"workers": 2}), 2, ("publish.bind", "in use"), check=False),
    Row("bind-not-an-endpoint", lambda t: config(t, publish={"bind": "garbage"}), 2, ("publish.bind", "garbage")),
    # command-line arguments
    Row("run-unknown-flag", lambda t: config(t) + ["--bogus"], 2, ("unrecognized arguments: --bogus",), check=False),
    Row("run-log-level", lambda t: config(t) + ["--log-level", "loud"], 2, ("--log-level", "invalid choice"), check=False),
    Row("run-summary-json-missing-folder", lambda t: config(t) + ["--summary-json", str(t / "no" / "s.json")], 2,
        ("--summary-json", "does not exist")),
    Row("run-worker-abc", lambda t: config(t) + ["--worker", "abc"], 2, ("--worker", "'abc'"), check=False),
    Row("run-worker-out-of-range", lambda t: config(t) + ["--worker", "3/2"], 2, ("--worker", "does not exist"), check=False),
    Row("subscribe-connect-garbage", lambda t: ["subscribe", "--connect", "garbage", "--timeout", "1"], 2,
        ("--connect garbage",), check=False),
    Row("subscribe-timeout-0", lambda t: ["subscribe", "--connect", endpoint(), "--timeout", "0"], 2, ("--timeout", "> 0"), check=False),
    Row("subscribe-timeout-negative", lambda t: ["subscribe", "--connect", endpoint(), "--timeout", "-1"], 2, ("--timeout", "> 0"),
        check=False),
    Row("subscribe-count-negative", lambda t: ["subscribe", "--connect", endpoint(), "--count", "-5", "--timeout", "1"], 2,
        ("--count", ">= 1"), check=False),
    Row("view-width-0", lambda t: ["view", "--headless", "--snapshot-dir", str(t), "--width", "0"], 2, ("--width", ">= 16"),
        check=False),
    Row("view-snapshot-dir-under-file", lambda t: ["view", "--headless", "--snapshot-dir", str(regular_file(t) / "snaps"),
                                                   "--duration", "30"], 2, ("--snapshot-dir", "a-file"), check=False),
    Row("view-record-missing-folder", lambda t: ["view", "--headless", "--record", str(t / "no" / "out.mp4"), "--duration", "30"],
        2, ("--record", "does not exist"), check=False),
    Row("view-record-suffix", lambda t: ["view", "--headless", "--record", str(t / "out.txt"), "--duration", "30"], 2,
        ("--record", ".mp4 or .avi"), check=False),
    Row("view-record-fps-0", lambda t: ["view", "--headless", "--record", str(t / "out.mp4"), "--record-fps", "0"], 2,
        ("--record-fps", "> 0"), check=False),
    Row("view-connect-garbage", lambda t: ["view", "--headless", "--snapshot-dir", str(t), "--connect", "garbage",
                                           "--duration", "30"], 2, ("--connect garbage",), check=False),
]

CASES = [pytest.param(row, False, id=row.id, marks=[pytest.mark.skip(row.skip)] if row.skip else [])
         for row in ROWS]
CASES += [pytest.param(row, True, id=f"{row.id}--check", marks=[pytest.mark.skip(row.skip)] if row.skip else [])
          for row in ROWS if row.check]


def assert_one_line_error(result, code: int, words: tuple[str, ...]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "\n" not in errors[0]
    return errors[0]


@pytest.mark.parametrize("row,check", CASES)
def test_bad_input(row: Row, check: bool, tmp_path):
    try:
        result = run_cli(*row.build(tmp_path), *(["--check"] if check else []), timeout=TIMEOUT)
    finally:
        while _held:
            _held.pop().close()
    assert_one_line_error(result, row.code, row.words)
    if check:
        assert ": ok" not in result.stdout


def test_relative_paths_are_taken_from_the_config_folder_whatever_its_suffix(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(PERSON_CLIP.read_bytes())
    path = folder / "camera"  # no suffix at all; the CLI runs from the project's root, not this folder
    path.write_text(f"cameras:\n  - id: a\n    url: clip.mp4\nmodel: {{path: {MODEL}, preset: yolox}}\n"
                    f"publish: {{bind: 'tcp://127.0.0.1:{free_port()}'}}\n")
    result = run_cli("--config", str(path), "--check", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert f"{path}: ok" in result.stdout
    (folder / "clip.mp4").unlink()
    line = assert_one_line_error(run_cli("--config", str(path), "--check", timeout=TIMEOUT), 2, ("cameras[0].url",))
    assert str(folder / "clip.mp4") in line

