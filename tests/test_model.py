"""The graph edits every engine gets: uint8 NHWC preprocessing inside the model, checked batch edit."""

import numpy as np
import onnxruntime as ort
import pytest

from conftest import MODEL
from engines.onnxruntime_engine import OnnxRuntimeEngine
from pipeline.model import INPUT_NAME, prepare_model


def session(data):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (3, 416, 416, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def original():
    return session(str(MODEL))


def test_prepended_preprocessing_equals_the_recipe(images, original):
    """YOLOX: BGR raw 0-255 NCHW; the prepared graph takes the slot's uint8 NHWC BGR directly."""
    prepared = prepare_model(MODEL, "yolox", want_batch=1)
    assert prepared.input_hw == (416, 416) and prepared.num_classes == 80
    ours = session(prepared.onnx_bytes).run(None, {INPUT_NAME: images[:1]})[0]
    recipe = original.run(None, {"images": images[:1].transpose(0, 3, 1, 2).astype(np.float32)})[0]
    assert np.allclose(ours, recipe, rtol=1e-4, atol=1e-4)


def test_rgb_and_scale_presets_apply_inside_the_graph(images):
    """A v5-style preset on the same graph: RGB order and /255 must reach the model's input."""
    prepared = prepare_model(MODEL, "yolov5", want_batch=1)
    net = session(prepared.onnx_bytes)
    original = session(str(MODEL))
    expected = original.run(None, {"images": (images[:1, :, :, ::-1].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)})[0]
    assert np.allclose(net.run(None, {INPUT_NAME: images[:1]})[0], expected, rtol=1e-4, atol=1e-4)


def test_batch_edit_gives_n_times_the_batch_one_output(images):
    prepared = prepare_model(MODEL, "yolox", want_batch=8)
    assert prepared.batch_dynamic
    net = session(prepared.onnx_bytes)
    together = net.run(None, {INPUT_NAME: images})[0]
    assert together.shape == (3, 3549, 85)
    for i in range(3):
        assert np.allclose(together[i], net.run(None, {INPUT_NAME: images[i : i + 1]})[0][0], atol=1e-4)


def test_batch_one_is_kept_when_batching_is_not_asked_for():
    prepared = prepare_model(MODEL, "yolox", want_batch=1)
    assert not prepared.batch_dynamic
    engine = OnnxRuntimeEngine(prepared, max_batch=8, intra_op_threads=1)
    assert engine.max_batch == 1
    assert engine.inputs[0].shape == (1, 416, 416, 3) and engine.inputs[0].dtype == np.uint8


def test_engine_specs_show_the_dynamic_batch(images):
    engine = OnnxRuntimeEngine(prepare_model(MODEL, "yolox", want_batch=4), max_batch=4, intra_op_threads=1)
    assert engine.max_batch == 4
    assert engine.inputs[0].shape == (None, 416, 416, 3)
    assert engine.outputs[0].shape[1:] == (3549, 85)
    assert engine.infer(images[:2])[0].shape == (2, 3549, 85)


def test_wrong_layout_for_the_model_is_refused():
    from pipeline.errors import ModelError

    with pytest.raises(ModelError, match="does not match layout 'yolov8'"):
        prepare_model(MODEL, "yolov8", want_batch=1)


def test_identity_shared_weights_are_inlined_for_the_torch_engine():
    """PyTorch's exporter names a repeated tensor through an Identity node; the torch engine's
    converter needs every convolution's bias as an initializer. Inlining keeps the outputs."""
    from onnx import TensorProto, helper, numpy_helper

    from engines.torch_engine import _inline_identity_initializers

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["b_shared"]),
         helper.make_node("Conv", ["x", "w", "b_shared"], ["y"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert _inline_identity_initializers(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert "b_shared" in {t.name for t in model.graph.initializer}
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)


def test_shape_arithmetic_on_static_dims_is_folded_but_the_batch_stays_free():
    """x * (x.shape[1] / 2) + x.shape[0]: the channel term becomes a constant, the batch term does not."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.model import _fold_static_shape_arithmetic

    constants = [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array(2, np.int64), "two")]
    graph = helper.make_graph([
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["c"]),
        helper.make_node("Div", ["c", "two"], ["half"]),
        helper.make_node("Cast", ["half"], ["half_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["s", "zero"], ["n"]),
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "half_f"], ["scaled"]),
        helper.make_node("Add", ["scaled", "n_f"], ["y"]),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 2])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    assert _fold_static_shape_arithmetic(model) == 2  # Gather(1) and Div; Gather(0) is the batch
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") == 1 and "Div" not in ops
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        np.testing.assert_allclose(session.run(None, {"x": x[:batch]})[0], x[:batch] * 2 + batch)
