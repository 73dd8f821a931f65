"""Convolutional networks from scratch (Chapter 4): convolution, pooling, LeNet-5.

Two convolutions: :func:`conv2d_loops`, which walks over output positions with
explicit loops, and :func:`conv2d`, which turns the input into a matrix of patches
(:func:`im2col`) and does one matrix product. ``tests/test_cnn.py`` checks both
against ``torch.nn.functional.conv2d`` for many shapes, strides and paddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IntPair = int | tuple[int, int]


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    r"""Output length of a convolution or pooling along one axis.

    :math:`\lfloor (n + 2p - k) / s \rfloor + 1` for input length n, kernel k, stride s
    and padding p (Dumoulin and Visin, 2016).
    """
    if size + 2 * padding < kernel:
        raise ValueError(
            f"kernel {kernel} does not fit an input of size {size} with padding {padding}"
        )
    return (size + 2 * padding - kernel) // stride + 1


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"expected input of shape [batch, channels, height, width], got {tuple(x.shape)}"
        )


def _check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_images(x)
    if weight.ndim != 4:
        raise ValueError(
            "expected weight of shape [out_channels, in_channels, kh, kw], "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight expects {weight.shape[1]} input channels, but the input has {x.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias of shape [{weight.shape[0]}], got {tuple(bias.shape)}")


def conv2d_loops(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    r"""2-D convolution (cross-correlation, as in PyTorch) with explicit loops.

    .. math:: y_{n,o,i,j} = b_o + \sum_{c,u,v} w_{o,c,u,v}\, x_{n,c,\,i s + u,\, j s + v}

    on the zero-padded input. The two loops run over output rows and columns; at each
    position one patch of every image meets every filter. Slow, but the formula is in
    plain sight.
    """
    _check_conv_args(x, weight, bias)
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    out_channels, _, kh, kw = weight.shape
    oh = output_size(x.shape[2], kh, sh, ph)
    ow = output_size(x.shape[3], kw, sw, pw)
    padded = F.pad(x, (pw, pw, ph, ph))
    out = x.new_zeros(x.shape[0], out_channels, oh, ow)
    for i in range(oh):
        for j in range(ow):
            # one patch per image: [N, C, kh, kw]
            patch = padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            out[:, :, i, j] = torch.einsum("nchw,ochw->no", patch, weight)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def im2col(
    x: torch.Tensor, kernel: IntPair, stride: IntPair = 1, padding: IntPair = 0
) -> torch.Tensor:
    """Unfold every kernel-sized patch of ``x`` into a column: ``[N, C·kh·kw, oh·ow]``.

    The same layout as ``torch.nn.functional.unfold`` (Chellapilla et al., 2006). It uses
    ``Tensor.unfold``, which makes sliding windows as a view without copying, then one
    reshape that does copy.
    """
    (kh, kw), (sh, sw) = _pair("kernel", kernel, 1), _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    _check_images(x)
    output_size(x.shape[2], kh, sh, ph), output_size(x.shape[3], kw, sw, pw)  # validate
    # sliding windows as a view: [N, C, oh, ow, kh, kw]
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)
    n, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    """2-D convolution as one matrix product: filters ``[O, C·kh·kw]`` times patches.

    Same semantics as ``torch.nn.functional.conv2d`` (no dilation, no groups).
    """
    _check_conv_args(x, weight, bias)
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair("stride", stride, 1), _pair("padding", padding, 0)
    oh = output_size(x.shape[2], kh, sh, ph)
    ow = output_size(x.shape[3], kw, sw, pw)
    columns = im2col(x, (kh, kw), (sh, sw), (ph, pw))  # [N, C*kh*kw, oh*ow]
    out = weight.reshape(out_channels, -1) @ columns  # [N, O, oh*ow]
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(x.shape[0], out_channels, oh, ow)


def max_pool2d(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None) -> torch.Tensor:
    """Max pooling from scratch: the largest value of each window, channel by channel.

    ``stride`` defaults to the kernel size, as in PyTorch, so windows do not overlap.
    """
    return _pool(x, kernel, stride, "max")


def avg_pool2d(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None) -> torch.Tensor:
    """Average pooling from scratch: the mean of each window, channel by channel."""
    return _pool(x, kernel, stride, "mean")


def _pool(x: torch.Tensor, kernel: IntPair, stride: IntPair | None, how: str) -> torch.Tensor:
    _check_images(x)
    kh, kw = _pair("kernel", kernel, 1)
    sh, sw = (kh, kw) if stride is None else _pair("stride", stride, 1)
    n, c, h, w = x.shape
    columns = im2col(x.reshape(n * c, 1, h, w), (kh, kw), (sh, sw))  # [N*C, kh*kw, oh*ow]
    pooled = columns.amax(dim=1) if how == "max" else columns.mean(dim=1)
    return pooled.view(n, c, output_size(h, kh, sh), output_size(w, kw, sw))


def receptive_field(layers: list[tuple[int, int]]) -> int:
    r"""Side of the input region that one output unit of a stack of layers can see.

    ``layers`` lists ``(kernel, stride)`` from the input upwards. Each layer widens the
    field by :math:`(k - 1)` times the product of the strides below it.
    """
    field, jump = 1, 1
    for kernel, stride in layers:
        if kernel < 1 or stride < 1:
            raise ValueError(f"kernel and stride must be >= 1, got ({kernel}, {stride})")
        field += (kernel - 1) * jump
        jump *= stride
    return field


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """One row per leaf layer: name, type, output shape, parameters and FLOPs for one input.

    FLOPs count multiply-adds of convolutions and linear layers as 2 each, as
    ``torch.utils.flop_counter`` does; activations and pooling count as 0.
    """
    rows: list[dict] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        flops = 0
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops = 2 * module.in_channels // module.groups * kh * kw * output[0].numel()
        elif isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
        rows.append({
            "name": names[module],
            "type": type(module).__name__,
            "output": tuple(output.shape[1:]),
            "parameters": sum(p.numel() for p in module.parameters()),
            "flops": flops,
        })

    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return rows


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with today's usual choices: ReLU and max pooling.

    Layers, for a ``[N, in_channels, 32, 32]`` input:

    ======  ===========================  ==============================
    layer   what                         parameters (1 input channel)
    ======  ===========================  ==============================
    C1      6 filters 5×5                6·(1·25 + 1) = 156
    S2      2×2 max pooling              0
    C3      16 filters 5×5 over 6 maps   16·(6·25 + 1) = 2,416
    S4      2×2 max pooling              0
    C5      400 → 120 fully connected    120·(400 + 1) = 48,120
    F6      120 → 84                     84·(120 + 1) = 10,164
    output  84 → ``num_classes``         10·(84 + 1) = 850
    ======  ===========================  ==============================

    Total 61,706 for one channel and 10 classes. The 1998 paper reports about 60,000
    because its C3 connects each map to only some of S2's maps, and its output layer
    is a radial-basis layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (32, 32):
            raise ValueError(
                f"LeNet5 expects images of shape [batch, {self.in_channels}, 32, 32], "
                f"got {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))
