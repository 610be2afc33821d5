"""Rewrites of the converted module that change how the GPU runs it, not what it computes: applied
to the fp32 module before autocast, torch.compile and CUDA-graph capture, like engines/torch_fp16.py.

Found in the kernel profile of compiled YOLOX-Nano, fp16 in every layer, batch 32 on an H100
(bench/engine_variants.py --profile, bench/results/gpu.md): of about 66 us a frame of kernels,
- one convolution took 16 us: the stem (12 input channels, 3x3, at 208x208) ran cuDNN's generic
  `convolve_common_engine_float_NHWC<__half>` kernel, at about 9 TFLOP/s. fp16 tensor-core
  convolutions need the input channels in multiples of 8; 12 is not (`pad_conv_channels`);
- the SPP block's 9x9 and 13x13 max pools took 7 us, as inductor reduction kernels over 81 and 169
  values an output (`cascade_max_pools`).
Not yet used by the engine: the bench measures them first.
"""

from __future__ import annotations


def _call_modules(module, kind) -> list:
    return [n for n in module.graph.nodes if n.op == "call_module" and isinstance(module.get_submodule(n.target), kind)]


def pad_conv_channels(module, multiple: int = 8) -> list[str]:
    """Dense convolutions whose input channels are not a multiple of `multiple` read zero channels
    up to it, with zero weights for them: the same sums (each added term is 0 x 0), in a shape
    cuDNN's fp16 tensor-core kernels take. For YOLOX the stem, 12 channels to 16 (the 4 pixel
    phases of its space-to-depth times RGB). For fp16 only (the caller applies it there): in fp32
    (no TF32 here) the padding is 33% more multiply-adds for the same kernel. Not where the zeros
    would be more than half the input again (a 3-channel RGB stem: 8 channels would be 2.7 times
    the image's bytes to write and read, unmeasured). Changes the module in place; returns the targets."""
    import torch
    import torch.nn.functional as F

    class ZeroChannels(torch.nn.Module):
        def __init__(self, extra: int):
            super().__init__()
            self.extra = extra

        def forward(self, x):
            return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # NCHW: the channel dimension, at its end

    padded = []
    for node in _call_modules(module, torch.nn.Conv2d):
        conv = module.get_submodule(node.target)
        extra = -conv.in_channels % multiple
        if conv.groups != 1 or not extra or 2 * extra > conv.in_channels or len(node.args) != 1 or node.kwargs:
            continue
        with torch.no_grad():
            weight = conv.weight
            zeros = weight.new_zeros((weight.shape[0], extra, *weight.shape[2:]))
            conv.weight = torch.nn.Parameter(torch.cat([weight, zeros], 1))  # NCHW: the caller sets the layout
        conv.in_channels += extra
        name = f"zero_channels_{node.target.replace('.', '_')}"
        module.add_submodule(name, ZeroChannels(extra))
        with module.graph.inserting_before(node):
            node.args = (module.graph.call_module(name, (node.args[0],)),)
        padded.append(node.target)
    module.graph.lint()
    module.recompile()
    return padded


def _same_pool(pool) -> int | None:
    """The kernel size of a square, odd, stride-1 max pool padded to keep its input's size; else None."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    k, s, p, d = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding), pair(pool.dilation)
    if (k[0] == k[1] and k[0] % 2 == 1 and s == (1, 1) and p == (k[0] // 2,) * 2 and d == (1, 1)
            and not pool.ceil_mode and not pool.return_indices):
        return k[0]
    return None


def cascade_max_pools(module) -> int:
    """Sibling max pools of one input (SPP: 5x5, 9x9 and 13x13, stride 1, same size) become a
    chain, each pooling the last one's output with the difference: 9 = 5 then 5, 13 = 9 then 5
    (SPPF). Exact: a max of maxes over windows that cover the larger window, and max pool pads
    with -inf, so the image's borders agree too. Changes the module in place; returns the pools
    rewritten."""
    import torch

    from engines.torch_engine import _replace

    order = {node: i for i, node in enumerate(module.graph.nodes)}
    siblings: dict = {}
    for node in _call_modules(module, torch.nn.MaxPool2d):
        size = _same_pool(module.get_submodule(node.target))
        if size is not None and len(node.args) == 1 and not node.kwargs:
            siblings.setdefault(node.args[0], []).append((size, node))
    rewritten = 0
    for group in siblings.values():
        group.sort(key=lambda pair: pair[0])
        if [order[node] for _, node in group] != sorted(order[node] for _, node in group):
            continue  # a pool would read one that comes after it in the graph: left as it is
        for (smaller, previous), (size, node) in zip(group, group[1:]):
            if size == smaller:
                continue
            step = size - smaller + 1  # odd: both sizes are odd
            _replace(module, node.target, torch.nn.MaxPool2d(step, stride=1, padding=step // 2))
            node.args = (previous,)
            rewritten += 1
    module.graph.lint()
    module.recompile()
    return rewritten
