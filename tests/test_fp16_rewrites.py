"""The fp16 rewrites of the converted YOLOX module (bench/fp16_rewrites.py) change nothing in fp32:
the constants they take out of the stored activations and the pixels come back, exactly, through
the biases and the borders. Runs on the CPU wherever torch and onnx2torch are installed."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx2torch")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import MODEL  # noqa: E402

if not MODEL.is_file():
    pytest.skip("needs the demo model (scripts/test.sh fetches the assets)", allow_module_level=True)


@pytest.fixture(scope="module")
def setup():
    import torch

    from bench.fp16_emulate import cpu_module
    from bench.fp16_precision import calibration_images, frames
    from pipeline.model import prepare_model

    torch.manual_seed(0)
    prepared = prepare_model(MODEL, "yolox", want_batch=32)
    images = frames(8)
    with torch.no_grad():
        reference = cpu_module(prepared)(torch.from_numpy(images))
    return prepared, images, reference, calibration_images(2, 416, 416)


def _rewritten(prepared, calibration):
    from bench.fp16_emulate import cpu_module
    from bench.fp16_rewrites import centre_pixels, shift_activations

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
            pads[0].shift.zero_()
        else:
            name, silu = next((n, m) for n, m in module.named_children() if n.startswith("shifted_silu_"))
            producer = module.get_submodule(next(node.args[0].target for node in module.graph.nodes
                                                 if node.op == "call_module" and node.target == name))
            producer.bias.add_(silu.shift.flatten())
        out = module(torch.from_numpy(images))
    assert float((out - reference).abs().max()) > 1e-2
