"""The fp16 rewrites of the converted YOLOX module (engines/torch_fp16.py) change nothing in fp32:
the constants they take out of the stored activations and the pixels come back, exactly, through
the biases and the borders. Runs on the CPU wherever torch and onnx2torch are installed."""

import pytest

from conftest import MODEL, needs_torch_and_model

needs_torch_and_model()


@pytest.fixture(scope="module")
def setup():
    import torch

    from bench.fp16_emulate import cpu_module
    from bench.fp16_precision import frames
    from engines.torch_fp16 import calibration_images
    from pipeline.model import prepare_model

    torch.manual_seed(0)
    prepared = prepare_model(MODEL, "yolox", want_batch=32)
    images = frames(8)
    with torch.no_grad():
        reference = cpu_module(prepared)(torch.from_numpy(images))
    return prepared, images, reference, calibration_images(2, 416, 416)


def _rewritten(prepared, calibration):
    from bench.fp16_emulate import cpu_module
    from engines.torch_fp16 import centre_pixels, shift_activations

    module = cpu_module(prepared)
    assert centre_pixels(module) == 1  # YOLOX's first convolution reads the raw pixels
    convs, channels = shift_activations(module, calibration)
    assert convs >= 20 and channels >= 200
    return module


def test_rewritten_module_gives_the_same_outputs_in_fp32(setup):
    import torch

    prepared, images, reference, calibration = setup
    module = _rewritten(prepared, calibration)
    with torch.no_grad():
        out = module(torch.from_numpy(images))
    assert float((out - reference).abs().max()) < 1e-3


@pytest.mark.parametrize("mistake", ["border keeps zeros", "producer bias not shifted"])
def test_a_wrong_fold_is_seen(setup, mistake):
    """The comparison above notices the folds: undo one of them (a padded consumer whose border
    keeps zeros, as a fold into the bias alone would leave it; a producer still writing silu(z))
    and the outputs move by more than its tolerance."""
    import torch

    prepared, images, reference, calibration = setup
    module = _rewritten(prepared, calibration)
    with torch.no_grad():
        if mistake == "border keeps zeros":
            pads = [m for name, m in module.named_children() if name.startswith("shifted_pad_")]
            assert pads
            pads[0].border.zero_()
        else:
            name, silu = next((n, m) for n, m in module.named_children() if n.startswith("shifted_silu_"))
            producer = module.get_submodule(next(node.args[0].target for node in module.graph.nodes
                                                 if node.op == "call_module" and node.target == name))
            producer.bias.add_(silu.shift.flatten())
        out = module(torch.from_numpy(images))
    assert float((out - reference).abs().max()) > 1e-2


def test_engine_rewrite_gives_the_same_outputs_in_fp32(setup):
    """engine.fp16_exact's whole rewrite (every SiLU output centred, convs 1-9 split) changes nothing in fp32."""
    import torch

    from bench.fp16_emulate import cpu_module
    from engines.torch_fp16 import make_fp16_exact

    prepared, images, reference, _ = setup
    module = cpu_module(prepared)
    changed = make_fp16_exact(module, (416, 416), calibration=2)
    assert changed["centred"] == 1 and changed["shifted_convs"] >= 60 and changed["split_macs_per_pixel"] > 0
    with torch.no_grad():
        out = module(torch.from_numpy(images))
    assert float((out - reference).abs().max()) < 1e-3


def test_split_weights_are_two_fp16_halves(setup):
    """hi + lo, each rounded to fp16 as autocast does, is W far more closely than W rounded (its
    fp16 error is what the split removes); a depthwise convolution's channels stay in their groups
    (a wrong order would move the fp32 outputs, which the test above holds)."""
    import torch

    from bench.fp16_emulate import cpu_module
    from engines.torch_engine import convolutions
    from engines.torch_fp16 import split_weights

    prepared, *_ = setup
    module = cpu_module(prepared)
    original = [c.weight.detach().clone() for _, c in convolutions(module)[1:3]]
    assert convolutions(module)[1][1].groups > 1  # conv 1 is depthwise
    assert split_weights(module, [1, 2]) > 0
    for w, (_, conv) in zip(original, convolutions(module)[1:3]):
        hi, lo = conv.weight.detach().chunk(2, 1)
        assert torch.equal(hi + lo, w)
        split_error = (hi.half().float() + lo.half().float() - w).abs().max()
        rounded_error = (w.half().float() - w).abs().max()
        assert split_error < rounded_error / 50


def test_rewrites_build_no_tensors_per_call(setup):
    """Capture-safe: the rewritten forward creates no tensor from host values (no zeros, full,
    tensor...) beyond what the converted module already does; its constants are buffers."""
    import torch
    from torch.overrides import TorchFunctionMode

    from bench.fp16_emulate import cpu_module
    from engines.torch_fp16 import make_fp16_exact

    factories = {torch.zeros, torch.zeros_like, torch.ones, torch.ones_like, torch.full, torch.full_like,
                 torch.tensor, torch.as_tensor, torch.empty, torch.empty_like, torch.arange}

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += func in factories
            return func(*args, **(kwargs or {}))

    prepared, images, _, calibration = setup
    counts = []
    for rewrite in (False, True):
        module = cpu_module(prepared)
        if rewrite:
            make_fp16_exact(module, (416, 416), calibration=1)
        count = Count()
        with torch.no_grad(), count:
            module(torch.from_numpy(images[:1]))
        counts.append(count.calls)
    assert counts[1] <= counts[0]
    added = [m for name, m in module.named_children() if name.startswith(("shifted_", "split_", "centred_"))]
    assert added and all(not list(m.parameters(recurse=False)) for m in added)


def test_rewritten_module_traces_as_one_graph(setup):
    """torch.compile can take the rewritten module whole: dynamo traces it as one graph with no
    break (a rewrite reading host values or calling Python per tensor would break it)."""
    import torch

    from bench.fp16_emulate import cpu_module
    from engines.torch_engine import _keep_shape_constants_on_host, _static_shape_modules
    from engines.torch_fp16 import make_fp16_exact

    prepared, *_ = setup
    module = cpu_module(prepared)
    _keep_shape_constants_on_host(module)
    make_fp16_exact(module, (416, 416), calibration=1)
    _static_shape_modules(module)  # as the engine does with engine.compile
    with torch.no_grad():
        explain = torch._dynamo.explain(module)(torch.zeros((2, 416, 416, 3), dtype=torch.uint8))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


def test_split_convolutions_compile_channels_last():
    """The compiled engine runs channels_last: inductor takes the split convolutions' doubled
    inputs (whole and depthwise) in that layout and gives eager's outputs. The doubled groups were
    once a view that a channels_last tensor cannot take, so every compiled fp16_exact engine fell
    back to eager (GPU time a frame 4.3x the compiled one's on an H200)."""
    import torch

    from engines.torch_fp16 import split_weights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1, groups=2))
    module = torch.fx.symbolic_trace(net)
    split_weights(module, [1, 2])
    module = module.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = module(x)
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="inductor", dynamic=False)(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)
