"""fp16 with no fp32 islands for the torch engine (`engine.fp16_exact`): rewrites of the converted
module, exact in real numbers, that make the values fp16 rounds small, so every layer can run in fp16.

Applied to the fp32 module before autocast, torch.compile and CUDA-graph capture: plain torch ops,
constants as registered buffers on the module's device, nothing built from host values per call.
Measured only in CPU emulation of autocast (bench/fp16_emulate.py, bench/results/fp16_precision.md);
not yet run on a GPU, so the option is off by default.
"""

from __future__ import annotations

import numpy as np


def calibration_images(count: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, h, w, 3] images with natural images' first statistics (mid-grey mean, smooth
    structure at several scales, some letterbox padding): what recentring needs, with no asset."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((count, h, w, 3), np.uint8)
    for i in range(count):
        image = np.zeros((h, w, 3), np.float32)
        for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
            noise = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
            image += weight * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
        out[i, int(h * rng.uniform(0.55, 0.8)):] = 114  # padding below a wide frame
    return out


def _silu_sites(module) -> list[tuple]:
    """(conv node, sigmoid node, mul node, consumer nodes) for each convolution followed by SiLU
    (onnx2torch's Sigmoid and Mul) whose output feeds only convolutions (zero padding or none):
    there a per-channel constant added to the activation is a per-output constant after the
    consumer, which its bias can take (a padded consumer's border is made to hold the constant)."""
    import torch

    def module_of(node):
        return module.get_submodule(node.target) if node.op == "call_module" else None

    def consumer_conv(node, source) -> bool:
        conv = module_of(node)
        return (isinstance(conv, torch.nn.Conv2d) and len(node.args) == 1 and not node.kwargs
                and node.args[0] is source and not isinstance(conv.padding, str) and conv.padding_mode == "zeros")

    sites = []
    for node in module.graph.nodes:
        if not isinstance(module_of(node), torch.nn.Conv2d) or len(node.users) != 2:
            continue
        sigmoid = [u for u in node.users if isinstance(module_of(u), torch.nn.Sigmoid)]
        mul = [u for u in node.users if type(module_of(u)).__name__ == "OnnxBinaryMathOperation"
               and module_of(u).math_op_function is torch.mul and module_of(u).broadcast is None]
        if len(sigmoid) != 1 or len(mul) != 1:
            continue
        sigmoid, mul = sigmoid[0], mul[0]
        if set(mul.args) != {node, sigmoid} or len(mul.args) != 2 or list(sigmoid.users) != [mul]:
            continue
        consumers = list(mul.users)
        if consumers and all(consumer_conv(u, mul) for u in consumers):
            sites.append((node, sigmoid, mul, consumers))
    return sites


def shift_activations(module, images: np.ndarray, min_gain: float = 2.0, centre_rest: bool = False) -> tuple[int, int]:
    """Store small numbers in fp16: SiLU outputs that sit far from zero with a small spread are
    written as silu(z) - k, k folded into the producer's and the consumers' biases, exactly.

    YOLOX's BatchNorm was folded over inputs with large, nearly constant channels (values of 2-5
    with a spread of 0.01-0.3); the next convolution's weights and bias cancel them (bias 76 on
    the third convolution). In fp16 those stored values carry rounding errors of ~1e-3 that the
    cancellation does not remove. With a per-channel k (the calibrated mean of the activation,
    rounded to an fp16 number) the convolution's bias becomes b - k, so it computes z' = z - k,
    the activation writes silu(z' + k) - k = z' - s * sigmoid(-s) with s = z' + k (exact in real
    numbers; the last term is small where silu is nearly linear), and each consumer's bias gains
    W * k, computed in fp64. A channel is shifted where the calibrated sizes of what fp16 rounds
    shrink `min_gain` times; the others keep silu. Only convolutions whose activation feeds
    convolutions only are candidates (`_silu_sites`; a padded consumer gets a border of -k). The
    module is changed in place and stays an fx graph of plain torch ops with device buffers, no
    host values in forward (meant for torch.compile and CUDA graphs; not yet tried under them).
    Returns (convolutions changed, channels shifted).
    """
    import torch
    import torch.nn.functional as F

    class ShiftedSiLU(torch.nn.Module):
        """silu(z + k) - k per channel where `mask`; silu(z) - t elsewhere (k is 0 there; t is 0 where
        `mask`, and 0 everywhere unless centre_rest)."""

        def __init__(self, shift, mask, tail):
            super().__init__()
            self.register_buffer("shift", shift.view(1, -1, 1, 1).float())
            self.register_buffer("mask", mask.view(1, -1, 1, 1))
            self.register_buffer("tail", tail.view(1, -1, 1, 1).float())

        def forward(self, z):
            s = z + self.shift.to(z.dtype)
            return torch.where(self.mask, z - s * torch.sigmoid(-s), s * torch.sigmoid(s) - self.tail.to(z.dtype))

    class ShiftedPad(torch.nn.Module):
        """A padded consumer's zero border, for an input stored minus k: the border holds -k, so the
        convolution (now without padding) sees what it saw before, plus k everywhere. The border is
        the buffer expanded (a view), so nothing is built per call."""

        def __init__(self, shift, padding):
            super().__init__()
            self.register_buffer("border", -shift.view(1, -1, 1, 1).float())
            self.ph, self.pw = padding

        def forward(self, x):
            n, c, h, w = x.shape
            b = self.border.to(x.dtype)
            if self.ph:
                rows = b.expand(n, c, self.ph, w)
                x = torch.cat([rows, x, rows], 2)
            if self.pw:
                cols = b.expand(n, c, h + 2 * self.ph, self.pw)
                x = torch.cat([cols, x, cols], 3)
            return x

    sites = _silu_sites(module)
    convs = [module.get_submodule(node.target) for node, *_ in sites]
    param = next(module.parameters())

    def calibrate(reduce):
        totals: dict[int, torch.Tensor] = {}
        hooks = [conv.register_forward_hook(lambda conv, args, z, i=i: totals.__setitem__(
            i, totals.get(i, 0) + reduce(i, z.detach().double().transpose(0, 1).flatten(1))))
            for i, conv in enumerate(convs)]
        try:
            with torch.no_grad():
                for image in images:  # one at a time: a model with a fixed batch of 1 works too
                    module(torch.from_numpy(np.ascontiguousarray(image[None])).to(param.device))
        finally:
            for hook in hooks:
                hook.remove()
        return totals

    def g(s):  # s - silu(s)
        return s * torch.sigmoid(-s)

    # pass 1: k = mean activation; pass 2: sizes of the values fp16 rounds, per channel, with and
    # without the shift (z, sigmoid, product; shifted: z', s, g's two factors, the result)
    means = calibrate(lambda i, z: F.silu(z).mean(1))
    shifts = {i: (m / len(images)).float().half().double() for i, m in means.items()}

    def sizes(i, z):
        a, k, p = F.silu(z), shifts[i][:, None], torch.sigmoid(z)
        dsilu = p * (1 + z * (1 - p))  # silu'(z); g'(z) = 1 - silu'(z)
        before = ((z * dsilu).abs() + 2 * a.abs()).mean(1)
        after = ((z - k).abs() + (z * (1 - dsilu)).abs() + 2 * g(z).abs() + (a - k).abs()).mean(1)
        return torch.stack([before, after])

    estimates = calibrate(sizes)
    changed = shifted = 0
    with torch.no_grad():
        for i, (node, sigmoid, mul, consumers) in enumerate(sites):
            if i not in estimates:
                continue
            before, after = estimates[i]
            mask = after * min_gain < before
            if not mask.any() and not centre_rest:
                continue
            zero = torch.zeros_like(shifts[i])
            k = torch.where(mask, shifts[i], zero) if not centre_rest else shifts[i]  # what consumers get back
            conv = convs[i]
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, device=param.device, dtype=param.dtype))
            conv.bias.copy_((conv.bias.double() - torch.where(mask, k, zero)).to(conv.bias.dtype))
            for user in consumers:
                consumer = module.get_submodule(user.target)
                kh, kw = ((s - 1) * d + 1 for s, d in zip(consumer.kernel_size, consumer.dilation))
                constant = k.view(1, -1, 1, 1).expand(1, -1, kh, kw)
                delta = F.conv2d(constant, consumer.weight.double(), None, 1, 0, consumer.dilation, consumer.groups)
                if consumer.bias is None:
                    consumer.bias = torch.nn.Parameter(torch.zeros(consumer.out_channels, device=param.device,
                                                                   dtype=consumer.weight.dtype))
                consumer.bias.copy_((consumer.bias.double() + delta.flatten()).to(consumer.bias.dtype))
                if any(consumer.padding):
                    pad_name = f"shifted_pad_{i}_{user.target.replace('.', '_')}"
                    module.add_submodule(pad_name, ShiftedPad(k.float(), consumer.padding).to(param.device))
                    with module.graph.inserting_before(user):
                        user.args = (module.graph.call_module(pad_name, (mul,)),)
                    consumer.padding = (0,) * len(consumer.padding)
            name = f"shifted_silu_{i}_{node.target.replace('.', '_')}"
            module.add_submodule(name, ShiftedSiLU(torch.where(mask, k, zero).float(), mask,
                                                        torch.where(mask, zero, k).float()).to(param.device))
            with module.graph.inserting_after(mul):
                replacement = module.graph.call_module(name, (node,))
            mul.replace_all_uses_with(replacement)
            module.graph.erase_node(mul)
            module.graph.erase_node(sigmoid)
            changed, shifted = changed + 1, shifted + int(mask.sum())
    module.graph.lint()
    module.recompile()
    return changed, shifted


_PIXEL_MOVES = {"OnnxCast", "OnnxTranspose", "OnnxSlice", "OnnxConcat", "StaticSlice", "StaticReshape"}


def centre_pixels(module, centre: float = 128.0, split_weights: bool = True) -> int:
    """Convolutions that read the raw pixels (0-255, exact in fp16) read (x - 128) * 2^-e instead,
    with W * 2^e and the bias plus W * 128 (fp64); their zero border becomes (0 - 128) * 2^-e.

    Exact in real numbers, and in fp16 too (integers in [-128, 127] times a power of two). YOLOX
    reads raw 0-255 pixels (mean ~114): the first convolution's sums reach 111 against an output
    spread of 3, so fp16's rounding of its weights (2^-12 of each) times pixels of ~114 moves the
    output; centred pixels carry that rounding only on their distance from 128. The power of two
    takes the weights (288 of 1728 under fp16's smallest normal number) into fp16's normal range.
    Candidates: convolutions whose input comes from the graph input through data movement only
    (cast, transpose, slice, concat: YOLOX's Focus), not through a /255. Returns how many."""
    import torch
    import torch.nn.functional as F

    class CentredPixels(torch.nn.Module):
        def __init__(self, centre: float, scale: float, padding, split: bool):
            super().__init__()
            self.centre, self.scale, self.split = centre, scale, split
            self.pads = (padding[1], padding[1], padding[0], padding[0])

        def forward(self, x):
            y = (x - self.centre) * self.scale
            y = F.pad(y, self.pads, value=-self.centre * self.scale) if any(self.pads) else y
            return torch.cat([y, y], 1) if self.split else y

    def from_pixels(node) -> bool:
        if node.op == "placeholder":
            return True
        if node.op == "get_attr":
            return True  # slice bounds
        if node.op != "call_module" or type(module.get_submodule(node.target)).__name__ not in _PIXEL_MOVES:
            return False
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        inputs += [a for arg in node.args if isinstance(arg, (list, tuple)) for a in arg if isinstance(a, torch.fx.Node)]
        return bool(inputs) and all(from_pixels(a) for a in inputs)

    changed = 0
    for node in list(module.graph.nodes):
        conv = module.get_submodule(node.target) if node.op == "call_module" else None
        if (not isinstance(conv, torch.nn.Conv2d) or len(node.args) != 1 or node.kwargs or isinstance(conv.padding, str)
                or conv.padding_mode != "zeros" or not from_pixels(node.args[0])):
            continue
        with torch.no_grad():
            w = conv.weight.double()
            kh, kw = ((s - 1) * d + 1 for s, d in zip(conv.kernel_size, conv.dilation))
            constant = torch.full((1, w.shape[1] * conv.groups, kh, kw), centre, dtype=torch.float64, device=w.device)
            delta = F.conv2d(constant, w, None, 1, 0, conv.dilation, conv.groups).flatten()
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=w.device))
            conv.bias.copy_((conv.bias.double() + delta).to(conv.bias.dtype))
            e = int(np.floor(np.log2(16 / max(float(w.abs().max()), 1e-30))))  # largest weight in [8, 16)
            conv.weight.mul_(2.0**e)
            split = split_weights and conv.groups == 1
            if split:
                _split_hi_lo(conv)
        name = f"centred_pixels_{changed}_{node.target.replace('.', '_')}"
        module.add_submodule(name, CentredPixels(centre, 2.0**-e, conv.padding, split))
        conv.padding = (0,) * len(conv.padding)
        with module.graph.inserting_before(node):
            node.args = (module.graph.call_module(name, (node.args[0],)),)
        changed += 1
    module.graph.lint()
    module.recompile()
    return changed


def _split_hi_lo(conv) -> None:
    """conv's weight W becomes [hi, lo] along the input channels (hi = W rounded to fp16, lo = the
    rest), so a convolution reading each input channel twice sums W exactly in its fp32
    accumulator. The caller arranges the doubled input."""
    import torch

    with torch.no_grad():
        hi = conv.weight.half().float()
        conv.weight = torch.nn.Parameter(torch.cat([hi, conv.weight - hi], 1))
    conv.in_channels *= 2


def split_weights(module, indices) -> int:
    """Convolutions (graph order `indices`) whose weights are each written as hi + lo, two fp16
    numbers (hi = W rounded to fp16, lo = the rest), summed by the convolution's fp32 accumulator:
    each input channel is read twice, once per half. Exact in fp32 (hi + lo = W); in fp16 it
    removes the weights' rounding (2^-12 of each) at twice the convolution's multiply-adds.
    Grouped and depthwise convolutions duplicate each channel inside its group. Returns the
    multiply-adds per output pixel added (sum over the convolutions of out x in/groups x kh x kw)."""
    import torch

    from engines.torch_engine import convolutions

    class Doubled(torch.nn.Module):
        """Each group's input channels twice in a row: [x_g, x_g] per group (channel order of the
        split weight [hi_g, lo_g])."""

        def __init__(self, groups: int):
            super().__init__()
            self.groups = groups

        def forward(self, x):
            # reshape, not view: under torch.compile the engine runs channels_last, and the
            # concatenated groups of a channels_last tensor cannot be viewed as NCHW
            if self.groups == 1:
                return torch.cat([x, x], 1)
            n, c, h, w = x.shape
            g = x.reshape(n, self.groups, 1, c // self.groups, h, w)
            return torch.cat([g, g], 2).reshape(n, 2 * c, h, w)

    targets = [target for target, _ in convolutions(module)]
    nodes = {n.target: n for n in module.graph.nodes if n.op == "call_module"}
    added = 0
    for index in indices:
        target = targets[index]
        conv = module.get_submodule(target)
        node = nodes[target]
        _split_hi_lo(conv)
        name = f"split_input_{index}_{target.replace('.', '_')}"
        module.add_submodule(name, Doubled(conv.groups))
        with module.graph.inserting_before(node):
            node.args = (module.graph.call_module(name, (node.args[0],)),) + tuple(node.args[1:])
        added += conv.out_channels * (conv.in_channels // 2 // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    module.graph.lint()
    module.recompile()
    return added


# convolutions (graph order) whose weights make_fp16_exact splits: conv 0 (through centre_pixels) and
# the next nine, the stem and the first stage, where the emulation ranks weight rounding worst
SPLIT_CONVS = range(1, 10)


def make_fp16_exact(module, input_hw: tuple[int, int], calibration: int = 8) -> dict:
    """Everything `engine.fp16_exact` does to the fp32 module, in place: pixels centred (the first
    convolution's weights split), every SiLU output stored minus its calibrated per-channel mean,
    the weights of SPLIT_CONVS split into fp16 halves. Calibrated on synthetic images (never on
    the frames it will see). Returns what changed, for the log."""
    from engines.torch_engine import convolutions

    pixels = centre_pixels(module)
    convs, channels = shift_activations(module, calibration_images(calibration, *input_hw), centre_rest=True)
    split = split_weights(module, [i for i in SPLIT_CONVS if i < len(convolutions(module))])
    return {"centred": pixels, "shifted_convs": convs, "shifted_channels": channels, "split_macs_per_pixel": split}
