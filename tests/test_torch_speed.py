"""The speed rewrites of the converted YOLOX module (engines/torch_speed.py) compute what it
computed: the padded stem adds only zero terms, the cascaded pools are the same maxima. Runs on
the CPU wherever torch and onnx2torch are installed (CI has neither: skipped there)."""

import pytest

from conftest import MODEL, needs_torch_and_model

needs_torch_and_model()


@pytest.fixture(scope="module")
def setup():
    import torch

    from bench.fp16_emulate import cpu_module
    from bench.fp16_precision import frames
    from pipeline.model import prepare_model

    prepared = prepare_model(MODEL, "yolox", want_batch=32)
    images = torch.from_numpy(frames(4))
    with torch.no_grad():
        reference = cpu_module(prepared)(images)
    return prepared, images, reference


def test_rewritten_yolox_gives_the_same_outputs(setup):
    import torch

    from bench.fp16_emulate import cpu_module
    from engines.torch_speed import _same_pool, cascade_max_pools, pad_conv_channels

    prepared, images, reference = setup
    module = cpu_module(prepared)
    assert pad_conv_channels(module) == ["Conv_41"]  # the stem: 12 channels, padded to 16
    assert module.get_submodule("Conv_41").weight.shape[1] == 16
    assert cascade_max_pools(module) == 2  # SPP's 9x9 and 13x13
    pools = [module.get_submodule(n.target) for n in module.graph.nodes
             if n.op == "call_module" and isinstance(module.get_submodule(n.target), torch.nn.MaxPool2d)]
    assert [_same_pool(p) for p in pools] == [5, 5, 5]
    with torch.no_grad():
        out = module(images)
    # the pools are exact; the padded stem sums the same products (plus zeros) in another order
    assert torch.allclose(out, reference, rtol=0, atol=1e-4), (out - reference).abs().max()


@pytest.mark.parametrize("sizes", [(5, 9, 13), (3, 7), (5, 5, 9)])
def test_cascaded_pools_equal_the_wide_ones_at_the_borders_too(sizes):
    """Negative values near the borders: a pool that padded with zeros instead of -inf, or chained
    with the wrong step, would differ there."""
    import torch

    from engines.torch_speed import cascade_max_pools

    class Spp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pools = torch.nn.ModuleList(torch.nn.MaxPool2d(k, 1, k // 2) for k in sizes)

        def forward(self, x):
            return torch.cat([x] + [p(x) for p in self.pools], 1)

    x = torch.randn(2, 3, 11, 17) - 2
    traced = torch.fx.symbolic_trace(Spp())
    with torch.no_grad():
        reference = traced(x)
        assert cascade_max_pools(traced) == len([s for a, s in zip(sizes, sizes[1:]) if s != a])
        assert torch.equal(traced(x), reference)


def test_pools_that_are_not_same_size_stride_1_are_left():
    import torch

    from engines.torch_speed import cascade_max_pools

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.MaxPool2d(3, 1, 1)
            self.b = torch.nn.MaxPool2d(5, 2, 2)  # stride 2: not a widening of a

        def forward(self, x):
            return self.a(x) + self.b(x).mean()

    assert cascade_max_pools(torch.fx.symbolic_trace(Two())) == 0


def test_rgb_depthwise_and_aligned_convolutions_are_not_padded():
    import torch

    from engines.torch_speed import pad_conv_channels

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.Conv2d(12, 12, 3, groups=12),
                                torch.nn.Conv2d(12, 16, 1), torch.nn.Conv2d(16, 8, 1))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        reference = traced(x)
        assert pad_conv_channels(traced) == ["2"]  # the dense 12-channel one only (RGB: 3 to 8, left)
        assert torch.allclose(traced(x), reference, atol=1e-5)
