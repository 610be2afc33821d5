"""Model families and the ONNX graph edits every engine gets.

A preset says how a family letterboxes (centred or top-left), which colour order and scale its
input wants, and how its output is laid out. `prepare_model` turns the user's ONNX file into the
graph the engines run:

- a uint8 NHWC BGR input (what the letterbox writes into the host slot), followed by nodes that
  cast, reorder channels, scale and transpose to the model's float NCHW input, so that uint8
  crosses PCIe and the conversion runs wherever the engine runs;
- where the model is fixed at batch 1, a batch-dynamic graph, made by a checked edit of its
  Reshape constants (batch-N output must equal N batch-1 outputs; otherwise batch 1 is kept);
- with `model.letterbox: rect`, an input whose height and width are dynamic, so that each camera
  is letterboxed to the smallest stride-aligned rectangle that holds its frame instead of the
  square (checked: the graph still computes the same outputs at the square size, and runs at a
  landscape and a portrait rectangle with one output row per grid cell; otherwise it stays square).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError

log = logging.getLogger("pipeline")

INPUT_NAME = "images_u8"


@dataclass(frozen=True)
class Preset:
    name: str
    align: str  # "center" | "top-left"
    channels: str  # "RGB" | "BGR"
    scale: float  # multiplier applied to 0-255 values
    layout: str  # "yolox" | "yolov5" | "yolov8"
    pad_value: int = 114
    strides: tuple[int, ...] = (8, 16, 32)


PRESETS = {
    "yolox": Preset("yolox", "top-left", "BGR", 1.0, "yolox"),
    "yolov5": Preset("yolov5", "center", "RGB", 1 / 255.0, "yolov5"),
    "yolov8": Preset("yolov8", "center", "RGB", 1 / 255.0, "yolov8"),
    "yolo11": Preset("yolo11", "center", "RGB", 1 / 255.0, "yolov8"),
}


@dataclass(frozen=True)
class PreparedModel:
    onnx_bytes: bytes
    input_name: str
    input_hw: tuple[int, int]
    output_names: list[str]
    num_classes: int
    batch_dynamic: bool  # False: the engine must run one image at a time
    preset: Preset
    sha256: str  # of the prepared graph: keys engine caches
    # True: the graph takes any input height and width that are multiples of `stride` up to
    # `input_hw` (the letterbox targets each camera's rectangle); False: `input_hw` only
    shape_dynamic: bool = False
    stride: int = 32
    rows_per_cell: int = 1  # output rows per cell of the stride grids (YOLOv5: 3 anchors)

    def output_shape(self, hw: tuple[int, int]) -> tuple[int, int]:
        """One image's shape of the first output for an input of `hw` (rows follow the grid)."""
        rows = self.rows_per_cell * grid_rows(hw, self.preset.strides)
        values = self.num_classes + (4 if self.preset.layout == "yolov8" else 5)
        return (values, rows) if self.preset.layout == "yolov8" else (rows, values)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim]


def load_onnx(path: Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.path: {path}: file not found (run scripts/fetch_assets.py, or fix the path)")
    try:
        model = onnx.load(str(path))
        if not model.graph.node:
            raise ValueError("the graph has no nodes")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.path: {path}: not a readable ONNX model ({first[:160]})") from None
    return model


def _prepend_preprocessing(model, preset: Preset):
    """Replace the float NCHW input by uint8 NHWC BGR plus cast/colour/scale/transpose nodes."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    initializer_names = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(real_inputs) != 1:
        raise ModelError(f"model.path: expected one image input, found {len(real_inputs)}")
    original = real_inputs[0]
    dims = _dims(original)
    if len(dims) != 4 or dims[1] != 3 or not isinstance(dims[2], int) or not isinstance(dims[3], int):
        raise ModelError(f"model.path: input {original.name!r} has shape {dims}; expected [N, 3, H, W] with fixed H, W")
    batch_dim = dims[0] if isinstance(dims[0], int) else "batch"
    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, dims[2], dims[3], 3])
    nodes, current = [], INPUT_NAME

    def add(op, inputs, **attrs):
        nonlocal current
        out = f"{INPUT_NAME}_{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        current = out

    add("Cast", [current], to=TensorProto.FLOAT)
    if preset.channels == "RGB":
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{INPUT_NAME}_bgr2rgb"))
        add("Gather", [current, f"{INPUT_NAME}_bgr2rgb"], axis=3)
    if preset.scale != 1.0:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(preset.scale, np.float32), f"{INPUT_NAME}_scale"))
        add("Mul", [current, f"{INPUT_NAME}_scale"])
    nodes.append(helper.make_node("Transpose", [current], [original.name], name=f"{INPUT_NAME}_nchw", perm=[0, 3, 1, 2]))
    graph.input.remove(original)
    graph.input.insert(0, new_input)
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    return (dims[2], dims[3]), dims[0]


def _make_batch_dynamic(model) -> bool:
    """Point fixed-batch Reshape constants at the runtime batch (0 = copy input dim). True if edited."""
    from onnx import numpy_helper

    graph = model.graph
    edited = False
    initializers = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        name = node.input[1]
        if name in initializers:
            tensor = initializers[name]
            shape = numpy_helper.to_array(tensor)
            if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
                shape = shape.copy()
                shape[0] = 0
                tensor.CopyFrom(numpy_helper.from_array(shape, name))
                edited = True
        elif name in constants:
            attr = constants[name].attribute[0]
            shape = numpy_helper.to_array(attr.t)
            if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
                shape = shape.copy()
                shape[0] = 0
                attr.t.CopyFrom(numpy_helper.from_array(shape))
                edited = True
    for value in list(graph.input) + list(graph.output):
        dim = value.type.tensor_type.shape.dim
        if dim and dim[0].HasField("dim_value") and dim[0].dim_value == 1:
            dim[0].dim_param = "batch"
    del graph.value_info[:]  # stale intermediate shapes would pin the batch again
    return edited


def _make_shape_dynamic(model, layout: str) -> None:
    """Mark the input's height and width (and the output's row count) as dynamic.

    Fully convolutional detectors compute every later shape from the input's (YOLOX's Reshape
    constants are [N, 85, -1], its upsampling is by scale); a graph that baked a size in fails the
    check in `_shape_dynamic_problem` instead.
    """
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim  # [batch, H, W, 3] after _prepend_preprocessing
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    rows_axis = 2 if layout == "yolov8" else 1
    for output in graph.output:
        out = output.type.tensor_type.shape.dim
        if len(out) > rows_axis:
            out[rows_axis].dim_param = "rows"
    del graph.value_info[:]  # inferred intermediate shapes would pin the square again


def check_shapes(hw: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """The rectangles the shape check runs: a 16:9 landscape and a 9:16 portrait camera's."""
    shapes = []
    for src_w, src_h in ((16, 9), (9, 16)):
        shape = rect_shape((src_w * 120, src_h * 120), hw, stride)
        if shape != tuple(hw) and shape not in shapes:
            shapes.append(shape)
    return shapes


def _shape_dynamic_problem(exported: bytes, dynamic: bytes, input_name: str, hw: tuple[int, int], preset: Preset,
                           rows_per_cell: int, path: Path) -> str | None:
    """Why the H/W-dynamic graph cannot be used (None: it can).

    It must compute what the exported graph computes at the square size, run at a landscape and
    a portrait rectangle, and give there one output row per grid cell (postprocess decodes with
    that grid). Raw outputs at a rectangle are not compared with the same image padded to the
    square: convolutions see the padding (zeros at the rectangle's edge, pad pixels in the square),
    which moves YOLOX-Nano's scores by up to 0.2 even 128 px from the edge (measured); the
    detections are compared on real video instead (tests/test_rect_letterbox.py).
    """
    reference = _check_session(exported, path)  # the graph as exported must load (else the user's error)
    try:
        session = _check_session(dynamic, path, severity=4)  # a failing run is the answer here, not an error to log
    except ModelError as exc:
        return f"the graph with a dynamic input size does not load ({exc})"
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (1, *hw, 3), dtype=np.uint8)
    expected, got = reference.run(None, {input_name: images}), session.run(None, {input_name: images})
    if not all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(expected, got)):
        return f"the graph with a dynamic input size computes other outputs at {hw[0]}x{hw[1]}"
    for shape in check_shapes(hw, preset.strides[-1]):
        images = rng.integers(0, 256, (1, *shape, 3), dtype=np.uint8)
        try:
            outputs = session.run(None, {input_name: images})
        except Exception as exc:
            return f"it does not run at {shape[0]}x{shape[1]} ({ort_message(exc, 120)})"
        rows_axis = 2 if preset.layout == "yolov8" else 1
        rows, need = outputs[0].shape[rows_axis], rows_per_cell * grid_rows(shape, preset.strides)
        if rows != need:
            return f"at {shape[0]}x{shape[1]} it gives {rows} output rows, not one per grid cell ({need})"
    return None


def rect_shape(source_size: tuple[int, int], input_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """The smallest (height, width), multiples of `stride`, that hold a `source_size` (w, h) frame
    scaled to fit `input_hw`: 768x432 in 416x416 -> (256, 416), as Ultralytics' rect letterbox."""
    src_w, src_h = source_size
    ratio = min(input_hw[1] / src_w, input_hw[0] / src_h)
    resized_w = max(1, min(input_hw[1], int(round(src_w * ratio))))
    resized_h = max(1, min(input_hw[0], int(round(src_h * ratio))))
    return (min(input_hw[0], -(-resized_h // stride) * stride), min(input_hw[1], -(-resized_w // stride) * stride))


def _onnx_div(a, b):
    """ONNX Div: integer division truncates (dimensions are never negative here)."""
    return a // b if np.issubdtype(np.asarray(a).dtype, np.integer) else a / b


_FOLDABLE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _onnx_div}


def _fold_static_shape_arithmetic(model) -> int:
    """Turn arithmetic on static tensor dimensions (Shape -> Gather -> Add/Div/...) into constants.

    Exporters compute, say, a channel split from `x.shape[1]` at run time. In PyTorch (the torch
    engine) each such value becomes a tensor read back by the host: a sync every call, and no CUDA
    graph capture. Only fixed dimensions are folded, so the batch (and a dynamic H/W) stays free.
    Returns the number of nodes folded.
    """
    from onnx import numpy_helper, shape_inference

    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: _dims(v) for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shape_of: dict[str, list] = {}
    folded = []
    for node in graph.node:
        result = None
        if node.op_type == "Shape" and not node.attribute:
            dims = shapes.get(node.input[0])
            if dims:
                shape_of[node.output[0]] = dims
        elif node.op_type == "Gather" and node.input[0] in shape_of and node.input[1] in values:
            dims = shape_of[node.input[0]]
            index = np.asarray(values[node.input[1]]).astype(np.int64) % len(dims)
            # never the batch, nor a dynamic height or width: only dimensions fixed for every input
            if not np.any(index == 0) and all(isinstance(dims[i], int) for i in index.flat):
                result = np.array([dims[i] for i in index.flat], np.int64).reshape(index.shape)
        elif node.op_type in _FOLDABLE and all(i in values for i in node.input):
            first = np.asarray(values[node.input[0]])
            result = np.asarray(_FOLDABLE[node.op_type](*(values[i] for i in node.input)), dtype=first.dtype)
        if result is not None:
            values[node.output[0]] = result
            folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.initializer.append(numpy_helper.from_array(values[node.output[0]], node.output[0]))
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type in ("Shape", "Constant") and n.output[0] not in used]:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    produced = {n.output[0] for n in folded}
    for tensor in [t for t in graph.initializer if t.name in produced and t.name not in used]:
        graph.initializer.remove(tensor)
    return len(folded)


def ort_message(exc: BaseException, limit: int = 200) -> str:
    """ONNX Runtime's error, shortened to what a user can act on: without its status prefix and the
    C++ source location and signature it puts before the reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S+\.(?:h|cc|cpp):\d+ [^()]*\([^()]*\)\s*", "", text)
    return text[:limit]


def _check_session(onnx_bytes: bytes, path: Path, severity: int = 3):
    """An ONNX Runtime CPU session for the checks below (the graph edits are verified by running them).

    A model ONNX Runtime cannot load (an op it does not know, an opset from the future) cannot be
    checked, so it is refused here with one line, as the onnxruntime engine would refuse it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = severity
    # a worker's share of the host's cores (set by the supervisor; ONNX Runtime itself ignores it)
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        options.intra_op_num_threads = int(share)
    try:
        return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"model.path: {path}: ONNX Runtime cannot load the model ({ort_message(exc)})") from None


def _same_outputs(a: bytes, b: bytes, input_name: str, hw: tuple[int, int], path: Path) -> bool:
    """Does edited graph `b` compute what `a` (the graph as exported) does? `a` must load."""
    images = np.random.default_rng(1).integers(0, 256, (1, hw[0], hw[1], 3), dtype=np.uint8)
    expected = _check_session(a, path).run(None, {input_name: images})
    try:
        got = _check_session(b, path).run(None, {input_name: images})
    except ModelError:  # the edit broke the graph: not kept
        return False
    return all(np.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(expected, got))


def _check_batch_equivalence(onnx_bytes: bytes, input_name: str, hw: tuple[int, int], path: Path, batch: int = 3) -> bool:
    """Does the batch-dynamic edit give, for a batch of N, the N outputs batch 1 gives?"""
    try:
        session = _check_session(onnx_bytes, path)
    except ModelError:  # the edit broke the graph: batch 1 is kept
        return False
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, hw[0], hw[1], 3), dtype=np.uint8)
    together = session.run(None, {input_name: images})
    for i in range(batch):
        alone = session.run(None, {input_name: images[i : i + 1]})
        for a, b in zip(together, alone):
            if a.shape[0] != batch or not np.allclose(a[i], b[0], rtol=1e-3, atol=1e-3):
                return False
    return True


def read_labels(path: Path | None) -> list[str] | None:
    """Class names from a labels file (None without one); read before the model, so that an
    unreadable file is reported in a moment."""
    if path is None:
        return None
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ModelError(f"model.labels: {path}: cannot read labels file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ModelError(f"model.labels: {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8, one name a line") from None
    return names


def labels_for(names: list[str] | None, num_classes: int, path: Path | None) -> list[str]:
    """One name per class the model predicts (class ids as names without a labels file)."""
    if names is None:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ModelError(f"model.labels: {path}: has {len(names)} names but the model predicts {num_classes} classes")
    return names


def check_classes(classes: list[int] | None, num_classes: int) -> None:
    """`model.classes` may only name classes the model predicts (else every frame comes out empty)."""
    unknown = sorted({c for c in classes or [] if c >= num_classes})
    if unknown:
        raise ModelError(f"model.classes: class id {unknown[0]} is not a class of the model "
                         f"(it predicts {num_classes} classes: ids 0-{num_classes - 1})")


def grid_rows(input_hw: tuple[int, int], strides: tuple[int, ...]) -> int:
    """Output rows of a grid-decoded (YOLOX) head: one per cell of each stride's grid."""
    return sum((input_hw[0] // s) * (input_hw[1] // s) for s in strides)


def _check_rows(output_dims: list, preset: Preset, input_hw: tuple[int, int], path: Path) -> None:
    """A YOLOX head's rows are its grid cells: any other count would fail every frame in postprocess."""
    if preset.layout != "yolox":  # v5/v8 boxes carry their own coordinates: any count decodes
        return
    rows, need = output_dims[1], grid_rows(input_hw, preset.strides)
    if isinstance(rows, int) and rows != need:
        raise ModelError(f"model.path: {path}: output has {rows} rows but preset {preset.name!r} needs {need} "
                         f"for a {input_hw[0]}x{input_hw[1]} input (strides {', '.join(map(str, preset.strides))}); "
                         f"is it a {preset.name} model?")


def _num_classes(output_dims: list, layout: str, path: Path) -> int:
    if len(output_dims) != 3:
        raise ModelError(f"model.path: {path}: output shape {output_dims} is not [N, boxes, values] as preset layout {layout!r} expects")
    boxes_first = all(isinstance(d, int) for d in output_dims[1:]) and output_dims[1] > output_dims[2]
    if layout in ("yolox", "yolov5"):
        values = output_dims[2]
        if not isinstance(values, int) or values < 6 or not boxes_first:
            raise ModelError(f"model.path: {path}: output shape {output_dims} does not match layout {layout!r} ([N, boxes, 5+classes])")
        return values - 5
    values = output_dims[1]
    if not isinstance(values, int) or values < 5 or boxes_first:
        raise ModelError(f"model.path: {path}: output shape {output_dims} does not match layout {layout!r} ([N, 4+classes, boxes])")
    return values - 4


def _rows_per_cell(output_dims: list, preset: Preset, hw: tuple[int, int]) -> int | None:
    """Output rows per grid cell at the square size (1 anchor-free, 3 for YOLOv5); None if not whole."""
    rows = output_dims[2] if preset.layout == "yolov8" else output_dims[1]
    cells = grid_rows(hw, preset.strides)
    if not isinstance(rows, int) or rows % cells:
        return None
    return rows // cells


def prepare_model(path: Path, preset_name: str, want_batch: int = 1, letterbox: str = "square") -> PreparedModel:
    """The graph the engines run. `letterbox="rect"` asks for a dynamic input height and width (kept
    only if the check passes; otherwise one log line says why and the model stays square)."""
    preset = PRESETS[preset_name]
    model = load_onnx(path)
    hw, batch_dim = _prepend_preprocessing(model, preset)
    if len(model.graph.output) < 1:
        raise ModelError(f"model.path: {path}: the model has no outputs")
    output_dims = _dims(model.graph.output[0])
    num_classes = _num_classes(output_dims, preset.layout, path)
    _check_rows(output_dims, preset, hw, path)
    batch_dynamic = not isinstance(batch_dim, int)
    if not batch_dynamic and batch_dim != 1:
        raise ModelError(f"model.path: {path}: fixed batch {batch_dim} is not supported; export with batch 1 or a dynamic batch")
    onnx_bytes = model.SerializeToString()
    shape_dynamic, rows_per_cell = False, _rows_per_cell(output_dims, preset, hw) or 1
    loads = False  # ONNX Runtime loaded the graph as exported (the edits are checked against it)
    if letterbox == "rect":
        dynamic = type(model)()
        dynamic.CopyFrom(model)
        _make_shape_dynamic(dynamic, preset.layout)
        candidate = dynamic.SerializeToString()
        if len(model.graph.output) != 1:
            problem = f"it has {len(model.graph.output)} outputs (one is supported)"
        elif _rows_per_cell(output_dims, preset, hw) is None:
            problem = f"its output rows ({output_dims}) are not a whole number per grid cell"
        else:
            problem = _shape_dynamic_problem(onnx_bytes, candidate, INPUT_NAME, hw, preset, rows_per_cell, path)
            loads = True  # it raised a ModelError otherwise
        if problem is None:
            model, onnx_bytes, shape_dynamic = dynamic, candidate, True
            log.info("model %s: input size dynamic, letterbox to each camera's rectangle (checked at %s)", Path(path).name,
                     ", ".join(f"{h}x{w}" for h, w in check_shapes(hw, preset.strides[-1])))
        else:
            log.warning("model %s: letterbox stays square %dx%d: %s", Path(path).name, hw[0], hw[1], problem)
    folded = type(model)()
    folded.CopyFrom(model)
    if _fold_static_shape_arithmetic(folded):
        loads = True  # _same_outputs raises a ModelError if it does not
        candidate = folded.SerializeToString()
        if _same_outputs(onnx_bytes, candidate, INPUT_NAME, hw, path):
            model, onnx_bytes = folded, candidate
        else:  # never expected: keep the model as exported
            log.warning("model %s: folding static shape arithmetic changed the outputs; not folded", Path(path).name)
    if not batch_dynamic and want_batch > 1:
        if not loads:  # a model that cannot load at all is the user's problem, not a bad edit
            _check_session(onnx_bytes, path)
        original = onnx_bytes
        if _make_batch_dynamic(model):
            candidate = model.SerializeToString()
            if _check_batch_equivalence(candidate, INPUT_NAME, hw, path):
                onnx_bytes, batch_dynamic = candidate, True
                log.info("model %s: made batch-dynamic (checked: batch-N output equals N batch-1 outputs)", Path(path).name)
            else:
                onnx_bytes = original
                log.warning("model %s: batch edit changed the outputs; keeping batch 1", Path(path).name)
        else:
            log.warning("model %s: fixed at batch 1 and no Reshape constant to edit; running batch 1", Path(path).name)
    return PreparedModel(
        onnx_bytes=onnx_bytes,
        input_name=INPUT_NAME,
        input_hw=hw,
        output_names=[o.name for o in model.graph.output],
        num_classes=num_classes,
        batch_dynamic=batch_dynamic,
        preset=preset,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        shape_dynamic=shape_dynamic,
        stride=preset.strides[-1],
        rows_per_cell=rows_per_cell,
    )
